"""Golden behaviour (issue 16): what the code did before the refactor into a task registry, a
runtime layer and a CLI package, checked against the code installed now.

``tests/golden/<kind>/`` holds a tiny bundle of every kind of model and ``expected.json``, both
written by ``python -m tests.golden.make_golden`` with the code before the refactor. Here:

1. every committed bundle is loaded and everything in ``expected.json`` is computed again --
   the Python API's answers, every HTTP route's status and body for every variant (refusals
   of routes a model does not serve included), the bundle's metadata -- and compared: strings,
   ints, status codes and keys exactly, floats to 1e-5 (the path of the first difference is
   named);
2. every command's ``--help`` matches ``tests/golden/help.json``;
3. every kind is trained again with the recipe that made its golden bundle (and exported
   again: ONNX, pruned, distilled), and the new bundle's training numbers, metadata and
   answers match the golden ones to 1e-4 (on the CPU; the old code retrains bit for bit).

What the refactor changed on purpose is applied to the captured values (``as_intended``) and
listed there: renamed model_config keys and a message that names the registry. The one help
text that changed (``train --task``, its choices now from the registry) was re-captured. Help
texts re-captured since, for new commands and options: the chat task (issue 17: ``chat``,
``data chat``, ``evaluate --baseline``, ``chat`` among ``train --task``'s choices).

Regenerate (only with the code before the refactor, from the repository root):
``MODALFORGE_CACHE=$(mktemp -d) python -m tests.golden.make_golden``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from tests.golden import make_golden as golden

GOLDEN = Path(__file__).resolve().parent / "golden"
CAPTURED = {kind: json.loads((GOLDEN / kind / "expected.json").read_text(encoding="utf-8"))
            for kind in golden.KINDS}  # fmt: skip
HELP = json.loads((GOLDEN / "help.json").read_text(encoding="utf-8"))
VARIANTS = [(kind, v) for kind in golden.KINDS for v in CAPTURED[kind]["http"]]
#: Lightning's note on the toy runs' few batches per epoch
pytestmark = pytest.mark.filterwarnings("ignore:The number of training batches")
#: tolerances: recomputed from the same weights, and re-trained
LOADED = {"abs": 1e-5, "rel": 1e-5}
RETRAINED = {"abs": 1e-4, "rel": 1e-4}


# -- what changed on purpose ---------------------------------------------------------------------
#: model_config keys renamed so every width has one name (issue 16): bundles written now say the
#: new names; bundles written before still load (``ModelConfig.from_dict`` reads the old ones)
RENAMED_CONFIG_KEYS = {"hidden": "fusion_out_dim", "dim": "decoder_dim"}
RENAMED_FUSION_KWARGS = {"hidden": "width"}
#: messages that now point at the task registry instead of a module that became an alias
NEW_MESSAGES = {
    "<bundle>: a speech-to-text bundle: load it with modalforge.transcribe.Transcriber.load":
        "<bundle>: a speech-to-text bundle: load it with modalforge.tasks.load (it is a "
        "modalforge.tasks.transcription.Transcriber)",
    # issue 18: libsndfile's "Error opening <_io.BytesIO ...>: " prefix is dropped
    "'audio': cannot decode audio: Error opening <_io.BytesIO object at 0x<address>>: Format "
    "not recognised.": "'audio': cannot decode audio: Format not recognised.",
    "'audio': cannot decode audio: Error opening <_io.BytesIO object at 0x<address>>: Error in "
    "WAV/W64/RF64 file. Short 'fmt ' chunk.":
        "'audio': cannot decode audio: Error in WAV/W64/RF64 file. Short 'fmt ' chunk.",
    # issue 18: the beam width is bounded above too
    "beam_width must be >= 1, got 0": "beam_width must be 1 to 16, got 0",
    "temperature must be > 0, got -1": "temperature must be > 0 and at most 100, got -1",
}  # fmt: skip


def as_intended(value):
    """A golden value with the refactor's intended changes applied (and nothing else)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "model_config" and isinstance(item, dict):
                item = {RENAMED_CONFIG_KEYS.get(k, k): v for k, v in item.items()}
                if isinstance(item.get("fusion_kwargs"), dict):
                    item["fusion_kwargs"] = {RENAMED_FUSION_KWARGS.get(k, k): v
                                             for k, v in item["fusion_kwargs"].items()}  # fmt: skip
            out[key] = as_intended(item)
        return out
    if isinstance(value, list):
        return [as_intended(v) for v in value]
    return NEW_MESSAGES.get(value, value) if isinstance(value, str) else value


#: the golden answers as the code should give them now
EXPECTED = {kind: as_intended(value) for kind, value in CAPTURED.items()}


# -- comparing ----------------------------------------------------------------------------------
def first_difference(got, want, path: str = "$", tol: dict | None = None) -> str | None:
    """Where ``got`` first differs from ``want`` (JSON values), as ``"$.a.b[3]: ..."``; None
    when they agree: same keys, same lengths, equal strings / ints / bools / None, floats
    within ``tol`` (``pytest.approx``'s abs and rel)."""
    tol = tol or LOADED
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return f"{path}: expected an object, got {type(got).__name__} {_short(got)}"
        if set(got) != set(want):
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            return f"{path}: keys differ: missing {missing}, unexpected {extra}"
        for key in want:
            found = first_difference(got[key], want[key], f"{path}.{key}", tol)
            if found:
                return found
        return None
    if isinstance(want, list):
        if not isinstance(got, list):
            return f"{path}: expected a list, got {type(got).__name__} {_short(got)}"
        if len(got) != len(want):
            return f"{path}: {len(got)} items, expected {len(want)}: {_short(got)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            found = first_difference(g, w, f"{path}[{i}]", tol)
            if found:
                return found
        return None
    if isinstance(want, bool) or isinstance(got, bool) or want is None or got is None:
        same = got is want if isinstance(want, bool) or want is None else got == want
        return None if same and type(got) is type(want) else f"{path}: {got!r} != {want!r}"
    if isinstance(want, int | float) and isinstance(got, int | float):
        if isinstance(want, int) and isinstance(got, int):
            return None if got == want else f"{path}: {got} != {want}"
        if math.isnan(want) or math.isnan(got):
            return None if math.isnan(want) and math.isnan(got) else f"{path}: {got} != {want}"
        if got == pytest.approx(want, **tol):
            return None
        return f"{path}: {got!r} != {want!r} (abs {tol['abs']:g}, rel {tol['rel']:g})"
    if isinstance(want, str) and isinstance(got, str) and path.endswith(".embedding"):
        # encoding_format=base64: float32 bytes, compared as the floats they are (a batched
        # GEMM's last bits vary with the machine's threads)
        import base64

        import numpy as np

        decode = lambda text: np.frombuffer(base64.b64decode(text), "<f4").tolist()  # noqa: E731
        return first_difference(decode(got), decode(want), path, tol)
    if type(got) is not type(want) or got != want:
        return f"{path}: {got!r} != {want!r}"
    return None


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) < 200 else text[:200] + "..."


def check(got, want, where: str, tol: dict | None = None) -> None:
    found = first_difference(json.loads(json.dumps(got)), want, where, tol)
    if found is not None:
        pytest.fail(found)


def test_the_comparer_names_the_first_difference():
    want = {"a": [1, 2.0, {"b": "x"}], "c": None, "d": True}
    assert first_difference(want, want) is None
    assert first_difference({**want, "c": 0}, want) == "$.c: 0 != None"
    assert first_difference({**want, "a": [1, 2.0 + 1e-7, {"b": "x"}]}, want) is None
    assert first_difference({**want, "a": [1, 2.1, {"b": "x"}]}, want).startswith("$.a[1]")
    assert first_difference({**want, "a": [1, 2.0, {"b": "y"}]}, want) == "$.a[2].b: 'y' != 'x'"
    assert first_difference({**want, "d": 1}, want) == "$.d: 1 != True"
    assert "missing ['d']" in first_difference({"a": want["a"], "c": None}, want)
    assert first_difference({"x": float("nan")}, {"x": float("nan")}) is None


# -- the committed bundles, and their data made again -------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Copies of the golden bundles (same folder names: a served model is named after its
    folder), the index, every kind's held-out rows, and a cache of their own."""
    import torch

    root = tmp_path_factory.mktemp("golden")
    before = os.environ.get("MODALFORGE_CACHE")
    os.environ["MODALFORGE_CACHE"] = str(root / "mfcache")  # nothing in the user's cache
    threads = torch.get_num_threads()
    torch.set_num_threads(golden.THREADS)
    bundles = {}
    for kind in golden.KINDS:
        shutil.copytree(GOLDEN / kind / "bundle", root / kind / "bundle")
        bundles[kind] = root / kind / "bundle"
    shutil.copytree(GOLDEN / "contrastive" / "index", root / "contrastive" / "index")
    data = golden.write_data(root / "data")
    yield {"root": root, "bundles": bundles, "data": data,
           "index": {"contrastive": root / "contrastive" / "index"}}  # fmt: skip
    torch.set_num_threads(threads)
    if before is None:
        os.environ.pop("MODALFORGE_CACHE", None)
    else:
        os.environ["MODALFORGE_CACHE"] = before


def observe(env, section: str, kind: str, variant: str | None = None):
    return golden.observe(section, kind, env["bundles"][kind], env["data"][kind],
                          env["root"] / "cache" / kind, env["index"].get(kind),
                          variant=variant)  # fmt: skip


@pytest.mark.parametrize("kind", golden.KINDS)
def test_bundle_metadata_matches(env, kind):
    """``modalforge.json`` as read back (variants with their metadata, timings aside): the
    committed files, so the keys they were written with."""
    check(observe(env, "bundle", kind), CAPTURED[kind]["bundle"], f"{kind}.bundle")
    check(observe(env, "fit", kind), EXPECTED[kind]["fit"], f"{kind}.fit")


@pytest.mark.parametrize("kind", golden.KINDS)
def test_python_api_answers_as_before(env, kind):
    """predict / predict_proba / evaluate, embed, caption, transcribe ... of every variant."""
    check(observe(env, "python", kind), EXPECTED[kind]["python"], f"{kind}.python")


@pytest.mark.parametrize(("kind", "variant"), VARIANTS, ids=[f"{k}-{v}" for k, v in VARIANTS])
def test_every_route_answers_as_before(env, kind, variant):
    """GET /v1/models and every POST route (fixed requests, refusals included), served from
    this variant."""
    got = observe(env, "http", kind, variant)
    want = EXPECTED[kind]["http"][variant]
    assert sorted(got) == sorted(want)
    for call in want:  # one call at a time, so a failure names the request
        check(got[call], want[call], f"{kind}.http.{variant}[{call!r}]")


def test_the_index_searches_as_before(env):
    check(observe(env, "index", "contrastive"), EXPECTED["contrastive"]["index"],
          "contrastive.index")  # fmt: skip


# -- the CLI's help -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def help_now():
    from tests.golden.help_text import help_texts

    return help_texts()


def test_the_cli_has_the_same_commands(help_now):
    gone, new = sorted(set(HELP) - set(help_now)), sorted(set(help_now) - set(HELP))
    assert not gone and not new, f"commands gone: {gone}, new: {new}"


@pytest.mark.parametrize("command", sorted(HELP))
def test_help_text_is_unchanged(help_now, command):
    assert command in help_now, f"`modalforge {command}` is gone"
    assert help_now[command] == HELP[command], f"`modalforge {command} --help` changed"


# -- training again -------------------------------------------------------------------------------
def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


#: the recipes' numbers are the CPU's (Lightning would train in 16-bit mixed precision on CUDA)
cpu_only = pytest.mark.skipif(_cuda(), reason="the golden training runs are CPU runs")


@cpu_only
@pytest.mark.parametrize("kind", golden.KINDS)
def test_retraining_gives_the_golden_model_again(env, kind, tmp_path):
    """The recipe on the current code: the same training numbers, metadata and answers (to
    1e-4: the same seeded float32 arithmetic, on one thread)."""
    bundle = golden.train(kind, tmp_path / "work")
    data, cache = env["data"][kind], tmp_path / "cache"
    want = EXPECTED[kind]
    fit = golden.observe("fit", kind, bundle, data, cache)
    check(fit, want["fit"], f"{kind}.retrained.fit", RETRAINED)
    record = golden.observe("bundle", kind, bundle, data, cache)["record"]
    golden_record = dict(want["bundle"]["record"])
    # the golden bundle has its export variants (and their files) too; compare the rest
    golden_record["variants"] = {"pytorch": golden_record["variants"]["pytorch"]}
    golden_record["files"] = {k: v for k, v in golden_record["files"].items()
                              if k in record["files"]}  # fmt: skip
    check(record, golden_record, f"{kind}.retrained.bundle", RETRAINED)
    python = golden.python_outputs(kind, bundle, data, cache)
    paths = {str(data.parent): "<data>", str(bundle): "<bundle>", str(cache): "<cache>"}
    check(golden.scrub(python, paths), want["python"]["pytorch"],
          f"{kind}.retrained.python.pytorch", RETRAINED)  # fmt: skip


@cpu_only
@pytest.mark.parametrize("kind", [k for k in golden.KINDS if len(EXPECTED[k]["http"]) > 1])
def test_exporting_again_gives_the_golden_variants(env, kind, tmp_path):
    """The recipe's bundle exported again (ONNX, pruned, distilled): the same variant
    metadata (timings aside) and the same answers from every variant, to 1e-4."""
    work, data, cache = tmp_path / "work", env["data"][kind], tmp_path / "cache"
    bundle = golden.train(kind, work)
    golden.add_variants(kind, bundle, work, data)
    record = golden.observe("bundle", kind, bundle, data, cache)["record"]
    want = EXPECTED[kind]["bundle"]["record"]
    check(record, want, f"{kind}.exported.bundle", RETRAINED)
    check(golden.observe("python", kind, bundle, data, cache), EXPECTED[kind]["python"],
          f"{kind}.exported.python", RETRAINED)  # fmt: skip
