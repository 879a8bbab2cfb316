"""Golden behaviour of modalforge before the refactor (issue 16): one tiny bundle per kind of
model, and everything a user can observe of it, computed by the code that wrote it.

    MODALFORGE_CACHE=$(mktemp -d) python -m tests.golden.make_golden     # (re)write the folders

Per kind, ``tests/golden/<kind>/`` holds

* ``bundle/``: trained here by the kind's recipe (``RECIPES``: tiny from-scratch encoders on
  synthetic rows, seeded, a few seconds each), with its export variants (``add_variants``);
* ``expected.json``: the Python API's answers on held-out rows (``python``), the HTTP routes'
  answers to fixed requests for every variant the bundle has, refusals included (``http``),
  the bundle's metadata (``bundle``: variants without timings, ...) and the training run's
  deterministic numbers (``fit``);

and ``contrastive/index/`` is an embedding index of held-out images, served by ``/v1/search``.
``tests/test_golden.py`` recomputes all of it with the code installed now, and re-trains every
kind with the recipes below. Data (images, clips, manifests) is never stored: ``write_data``
makes it again, byte for byte, from ``tests/conftest.py``'s helpers.

Volatile values never reach ``expected.json``: timings (``*seconds``, latency, the image
chunk size ``Engine.tune`` picks by timing), creation times and chat completion ids become
placeholders naming their type, and the temporary folders' paths become ``<data>`` /
``<bundle>`` (see ``scrub``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tests.conftest import COLORS, PITCH, WORDS, png_bytes, shade, sine, wav_bytes

GOLDEN = Path(__file__).resolve().parent
KINDS = ("classification", "regression", "contrastive", "caption-gru", "caption-transformer",
         "vqa", "transcribe")  # fmt: skip
#: the captions of the caption kinds' squares (as in tests/test_caption.py)
CAPTIONS = {"r": "a bright red apple", "g": "a small green leaf", "b": "the deep blue sea"}
NAMES = {"r": "red", "g": "green", "b": "blue"}
#: every float of a recipe's run is float32 arithmetic on one thread
THREADS = 1


# ============================================================================ JSON helpers


def jsonable(value: Any) -> Any:
    """Plain JSON types (numpy scalars and arrays, tuples, paths converted)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return jsonable(value.item())
    raise TypeError(f"not JSON: {type(value).__name__}")


#: keys whose values are timings (or chosen by timing), replaced by a placeholder
TIMING_KEYS = frozenset({"export_seconds", "seconds", "train_seconds", "encode_seconds",
                         "lookup_seconds", "real_time_factor", "ms_per_image",
                         "chunk_size"})  # fmt: skip
#: keys dropped: a run's temporary paths (its checkpoint, report files)
DROPPED_KEYS = frozenset({"best_checkpoint", "report"})


def placeholder(value: Any) -> str:
    """What a volatile value is replaced by: its type, so a change of type still shows."""
    if isinstance(value, dict):
        return "<" + ",".join(sorted(value)) + ">"
    if isinstance(value, bool) or value is None:
        return f"<{value}>"
    return f"<{type(value).__name__}>"


def scrub(value: Any, paths: dict[str, str] | None = None) -> Any:
    """``value`` as JSON, without what differs from run to run: timing values and creation
    times become placeholders (``<float>``), run paths are dropped, and each of ``paths``
    (``{absolute path: "<name>"}``) and object addresses (``at 0x7f...``) are replaced in every
    string."""
    value = jsonable(value)
    paths = dict(sorted((paths or {}).items(), key=lambda kv: -len(kv[0])))

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if k in DROPPED_KEYS or "latency" in k:
                    continue
                if k in TIMING_KEYS or k == "created":
                    out[k] = placeholder(x)
                else:
                    out[k] = walk(x)
            return out
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, str):
            for path, name in paths.items():
                v = v.replace(path, name)
            # an object's repr in a message (soundfile names the BytesIO it could not read)
            return re.sub(r" at 0x[0-9a-f]+>", " at 0x<address>>", v)
        return v

    return walk(value)


def chat_scrub(body: Any) -> Any:
    """A chat completion's random id -> its shape."""
    if isinstance(body, dict) and isinstance(body.get("id"), str):
        body = dict(body)
        body["id"] = re.sub(r"^chatcmpl-[0-9a-f]{24}$", "chatcmpl-<24 hex>", body["id"])
    return body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{b64(data)}"


@contextlib.contextmanager
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ============================================================================ data


def _rows_csv(root: Path, records: list[dict], name: str = "manifest.csv") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    pd.DataFrame(records).to_csv(path, index=False)
    return path


def _folders(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)


def toy_held_out(root: Path, rows: int = 12) -> Path:
    """Rows of the toy task unlike the training ones (other shades, pitches and numbers), each
    with one input missing in turn (rows 0, 4, 8 have all three)."""
    _folders(root, "img", "aud")
    records = []
    for i in range(rows):
        c = "rgb"[i % 3]
        record: dict[str, Any] = {"image": None, "text": None, "audio": None}
        if i % 4 != 1:
            (root / "img" / f"{i}.png").write_bytes(png_bytes((30, 30), shade(c, i + 3)))
            record["image"] = f"img/{i}.png"
        if i % 4 != 2:
            record["text"] = f"a {WORDS[c]} {100 + i}"
        if i % 4 != 3:
            (root / "aud" / f"{i}.wav").write_bytes(wav_bytes(sine(PITCH[c] + 7 * i, 0.3)))
            record["audio"] = f"aud/{i}.wav"
        record["label"] = c
        records.append(record)
    return _rows_csv(root, records)


def regression_rows(root: Path, rows: int, offset: int = 0) -> Path:
    """A float ``y = 2 x + grey level / 255`` from a number ``x`` and a grey square."""
    _folders(root, "img")
    records = []
    for i in range(offset, offset + rows):
        x = round(((i * 7) % 60) / 60 + 0.003 * offset, 4)
        level = 40 + (i * 37) % 180
        (root / "img" / f"{i}.png").write_bytes(png_bytes((30, 30), (level, level, level)))
        missing = offset and i % 5 == 1  # held-out rows: some without the image
        records.append({"x": x, "image": None if missing else f"img/{i}.png",
                        "y": round(2 * x + level / 255, 4)})  # fmt: skip
    return _rows_csv(root, records)


def contrastive_rows(root: Path, rows: int = 60, offset: int = 0) -> Path:
    """A coloured square, its colour's words and a tone of its colour's pitch (as in
    tests/test_contrastive.py); the words are the zero-shot label too."""
    _folders(root, "img", "aud")
    records = []
    for i in range(offset, offset + rows):
        c = "rgb"[i % 3]
        (root / "img" / f"{i}.png").write_bytes(png_bytes((30, 30), shade(c, i)))
        (root / "aud" / f"{i}.wav").write_bytes(wav_bytes(sine(PITCH[c] + i % 5, 0.25)))
        records.append({"image": f"img/{i}.png", "text": WORDS[c], "audio": f"aud/{i}.wav",
                        "colour": WORDS[c]})  # fmt: skip
    return _rows_csv(root, records)


def caption_rows(root: Path, rows: int = 60, offset: int = 0) -> Path:
    """Squares in three colours (shades vary), each captioned by its colour's sentence."""
    _folders(root, "img")
    records = []
    for i in range(offset, offset + rows):
        c = "rgb"[i % 3]
        (root / "img" / f"{i}.png").write_bytes(png_bytes((30, 30), shade(c, i)))
        records.append({"image": f"img/{i}.png", "text": CAPTIONS[c]})
    return _rows_csv(root, records)


def vqa_rows(root: Path, rows: int = 60, offset: int = 0) -> Path:
    """Coloured squares asked "what colour is this?" and "is this red?" (tests/test_vqa.py)."""
    _folders(root, "img")
    records = []
    for i in range(offset, offset + rows):
        c = "rgb"[i % 3]
        colour = COLORS[c] if not offset else shade(c, i)
        (root / "img" / f"{i}.png").write_bytes(png_bytes((30, 30), colour))
        records.append({"image": f"img/{i}.png", "question": "what colour is this?",
                        "answer": NAMES[c], "qtype": "colour"})  # fmt: skip
        asked = "rgb"[(i // 3) % 3]
        records.append({"image": f"img/{i}.png", "question": f"is this {NAMES[asked]}?",
                        "answer": "yes" if asked == c else "no", "qtype": "yes/no"})  # fmt: skip
    return _rows_csv(root, records)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(round(seconds * 16_000))).astype(np.float32)


def tone(freq: float, seconds: float) -> np.ndarray:
    return (0.5 * sine(freq, seconds)).astype(np.float32)


def transcribe_rows(root: Path) -> Path:
    """Clips like the fine-tuning ones (a tone, noise, a lower tone), other lengths, and one
    transcript that is wrong."""
    _folders(root, "aud")
    clips = [(tone(300, 0.7), "w5 w6"), (noise(1.1, seed=11), "w7"), (tone(150, 0.5), "w1 w2 w3"),
             (tone(300, 0.4), "w4")]  # fmt: skip
    records = []
    for i, (wave, text) in enumerate(clips):
        (root / "aud" / f"{i}.wav").write_bytes(wav_bytes(wave))
        records.append({"audio": f"aud/{i}.wav", "text": text})
    return _rows_csv(root, records)


#: kind -> writes that kind's held-out rows under a folder -> the manifest
HELD_OUT: dict[str, Callable[[Path], Path]] = {
    "classification": toy_held_out,
    "regression": lambda root: regression_rows(root, 10, offset=100),
    "contrastive": lambda root: contrastive_rows(root, 9, offset=200),
    "caption-gru": lambda root: caption_rows(root, 9, offset=300),
    "caption-transformer": lambda root: caption_rows(root, 9, offset=300),
    "vqa": lambda root: vqa_rows(root, 6, offset=400),
    "transcribe": transcribe_rows,
}


def write_data(root: Path) -> dict[str, Path]:
    """Every kind's held-out manifest under ``root/<kind>/``."""
    return {kind: HELD_OUT[kind](root / kind) for kind in KINDS}


# ============================================================================ recipes


def _fit(predictor, manifest: Path, work: Path) -> Path:
    with one_thread():
        predictor.fit(manifest, out_dir=work / "run", progress=False)
    return predictor.save(work / "bundle", metrics={"best_score": predictor.history["best_score"]}
                          ).path  # fmt: skip


def train_classification(work: Path) -> Path:
    """tests/serving.py's toy classifier: image + text + audio, attention fusion, every input
    optional, 8 epochs."""
    from tests.serving import train_toy_bundle

    with one_thread():
        return train_toy_bundle(work)


def train_regression(work: Path) -> Path:
    from modalforge.models import EncoderSpec
    from modalforge.predictor import FitConfig, MultimodalPredictor
    from modalforge.schema import Schema
    from modalforge.train.module import OptimConfig

    manifest = regression_rows(work / "data", 60)
    p = MultimodalPredictor(
        label="y", task="regression", fusion="concat", hidden=16, fusion_kwargs={"hidden": 16},
        encoders={"x": EncoderSpec("tabular_mlp", {"n_features": 1}),
                  "image": EncoderSpec("cnn", {"widths": (8, 16), "image_size": 30})},
        schema=Schema.from_specs(["x=tabular", "image=image?", "y=label"]),
        cache_dir=work / "cache",
        fit_config=FitConfig(epochs=20, batch_size=16, patience=20,
                             optim=OptimConfig(lr=1e-2, warmup_ratio=0.0)),
    )  # fmt: skip
    return _fit(p, manifest, work)


def train_contrastive(work: Path) -> Path:
    from modalforge.contrastive import ContrastivePredictor
    from modalforge.predictor import FitConfig
    from modalforge.schema import Schema
    from modalforge.train.module import OptimConfig
    from tests.serving import TINY

    manifest = contrastive_rows(work / "data")
    p = ContrastivePredictor(
        "image:text,audio:text", label="colour", encoders=dict(TINY), embed_dim=32,
        schema=Schema.from_specs(["image=image", "text=text", "audio=audio"]),
        cache_dir=work / "cache",
        fit_config=FitConfig(epochs=12, batch_size=16, patience=20,
                             optim=OptimConfig(lr=3e-3, warmup_ratio=0.0)),
    )  # fmt: skip
    return _fit(p, manifest, work)


def _captioner(work: Path, decoder: str) -> Path:
    from modalforge.caption import CaptionPredictor
    from modalforge.models import EncoderSpec
    from modalforge.predictor import FitConfig
    from modalforge.train.module import OptimConfig

    manifest = caption_rows(work / "data")
    frozen = EncoderSpec("cnn", {"widths": (8, 16), "depth": 1, "image_size": 30}, "frozen")
    optim = OptimConfig(lr=3e-3, warmup_ratio=0.0, label_smoothing=0.1)
    extra = {"layers": 1, "heads": 2} if decoder == "transformer" else {}
    p = CaptionPredictor("image", "text", frozen, decoder=decoder, dim=32, dropout=0.0,
                         max_length=8, cache_dir=work / "cache",
                         fit_config=FitConfig(epochs=25, batch_size=16, patience=30, optim=optim),
                         **extra)  # fmt: skip
    return _fit(p, manifest, work)


def train_caption_gru(work: Path) -> Path:
    return _captioner(work, "gru")


def train_caption_transformer(work: Path) -> Path:
    return _captioner(work, "transformer")


def train_vqa(work: Path) -> Path:
    """tests/test_vqa.py's classifier of (image, question): a frozen CNN (features cached)."""
    from modalforge.models import EncoderSpec
    from modalforge.predictor import FitConfig, MultimodalPredictor
    from modalforge.schema import Schema
    from modalforge.train.module import OptimConfig

    manifest = vqa_rows(work / "data")
    p = MultimodalPredictor(
        label="answer", columns=["image", "question"], fusion="concat", hidden=64,
        fusion_kwargs={"hidden": 32},
        encoders={"image": EncoderSpec("cnn", {"widths": (8, 16), "image_size": 30}, "frozen"),
                  "question": EncoderSpec("bag_of_embeddings", {"embed_dim": 16})},
        cache_dir=work / "cache", schema=Schema.from_specs(["image=image", "question=text"]),
        fit_config=FitConfig(epochs=30, batch_size=16, patience=30,
                             optim=OptimConfig(lr=3e-3, warmup_ratio=0.0)),
    )  # fmt: skip
    return _fit(p, manifest, work)


EOT, SOT, NO_TIMESTAMPS = 50, 51, 52


def tiny_transcriber():
    """tests/test_transcribe.py's tiny random Whisper (d_model 32, no package needed)."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from modalforge.transcribe import DecodingOptions, Transcriber

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=1,
                           decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=1500,
                           max_target_positions=64, pad_token_id=EOT, bos_token_id=EOT,
                           eos_token_id=EOT, decoder_start_token_id=SOT,
                           tie_word_embeddings=True)  # fmt: skip
    model = WhisperForConditionalGeneration(config).eval()
    vocab = {f"w{i}": i for i in range(EOT)}
    vocab.update({"<|endoftext|>": EOT, "<|startoftranscript|>": SOT,
                  "<|notimestamps|>": NO_TIMESTAMPS})  # fmt: skip
    vocab.update({f"<|x{i}|>": i for i in range(NO_TIMESTAMPS + 1, 64)})
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens([t for t in vocab if t.startswith("<|")])
    options = DecodingOptions(prompt=(SOT, NO_TIMESTAMPS), suppress_tokens=(3, 4))
    return Transcriber(model, tokenizer, options, weights_id="random-tiny", device="cpu")


def transcribe_train_rows(root: Path) -> Path:
    """A tone and noise, each with its words (tests/test_transcribe.py's fine-tuning test), and
    a missing clip (skipped)."""
    _folders(root, "aud")
    waves = [tone(300, 0.8), noise(0.5, seed=4)]
    for i, wave in enumerate(waves):
        (root / "aud" / f"{i}.wav").write_bytes(wav_bytes(wave))
    records = [
        {"audio": "aud/0.wav", "text": "w5 w6"},
        {"audio": "aud/1.wav", "text": "w7"},
        {"audio": "aud/gone.wav", "text": "w8"},
    ]
    return _rows_csv(root, records)


def train_transcribe(work: Path) -> Path:
    """The seeded random tiny Whisper, its decoder fine-tuned on two clips' words."""
    tr = tiny_transcriber()
    with one_thread():
        history = tr.finetune(transcribe_train_rows(work / "data"), epochs=150, lr=1e-2,
                              progress=False)  # fmt: skip
    metrics = {
        "finetune_rows": history["rows"],
        "finetune_skipped": history["skipped"],
        "finetune_loss_first": history["loss"][0],
        "finetune_loss_last": history["loss"][-1],
    }
    return tr.save(work / "bundle", metrics=metrics).path


#: kind -> trains (builds) that kind's bundle in a work folder -> the bundle's path
RECIPES: dict[str, Callable[[Path], Path]] = {
    "classification": train_classification,
    "regression": train_regression,
    "contrastive": train_contrastive,
    "caption-gru": train_caption_gru,
    "caption-transformer": train_caption_transformer,
    "vqa": train_vqa,
    "transcribe": train_transcribe,
}


def train(kind: str, work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    return RECIPES[kind](work)


# ============================================================================ variants

#: the distilled student of the classifier (tests/test_compress.py's)
STUDENT = """\
fusion: concat
hidden: 16
fusion_kwargs: {hidden: 16}
encoders: {image: cnn, text: bag_of_embeddings, audio: audio_cnn}
encoder_kwargs:
  image: {widths: [4, 8], image_size: 30}
  text: {embed_dim: 8}
  audio: {n_mels: 32, channels: [4, 8], output_dim: 8}
schema: {image: "image?", text: "text?", audio: "audio?"}
epochs: 8
batch_size: 16
lr: 0.01
modality_dropout: 0.4
"""


def add_variants(kind: str, bundle: Path, work: Path, held_out: Path) -> list[str]:
    """Export variants of ``bundle``, made with the current export API. -> their names."""
    from modalforge.data.manifest import read_manifest
    from modalforge.export import export_bundle
    from modalforge.export.compress import distill_bundle, prune_bundle

    added = []
    with one_thread():
        if kind == "classification":
            rows, checks = read_manifest(work / "manifest.csv"), read_manifest(held_out)
            export_bundle(bundle, checks, label="label")
            prune_bundle(bundle, rows, checks, amount=0.5, epochs=1)
            (work / "student.yaml").write_text(STUDENT)
            # gated on the training rows, as tests/test_compress.py does: on the 12 held-out
            # rows (each missing an input) the small student misses the 5-point gate
            with contextlib.chdir(work):  # the variant records the config's path as given
                distill_bundle(bundle, "student.yaml", rows, rows, temperature=2.0, alpha=0.5)
            added += ["onnx", "pruned", "distilled"]
        elif kind == "contrastive":
            export_bundle(bundle, read_manifest(work / "data" / "manifest.csv"), name="onnx")
            added.append("onnx")
        elif kind == "caption-gru":
            export_bundle(bundle, read_manifest(work / "data" / "manifest.csv"))
            added.append("onnx")
    return added


def build_index(bundle: Path, manifest: Path, out: Path, cache: Path) -> Path:
    """What ``modalforge index build BUNDLE --manifest M --out OUT`` writes, with the bundle and
    manifest named relative to the golden folder (the command records absolute paths)."""
    from modalforge.contrastive import ContrastivePredictor
    from modalforge.index import EmbeddingIndex
    from modalforge.predictor import MultimodalPredictor

    predictor = MultimodalPredictor.load(bundle, cache_dir=cache)
    assert isinstance(predictor, ContrastivePredictor)
    rows = pd.read_csv(manifest)
    with one_thread():
        vectors, _ = predictor.embed(manifest, "image", progress=False)
    metadata = json.loads(rows.to_json(orient="records"))
    weights = predictor.bundle.files["model.safetensors"]["sha256"]
    info = {"bundle": "tests/golden/contrastive/bundle", "column": "image",
            "manifest": "make_golden.HELD_OUT['contrastive']",
            "model_version": weights[:12]}  # fmt: skip
    index = EmbeddingIndex([str(i) for i in rows.index], vectors, metadata, info=info)
    return index.save(out, overwrite=True)


# ============================================================================ observations


def _error(call: Callable[[], Any]) -> dict[str, Any]:
    """What a call that should fail raises: the exception's class and message."""
    try:
        call()
    except Exception as err:  # recorded, whichever it is
        return {"raises": type(err).__name__, "message": str(err)}
    return {"raises": None}


def _table(frame: pd.DataFrame) -> dict[str, Any]:
    return {"columns": list(frame.columns), "records": frame.to_dict("records")}


def _prediction(pred) -> dict[str, Any]:
    return {"probs": pred.probs, "weights": pred.weights,
            "present": {c: v for c, v in sorted(pred.present.items())}}  # fmt: skip


def _classifier_outputs(predictor, manifest: Path, by: str | None = None) -> dict[str, Any]:
    out = {
        "task": predictor.task,
        "labels": predictor.labels,
        "predict": _table(predictor.predict(str(manifest))),
        "predict_proba": _prediction(predictor.predict_proba(str(manifest))),
        "evaluate": predictor.evaluate(str(manifest), **({"by": by} if by else {})),
    }
    # one row given as a list of dicts, values relative to root
    first = pd.read_csv(manifest).head(2).to_dict("records")
    out["predict_records"] = _table(predictor.predict(first, root=manifest.parent))
    return out


def python_outputs(kind: str, bundle: Path, manifest: Path, cache: Path,
                   variant: str = "pytorch") -> dict[str, Any]:  # fmt: skip
    """The Python API's answers for ``bundle`` (its ``variant``) on the held-out ``manifest``."""
    from modalforge.models.decoding import DecodeOptions
    from modalforge.predictor import MultimodalPredictor

    with one_thread():
        if kind == "transcribe":
            return _transcriber_outputs(bundle, manifest)
        predictor = MultimodalPredictor.load(bundle, cache_dir=cache, variant=variant)
        out: dict[str, Any] = {"class": type(predictor).__name__}
        if kind in ("classification", "regression"):
            out.update(_classifier_outputs(predictor, manifest))
        elif kind == "vqa":
            out.update(_classifier_outputs(predictor, manifest, by="qtype"))
        elif kind == "contrastive":
            for column in ("image", "text", "audio"):
                vectors, present = predictor.embed(str(manifest), column)
                out[f"embed:{column}"] = {"vectors": vectors, "present": present}
            out["embed:words"] = predictor.embed(["red apple", "blue sea", "sea"], "text")[0]
            out["evaluate"] = predictor.evaluate(str(manifest), zero_shot=["colour"],
                                                 templates=("{}",))  # fmt: skip
            out["evaluate:default"] = predictor.evaluate(str(manifest))
            out["predict"] = _error(lambda: predictor.predict(str(manifest)))
        else:  # a captioner
            length = predictor.config.max_length
            options = {
                "default": None,
                "greedy": DecodeOptions("greedy", max_length=length),
                "beam": DecodeOptions("beam", max_length=length),
                "beam2-lp0": DecodeOptions("beam", beam_width=2, length_penalty=0.0,
                                           max_length=length),
                "sample-seed1": DecodeOptions("sample", temperature=0.8, seed=1,
                                              max_length=length),
                "sample-seed2-top_p0.5": DecodeOptions("sample", top_p=0.5, seed=2,
                                                       max_length=length),
                "greedy-max3": DecodeOptions("greedy", max_length=3),
            }  # fmt: skip
            out["caption"] = {name: predictor.caption(str(manifest), o)
                              for name, o in options.items()}  # fmt: skip
            images = [(manifest.parent / v).read_bytes() for v in pd.read_csv(manifest)["image"]]
            out["caption:bytes"] = predictor.caption(images[:3])
            out["evaluate"] = predictor.evaluate(str(manifest))
            out["predict"] = _error(lambda: predictor.predict(str(manifest)))
        return out


def _transcriber_outputs(bundle: Path, manifest: Path) -> dict[str, Any]:
    from modalforge.predictor import MultimodalPredictor
    from modalforge.transcribe import Transcriber

    tr = Transcriber.load(bundle, device="cpu")
    waves = [tone(300, 1.0), noise(0.4, seed=1), np.zeros(0, np.float32), tone(150, 0.3)]
    clips = [(manifest.parent / v).read_bytes() for v in pd.read_csv(manifest)["audio"]]
    return {
        "class": type(tr).__name__,
        "repr": repr(tr),
        "transcribe:max6": tr.transcribe(waves, max_new_tokens=6),
        "transcribe": tr.transcribe(waves),
        "transcribe:8kHz": tr.transcribe([tone(300, 0.5)[::2].copy()], 8000, max_new_tokens=4),
        "transcribe_sources": tr.transcribe_sources(clips),
        "evaluate": tr.evaluate(str(manifest), progress=False),
        "predictor.load": _error(lambda: MultimodalPredictor.load(bundle)),
    }


def manifest_json(bundle: Path) -> dict[str, Any]:
    """A bundle's ``modalforge.json``, read as the file it is (the on-disk format)."""
    return json.loads((bundle / "modalforge.json").read_text(encoding="utf-8"))


#: files whose size is not the weights' business: ONNX graphs carry the exporter's stack traces
#: (absolute paths of the source files that traced them), a nested bundle's manifest its
#: training timings
SIZE_VARIES = (".onnx", "modalforge.json")


def bundle_record(bundle: Path) -> dict[str, Any]:
    """What a bundle's ``modalforge.json`` says (its variants included), provenance aside:
    package versions and creation times (scrubbed: timings of variants, run paths); each file
    with its size (a placeholder for ``SIZE_VARIES``)."""
    meta = manifest_json(bundle)
    files = {name: placeholder(entry["bytes"]) if name.endswith(SIZE_VARIES) else entry["bytes"]
             for name, entry in sorted(meta["files"].items())}  # fmt: skip
    return {k: v for k, v in meta.items() if k not in ("provenance", "files")} | {"files": files}


def fit_record(bundle: Path) -> dict[str, Any]:
    """The training run's deterministic numbers: the bundle's ``extra.history`` (a
    transcriber's fine-tuning is in its metrics)."""
    meta = manifest_json(bundle)
    history = (meta.get("extra") or {}).get("history")
    if history is None:
        return {"metrics": meta.get("metrics")}
    keep = ("best_score", "epochs_run", "monitor", "rows", "cache", "resumed_from_epoch")
    return {k: history[k] for k in keep if k in history}


def weights_digest(bundle: Path) -> str:
    return manifest_json(bundle)["files"]["model.safetensors"]["sha256"]


# ---------------------------------------------------------------------------- HTTP


def _images() -> dict[str, bytes]:
    return {c: png_bytes((30, 30), COLORS[c]) for c in "rgb"}


def _tones() -> dict[str, bytes]:
    return {c: wav_bytes(sine(PITCH[c], 0.25)) for c in "rgb"}


def _grey(level: int) -> bytes:
    return png_bytes((30, 30), (level, level, level))


def _chat(text: str | None, url: str | None, **extra) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text is not None:
        content.append({"type": "text", "text": text})
    if url is not None:
        content.append({"type": "image_url", "image_url": {"url": url}})
    return {"messages": [{"role": "user", "content": content}], **extra}


def refusals(name: str, supported: set[str]) -> list[tuple[str, str, dict]]:
    """Calls of the routes a model of this kind does not serve (each must keep its error)."""
    red, sound = _images()["r"], _tones()["r"]
    calls = {
        "embeddings": ("POST", "/v1/embeddings", {"json": {"input": "red apple"}}),
        "search": ("POST", "/v1/search", {"json": {"query": "red apple", "k": 3}}),
        "caption": ("POST", "/v1/caption", {"json": {"image": b64(red)}}),
        "chat": ("POST", "/v1/chat/completions",
                 {"json": _chat("what colour is this?", data_url("image/png", red))}),
        "transcriptions": ("POST", "/v1/audio/transcriptions",
                           {"files": {"file": ("a.wav", sound, "audio/wav")}}),
    }  # fmt: skip
    return [(f"unsupported:{k}", *v) for k, v in calls.items() if k not in supported]


def requests_for(kind: str, name: str) -> list[tuple[str, str, str, dict]]:
    """``(label, method, path, httpx kwargs)`` of every call recorded for a ``kind`` bundle
    served under ``name``."""
    img, sounds = _images(), _tones()
    common = [
        ("models", "GET", "/v1/models", {}),
        ("model", "GET", f"/v1/models/{name}", {}),
        ("model:other", "GET", "/v1/models/other", {}),
        ("healthz", "GET", "/healthz", {}),
        ("readyz", "GET", "/readyz", {}),
        ("not-found", "GET", "/v1/nothing", {}),
        ("predict:not-json", "POST", "/v1/predict",
         {"content": b"{", "headers": {"content-type": "application/json"}}),
        ("predict:empty", "POST", "/v1/predict", {"json": {}}),
        ("predict:other-model", "POST", "/v1/predict", {"json": {"model": "other"}}),
        ("predict:unknown-field", "POST", "/v1/predict", {"json": {"colour": "red"}}),
        ("predict:list", "POST", "/v1/predict", {"json": [1, 2]}),
        ("predict:text/plain", "POST", "/v1/predict",
         {"content": b"hi", "headers": {"content-type": "text/plain"}}),
        ("batch:empty", "POST", "/v1/predict/batch", {"json": {"inputs": []}}),
        ("batch:not-a-list", "POST", "/v1/predict/batch", {"json": {"inputs": {}}}),
        ("batch:no-inputs", "POST", "/v1/predict/batch", {"json": {"rows": []}}),
    ]  # fmt: skip
    if kind == "classification":
        full = {"image": b64(img["r"]), "text": "a red apple", "audio": b64(sounds["b"])}
        calls = [
            ("predict:json", "POST", "/v1/predict", {"json": full}),
            ("predict:image", "POST", "/v1/predict",
             {"json": {"image": data_url("image/png", img["g"])}}),
            ("predict:text", "POST", "/v1/predict", {"json": {"text": "a blue sea", "model": name}}),
            ("predict:audio", "POST", "/v1/predict", {"json": {"audio": b64(sounds["g"])}}),
            ("predict:blank-text", "POST", "/v1/predict",
             {"json": {"text": "  ", "image": b64(img["b"])}}),
            ("predict:multipart", "POST", "/v1/predict",
             {"files": {"image": ("x.png", img["r"], "image/png"),
                        "audio": ("x.wav", sounds["r"], "audio/wav")},
              "data": {"text": "a red apple"}}),
            ("predict:multipart-model", "POST", "/v1/predict",
             {"files": {"audio": ("x.wav", sounds["b"], "audio/wav")}, "data": {"model": name}}),
            ("predict:bad-base64", "POST", "/v1/predict", {"json": {"image": "%%%"}}),
            ("predict:not-an-image", "POST", "/v1/predict", {"json": {"image": b64(b"GIF89a")}}),
            ("predict:not-audio", "POST", "/v1/predict", {"json": {"audio": b64(b"RIFF")}}),
            ("predict:text-number", "POST", "/v1/predict", {"json": {"text": 3}}),
            ("batch", "POST", "/v1/predict/batch",
             {"json": {"inputs": [{"image": b64(img["r"])}, {"text": "a green leaf"},
                                  {"audio": b64(sounds["b"]), "text": "sea"}, full]}}),
            ("batch:bad-item", "POST", "/v1/predict/batch",
             {"json": {"inputs": [{"image": b64(img["r"])}, {"image": "%%%"}]}}),
            ("batch:unknown-field", "POST", "/v1/predict/batch",
             {"json": {"inputs": [{"text": "a"}, {"text": "b", "x": 1}]}}),
        ]  # fmt: skip
        supported: set[str] = set()
    elif kind == "regression":
        calls = [
            ("predict:json", "POST", "/v1/predict", {"json": {"x": 0.5, "image": b64(_grey(100))}}),
            ("predict:x-only", "POST", "/v1/predict", {"json": {"x": 0.25}}),
            ("predict:x-string", "POST", "/v1/predict", {"json": {"x": "0.75"}}),
            ("predict:x-bad", "POST", "/v1/predict", {"json": {"x": "abc"}}),
            ("predict:x-inf", "POST", "/v1/predict", {"json": {"x": "inf"}}),
            ("predict:no-x", "POST", "/v1/predict", {"json": {"image": b64(_grey(200))}}),
            ("predict:multipart", "POST", "/v1/predict",
             {"files": {"image": ("g.png", _grey(150), "image/png")}, "data": {"x": "0.1"}}),
            ("batch", "POST", "/v1/predict/batch",
             {"json": {"inputs": [{"x": 0.0}, {"x": 1.0, "image": b64(_grey(60))},
                                  {"x": 0.3, "image": b64(_grey(220))}]}}),
            ("batch:bad-item", "POST", "/v1/predict/batch",
             {"json": {"inputs": [{"x": 0.2}, {"image": b64(_grey(60))}]}}),
        ]  # fmt: skip
        supported = set()
    elif kind == "contrastive":
        url = data_url("image/png", img["r"])
        sound = data_url("audio/wav", sounds["b"])
        calls = [
            ("predict:text", "POST", "/v1/predict", {"json": {"text": "red apple"}}),
            ("predict:all", "POST", "/v1/predict",
             {"json": {"image": b64(img["g"]), "text": "green leaf", "audio": b64(sounds["g"])}}),
            ("batch", "POST", "/v1/predict/batch",
             {"json": {"inputs": [{"image": b64(img["b"])}, {"text": "blue sea"}]}}),
            ("batch:bad-item", "POST", "/v1/predict/batch",
             {"json": {"inputs": [{"text": "a"}, {"audio": "%%%"}]}}),
            ("embeddings", "POST", "/v1/embeddings",
             {"json": {"model": name, "input": ["red apple", url, sound]}}),
            ("embeddings:one", "POST", "/v1/embeddings", {"json": {"input": "blue sea"}}),
            ("embeddings:base64", "POST", "/v1/embeddings",
             {"json": {"input": "red apple", "encoding_format": "base64"}}),
            ("embeddings:input_type", "POST", "/v1/embeddings",
             {"json": {"input": "sea", "input_type": "text", "dimensions": 32, "user": "u"}}),
            ("embeddings:url", "POST", "/v1/embeddings",
             {"json": {"input": "http://example.com/x.png"}}),
            ("embeddings:empty", "POST", "/v1/embeddings", {"json": {"input": []}}),
            ("embeddings:int8", "POST", "/v1/embeddings",
             {"json": {"input": "red", "encoding_format": "int8"}}),
            ("embeddings:dimensions", "POST", "/v1/embeddings",
             {"json": {"input": "red", "dimensions": 8}}),
            ("embeddings:extra", "POST", "/v1/embeddings", {"json": {"input": "red", "extra": 1}}),
            ("embeddings:video", "POST", "/v1/embeddings",
             {"json": {"input": ["red", "data:video/mp4;base64,AAAA"]}}),
            ("embeddings:other-model", "POST", "/v1/embeddings",
             {"json": {"model": "other", "input": "red"}}),
            ("embeddings:no-input", "POST", "/v1/embeddings", {"json": {"model": name}}),
            ("embeddings:bad-input_type", "POST", "/v1/embeddings",
             {"json": {"input": "red", "input_type": "image"}}),
            ("search:text", "POST", "/v1/search", {"json": {"query": "blue sea", "k": 5}}),
            ("search:image", "POST", "/v1/search", {"json": {"query": url, "k": 3}}),
            ("search:audio", "POST", "/v1/search", {"json": {"query": sound}}),
            ("search:embedding", "POST", "/v1/search",
             {"json": {"embedding": [1.0] + [0.0] * 31, "k": 2}}),
            ("search:k0", "POST", "/v1/search", {"json": {"query": "red", "k": 0}}),
            ("search:both", "POST", "/v1/search",
             {"json": {"query": "red", "embedding": [0.0] * 32}}),
            ("search:short-embedding", "POST", "/v1/search", {"json": {"embedding": [1.0] * 3}}),
            ("search:extra", "POST", "/v1/search", {"json": {"query": "red", "extra": 1}}),
            ("search:url", "POST", "/v1/search", {"json": {"query": "ftp://x/y.png"}}),
        ]  # fmt: skip
        supported = {"embeddings", "search"}
    elif kind.startswith("caption"):
        red = b64(img["r"])
        blue = data_url("image/png", img["b"])
        calls = [
            ("caption", "POST", "/v1/caption", {"json": {"image": red}}),
            ("caption:greedy", "POST", "/v1/caption", {"json": {"image": red, "method": "greedy"}}),
            ("caption:sample", "POST", "/v1/caption",
             {"json": {"image": red, "temperature": 0.5, "seed": 1}}),
            ("caption:top_p", "POST", "/v1/caption",
             {"json": {"image": b64(img["g"]), "top_p": 0.5, "seed": 3}}),
            ("caption:max_tokens", "POST", "/v1/caption", {"json": {"image": red, "max_tokens": 2}}),
            ("caption:beam", "POST", "/v1/caption",
             {"json": {"image": blue, "beam_width": 2, "length_penalty": 0}}),
            ("caption:multipart", "POST", "/v1/caption",
             {"files": {"image": ("g.png", img["g"], "image/png")}}),
            ("caption:beam_width0", "POST", "/v1/caption", {"json": {"image": red, "beam_width": 0}}),
            ("caption:method", "POST", "/v1/caption", {"json": {"image": red, "method": "nucleus"}}),
            ("caption:max_tokens0", "POST", "/v1/caption", {"json": {"image": red, "max_tokens": 0}}),
            ("caption:seed-str", "POST", "/v1/caption", {"json": {"image": red, "seed": "1"}}),
            ("caption:list", "POST", "/v1/caption", {"json": [red]}),
            ("caption:no-image", "POST", "/v1/caption", {"json": {}}),
            ("predict:image", "POST", "/v1/predict", {"json": {"image": red}}),
            ("predict:options", "POST", "/v1/predict",
             {"json": {"image": red, "__options__": {"method": "x"}}}),
            ("batch", "POST", "/v1/predict/batch",
             {"json": {"inputs": [{"image": red}, {"image": b64(img["g"])}]}}),
            ("batch:bad-item", "POST", "/v1/predict/batch",
             {"json": {"inputs": [{"image": red}, {"image": "%%%"}]}}),
            ("chat", "POST", "/v1/chat/completions",
             {"json": _chat("What is in this picture?", blue, model=name)}),
            ("chat:greedy", "POST", "/v1/chat/completions",
             {"json": _chat(None, data_url("image/png", img["g"]), temperature=0)}),
            ("chat:sample", "POST", "/v1/chat/completions",
             {"json": _chat("Caption this.", blue, temperature=0.7, top_p=0.95, max_tokens=8,
                            user="u", metadata={}, store=False)}),
            ("chat:max_completion_tokens", "POST", "/v1/chat/completions",
             {"json": _chat("x", blue, max_completion_tokens=1)}),
            ("chat:string-content", "POST", "/v1/chat/completions",
             {"json": {"messages": [{"role": "user", "content": "hello"}]}}),
            ("chat:url", "POST", "/v1/chat/completions",
             {"json": _chat(None, "http://127.0.0.1:9/x.png")}),
            ("chat:stream", "POST", "/v1/chat/completions", {"json": _chat(None, blue, stream=True)}),
            ("chat:n2", "POST", "/v1/chat/completions", {"json": _chat(None, blue, n=2)}),
            ("chat:two-images", "POST", "/v1/chat/completions",
             {"json": {"messages": [{"role": "user", "content": [
                 {"type": "image_url", "image_url": {"url": blue}}] * 2}]}}),
            ("chat:temperature-1", "POST", "/v1/chat/completions",
             {"json": _chat(None, blue, temperature=-1)}),
            ("chat:tools", "POST", "/v1/chat/completions", {"json": _chat(None, blue, tools=[])}),
            ("chat:system", "POST", "/v1/chat/completions",
             {"json": {"messages": [{"role": "system", "content": "hi"}]}}),
            ("chat:other-model", "POST", "/v1/chat/completions",
             {"json": _chat(None, blue, model="other")}),
            ("chat:bad-part", "POST", "/v1/chat/completions",
             {"json": {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}}),
            ("chat:no-messages", "POST", "/v1/chat/completions", {"json": {"messages": []}}),
        ]  # fmt: skip
        supported = {"caption", "chat"}
    elif kind == "vqa":
        green = data_url("image/png", img["g"])
        calls = [
            ("chat", "POST", "/v1/chat/completions", {"json": _chat("what colour is this?", green)}),
            ("chat:yes-no", "POST", "/v1/chat/completions",
             {"json": _chat("is this green?", data_url("image/png", img["g"]), model=name)}),
            ("chat:no-question", "POST", "/v1/chat/completions", {"json": _chat(None, green)}),
            ("chat:no-image", "POST", "/v1/chat/completions",
             {"json": _chat("what colour is this?", None)}),
            ("chat:temperature", "POST", "/v1/chat/completions",
             {"json": _chat("is this red?", green, temperature=0)}),
            ("predict:json", "POST", "/v1/predict",
             {"json": {"image": b64(img["b"]), "question": "what colour is this?"}}),
            ("predict:no-question", "POST", "/v1/predict", {"json": {"image": b64(img["b"])}}),
            ("predict:multipart", "POST", "/v1/predict",
             {"files": {"image": ("r.png", img["r"], "image/png")},
              "data": {"question": "is this red?"}}),
            ("batch", "POST", "/v1/predict/batch",
             {"json": {"inputs": [{"image": b64(img["r"]), "question": "what colour is this?"},
                                  {"image": b64(img["g"]), "question": "is this blue?"}]}}),
            ("batch:bad-item", "POST", "/v1/predict/batch",
             {"json": {"inputs": [{"image": b64(img["r"]), "question": "what colour is this?"},
                                  {"question": "is this blue?"}]}}),
        ]  # fmt: skip
        supported = {"chat"}
    else:  # transcribe
        clip = wav_bytes(tone(150, 0.8))
        calls = [
            ("transcriptions", "POST", "/v1/audio/transcriptions",
             {"files": {"file": ("a.wav", clip, "audio/wav")}, "data": {"model": name}}),
            ("transcriptions:text", "POST", "/v1/audio/transcriptions",
             {"files": {"file": ("a.wav", clip, "audio/wav")},
              "data": {"response_format": "text", "language": "en", "temperature": "0"}}),
            ("transcriptions:flac", "POST", "/v1/audio/transcriptions",
             {"files": {"file": ("a.flac", wav_bytes(tone(300, 0.5), fmt="FLAC"),
                                 "audio/flac")}}),
            ("transcriptions:srt", "POST", "/v1/audio/transcriptions",
             {"files": {"file": ("a.wav", clip, "audio/wav")}, "data": {"response_format": "srt"}}),
            ("transcriptions:no-file", "POST", "/v1/audio/transcriptions",
             {"data": {"model": name}, "files": {"x": ("x.txt", b"x", "text/plain")}}),
            ("transcriptions:other-model", "POST", "/v1/audio/transcriptions",
             {"files": {"file": ("a.wav", clip, "audio/wav")}, "data": {"model": "other"}}),
            ("transcriptions:json", "POST", "/v1/audio/transcriptions", {"json": {"file": "x"}}),
            ("transcriptions:bad-audio", "POST", "/v1/audio/transcriptions",
             {"files": {"file": ("a.wav", b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 20,
                                 "audio/wav")}}),
            ("predict:audio", "POST", "/v1/predict", {"json": {"audio": b64(clip)}}),
            ("batch", "POST", "/v1/predict/batch",
             {"json": {"inputs": [{"audio": b64(clip)}, {"audio": b64(wav_bytes(noise(0.3)))}]}}),
            ("batch:bad-item", "POST", "/v1/predict/batch",
             {"json": {"inputs": [{"audio": b64(clip)}, {"audio": "%%%"}]}}),
        ]  # fmt: skip
        supported = {"transcriptions"}
    return [*common, *calls, *refusals(name, supported)]


def _response(r) -> dict[str, Any]:
    out: dict[str, Any] = {"status": r.status_code}
    ctype = r.headers.get("content-type", "")
    out["content_type"] = ctype.split(";")[0]
    if ctype.startswith("application/json"):
        out["json"] = chat_scrub(r.json())
    else:
        out["text"] = r.text
    return out


def http_outputs(kind: str, bundle: Path, variant: str, cache: Path,
                 index: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Every route's answer (status + body) to ``requests_for(kind)``, served from ``variant``
    in-process through FastAPI's TestClient."""
    from fastapi.testclient import TestClient

    from modalforge.index import EmbeddingIndex
    from modalforge.serve import Engine, ServeConfig, create_app

    engine = Engine.from_bundle(bundle, variant=variant, cache_dir=cache, device="cpu")
    loaded = EmbeddingIndex.load(index) if index is not None else None
    out = {}
    with one_thread(), TestClient(create_app(engine, ServeConfig(), index=loaded)) as client:
        for label, method, path, kwargs in requests_for(kind, engine.name):
            out[label] = _response(client.request(method, path, **kwargs))
    return out


def index_outputs(index: Path, bundle: Path, cache: Path) -> dict[str, Any]:
    """``modalforge.index`` on the stored index: its facts and searches by the bundle's text."""
    from modalforge.index import EmbeddingIndex
    from modalforge.predictor import MultimodalPredictor

    found = EmbeddingIndex.load(index)
    predictor = MultimodalPredictor.load(bundle, cache_dir=cache)
    with one_thread():
        queries, _ = predictor.embed(["red apple", "green leaf", "blue sea"], "text")
    hits = found.search(queries, k=4)
    return {
        "len": len(found), "dim": found.dim, "backend": found.backend, "info": found.info,
        "ids": found.ids, "params": found.params,
        "search": [[{"id": h.id, "score": h.score, "metadata": h.metadata} for h in row]
                   for row in hits],
    }  # fmt: skip


def _load(bundle: Path, cache: Path, variant: str):
    from modalforge.predictor import MultimodalPredictor

    return MultimodalPredictor.load(bundle, cache_dir=cache, variant=variant)


def all_python_outputs(kind: str, bundle: Path, manifest: Path, cache: Path) -> dict[str, Any]:
    """``python_outputs`` of every variant the Python API loads, and its refusals (ONNX
    variants, an unknown variant)."""
    variants = manifest_json(bundle)["variants"]
    out = {"pytorch": python_outputs(kind, bundle, manifest, cache)}
    for v, spec in variants.items():
        if v == "pytorch":
            continue
        if spec["format"] in ("safetensors", "bundle"):
            out[v] = python_outputs(kind, bundle, manifest, cache, variant=v)
        else:  # the Python API refuses ONNX variants (Engine.from_bundle runs them)
            out[v] = _error(lambda v=v: _load(bundle, cache, v))
    if kind != "transcribe":
        out["load:unknown-variant"] = _error(lambda: _load(bundle, cache, "nope"))
    return out


def observe(section: str, kind: str, bundle: Path, manifest: Path, cache: Path,
            index: Path | None = None, variant: str | None = None) -> Any:  # fmt: skip
    """One section of ``expected.json`` for ``bundle``, scrubbed: ``fit``, ``bundle``,
    ``python``, ``http`` (of ``variant``) or ``index``. ``manifest``: the kind's held-out
    rows; ``cache``: a feature cache folder; ``index``: the index ``/v1/search`` serves."""
    if section == "fit":
        value: Any = fit_record(bundle)
    elif section == "bundle":
        value = {"record": bundle_record(bundle), "weights_sha256": weights_digest(bundle)}
    elif section == "python":
        value = all_python_outputs(kind, bundle, manifest, cache)
    elif section == "http":
        value = http_outputs(kind, bundle, variant or "pytorch", cache, index)
    elif section == "index":
        value = index_outputs(index, bundle, cache)  # type: ignore[arg-type]
    else:
        raise ValueError(f"no section {section!r}")
    paths = {str(manifest.parent): "<data>", str(bundle): "<bundle>", str(cache): "<cache>"}
    return scrub(value, paths)


def expected_for(kind: str, bundle: Path, manifest: Path, cache: Path,
                 index: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Everything recorded for one kind (``expected.json``)."""
    out: dict[str, Any] = {"kind": kind}
    for section in ("fit", "bundle", "python"):
        out[section] = observe(section, kind, bundle, manifest, cache, index)
    out["http"] = {v: observe("http", kind, bundle, manifest, cache, index, variant=v)
                   for v in manifest_json(bundle)["variants"]}  # fmt: skip
    if index is not None:
        out["index"] = observe("index", kind, bundle, manifest, cache, index)
    return out


# ============================================================================ main


def dump(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(kinds: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="modalforge-golden-") as tmp:
        tmp = Path(tmp)
        os.environ["MODALFORGE_CACHE"] = str(tmp / "mfcache")
        data = write_data(tmp / "data")
        for kind in kinds:
            start = time.perf_counter()
            print(f"{kind}: training", flush=True)
            work = tmp / "work" / kind
            bundle = train(kind, work)
            add_variants(kind, bundle, work, data[kind])
            target = GOLDEN / kind
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            shutil.copytree(bundle, target / "bundle")
            index = None
            if kind == "contrastive":
                index = build_index(target / "bundle", data[kind], target / "index", tmp / "c")
            print(f"{kind}: recording ({time.perf_counter() - start:.1f} s)", flush=True)
            expected = expected_for(kind, target / "bundle", data[kind], tmp / "cache" / kind,
                                    index)  # fmt: skip
            (target / "expected.json").write_text(dump(expected), encoding="utf-8")
            print(f"{kind}: done ({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    import torch

    torch.set_num_threads(THREADS)
    chosen = sys.argv[1:] or list(KINDS)
    unknown = sorted(set(chosen) - set(KINDS))
    if unknown:
        raise SystemExit(f"unknown kinds {unknown} (known: {list(KINDS)})")
    main(chosen)
    print(f"wrote {', '.join(chosen)} under {GOLDEN}")
