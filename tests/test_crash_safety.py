"""SIGKILL the real CLI inside every artefact writer, then check what is on disk.

``MODALFORGE_CRASH_AT=POINT[:N]`` makes the process SIGKILL itself at the N-th pass through
:func:`modalforge.files.crash_point` ``POINT`` (between writing a temporary and renaming it, half
way through a checkpoint, mid-way through a dataset build, between a bundle's parts ...). After
each kill: the previous artefact is intact or there is none (loadable or absent, a leftover
temporary never taken for the real thing), ``train --resume`` continues from the last complete
checkpoint, a feature cache is complete or rebuilt, and a rerun succeeds. A few kills come from a
timer instead, at seeded random moments.

The commands run as ``modalforge ...`` in a child process forked from one interpreter that has
imported torch, Lightning and modalforge once (no torch op runs in it before the fork), so a
kill costs the command's own work, not eight seconds of imports; one case runs
``python -m modalforge.cli`` from scratch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import modalforge
from modalforge.bundle import load_bundle
from modalforge.files import sha256_file
from modalforge.index import EmbeddingIndex

from .conftest import write_toy_manifest

KILLED = -signal.SIGKILL
LIMIT_S = 300  # a command still running after this is killed and fails its test
# the children import this checkout's modalforge, wherever they run from
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(Path(modalforge.__file__).parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]
)}  # fmt: skip

# the fork server: reads one JSON request a line, forks, runs the CLI in the child with the
# request's cwd, environment and log file, and answers {"pid"} then {"rc"} (-9: SIGKILL)
SERVER = r"""
import json, os, sys, traceback
import torch, lightning, onnx, onnxruntime  # noqa: F401  (imported once, before any fork)
import modalforge.export, modalforge.index, modalforge.tasks.classification  # noqa: F401
import modalforge.tasks.contrastive  # noqa: F401
from modalforge.cli import app
answer = os.fdopen(os.dup(1), "w")
print("ready", file=answer, flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(request["cwd"])
            os.environ.pop("MODALFORGE_CRASH_AT", None)
            os.environ.update(request["env"])
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            torch.set_num_threads(1)
            try:
                app(args=request["args"], prog_name="modalforge")
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), file=answer, flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), file=answer, flush=True)
"""


@dataclass
class Done:
    rc: int
    log: str
    seconds: float


class Cli:
    """``modalforge ARGS`` in a forked child; ``crash`` sets MODALFORGE_CRASH_AT, ``kill_after``
    SIGKILLs the child from here after that many seconds."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "mfcache"
        self.runs = 0
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=root,
                                     env=ENV)  # fmt: skip
        assert self.proc.stdout.readline().strip() == "ready"

    def __call__(self, *args: str | Path, crash: str | None = None, cache: Path | None = None,
                 kill_after: float | None = None, ok: bool = True) -> Done:  # fmt: skip
        self.runs += 1
        log = self.root / f"run-{self.runs}.log"
        env = {"MODALFORGE_CACHE": str(cache or self.cache)}
        if crash:
            env["MODALFORGE_CRASH_AT"] = crash
        request = {"args": [str(a) for a in args], "env": env, "cwd": str(self.root),
                   "log": str(log)}  # fmt: skip
        t0 = time.perf_counter()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        timers = [threading.Timer(LIMIT_S, os.kill, (pid, signal.SIGKILL))]  # a hung child
        if kill_after is not None:
            timers.append(threading.Timer(kill_after, os.kill, (pid, signal.SIGKILL)))
        for timer in timers:
            timer.start()
        rc = json.loads(self.proc.stdout.readline())["rc"]
        for timer in timers:
            timer.cancel()
        done = Done(rc, log.read_text(errors="replace"), time.perf_counter() - t0)
        assert done.seconds < LIMIT_S, f"{args} ran for over {LIMIT_S} s: killed\n{done.log}"
        if crash:  # the point must have been reached: a kill point that never fires tests nothing
            assert done.rc == KILLED, f"{args} did not die at {crash}: rc {done.rc}\n{done.log}"
        elif ok and kill_after is None:
            assert done.rc == 0, f"{args} failed: rc {done.rc}\n{done.log[-3000:]}"
        return done

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    runner = Cli(tmp_path_factory.mktemp("crash"))
    yield runner
    runner.close()


TRAIN = {
    "label": "label",
    "encoders": {"image": "cnn", "text": "bag_of_embeddings"},
    "encoder_kwargs": {"image": {"widths": [8, 16], "image_size": 30}, "text": {"embed_dim": 16}},
    "columns": ["image", "text"],
    "schema": {"image": "image?", "text": "text?", "label": "label"},  # ONNX export: optional
    "finetune": {"image": "frozen"},  # a frozen encoder: its features go through the cache
    "fusion_out_dim": 16,
    "epochs": 5,
    "batch_size": 8,
    "patience": 100,
}


@pytest.fixture(scope="module")
def toy(cli) -> Path:
    return write_toy_manifest(cli.root, inputs=("image", "text"))


def config(cli, toy, out: Path, **over) -> Path:
    path = out.with_name(out.name + ".yaml")
    path.write_text(yaml.safe_dump({**TRAIN, **over, "manifest": str(toy), "out": str(out)}))
    return path


@pytest.fixture(scope="module")
def trained(cli, toy) -> Path:
    """A finished run (checkpoints, report, bundle): the previous artefacts of later kills."""
    out = cli.root / "trained"
    cli("train", "--config", config(cli, toy, out))
    return out


# -- what a sound state is -------------------------------------------------------------------


def visible(folder: Path) -> list[str]:
    """Names a reader would take for real files: hidden temporaries are not."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def ckpt_epoch(path: Path) -> int | None:
    """The epoch of a checkpoint that must be whole if it is there; None if absent."""
    if not path.exists():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])


def assert_checkpoints_whole(run: Path) -> None:
    folder = run / "checkpoints"
    if folder.is_dir():
        for name in visible(folder):
            ckpt_epoch(folder / name)  # loads, or the test fails here


def bundle_state(path: Path) -> dict[str, str] | None:
    """None when there is no bundle; else it must load and verify: its files' sha256."""
    if not path.exists():
        return None
    bundle = load_bundle(path, verify=True)
    return {name: entry["sha256"] for name, entry in bundle.files.items()}


def history(run: Path) -> dict:
    return json.loads((run / "history.json").read_text())


# -- train: checkpoints and resume -----------------------------------------------------------


def test_train_killed_while_checkpointing_resumes_from_the_last_whole_checkpoint(cli, toy):
    """Four processes, three kills inside checkpoint writes (half a temporary, a full one not yet
    renamed, just renamed); each --resume continues from the last checkpoint that is whole."""
    run = cli.root / "ckpt"
    cfg = config(cli, toy, run)
    # epoch 1's last.ckpt half written: epoch 0's is what is there
    cli("train", "--config", cfg, crash="checkpoint.last.partial:2")
    assert_checkpoints_whole(run)
    assert ckpt_epoch(run / "checkpoints" / "last.ckpt") == 0
    assert any(p.name.startswith(".last.ckpt.tmp-") for p in (run / "checkpoints").iterdir())
    assert not (run / "history.json").exists() and not (run / "bundle").exists()
    # resumed from 0: epoch 1 saved, epoch 2's complete in its temporary but not renamed
    cli("train", "--config", cfg, "--resume", crash="checkpoint.last.rename:2")
    assert_checkpoints_whole(run)
    assert ckpt_epoch(run / "checkpoints" / "last.ckpt") == 1
    # resumed from 1: killed just after epoch 2's checkpoint was renamed into place
    cli("train", "--config", cfg, "--resume", crash="checkpoint.last.saved:1")
    assert ckpt_epoch(run / "checkpoints" / "last.ckpt") == 2
    cli("train", "--config", cfg, "--resume")
    got = history(run)
    assert got["resumed_from_epoch"] == 2 and got["epochs_run"] == TRAIN["epochs"]
    assert ckpt_epoch(run / "checkpoints" / "last.ckpt") == TRAIN["epochs"] - 1
    # the killed writers' temporaries were cleared by the next save in that folder
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert bundle_state(run / "bundle") is not None


def test_train_killed_before_any_checkpoint_starts_clean(cli, toy):
    run = cli.root / "ckpt0"
    cfg = config(cli, toy, run, epochs=2)
    cli("train", "--config", cfg, crash="checkpoint.best.partial:1")  # epoch 0's first save
    assert_checkpoints_whole(run)
    assert ckpt_epoch(run / "checkpoints" / "last.ckpt") is None
    assert visible(run / "checkpoints") == []
    cli("train", "--config", cfg, "--resume")  # nothing to resume: a clean start
    assert history(run)["resumed_from_epoch"] is None and history(run)["epochs_run"] == 2


def test_resume_from_a_damaged_checkpoint_is_a_clear_error(cli, toy, tmp_path):
    """Not one modalforge writes (its checkpoints are atomic), but one copied in half."""
    run = tmp_path / "damaged"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 half a zip")
    done = cli("train", "--config", config(cli, toy, run), "--resume", ok=False)
    assert done.rc == 1 and "last.ckpt: cannot read this checkpoint" in done.log.replace("\n", "")


# -- train: the feature cache ----------------------------------------------------------------


def cache_rows(cache: Path) -> int:
    total = 0
    for db in (cache / "features").glob("*.sqlite"):
        with sqlite3.connect(db) as con:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            total += con.execute("SELECT COUNT(*) FROM features").fetchone()[0]
    return total


@pytest.mark.parametrize("point", ["cache.insert", "cache.commit"])
def test_feature_cache_is_complete_or_rebuilt(cli, toy, point):
    """Killed after encoding (before the insert, or inside its transaction): the cache holds
    none of those rows; the rerun encodes them again, and the run after that hits them all."""
    run, cache = cli.root / f"cache-{point}", cli.root / f"mfcache-{point}"
    cfg = config(cli, toy, run, epochs=1)
    cli("train", "--config", cfg, crash=point, cache=cache)
    assert cache_rows(cache) == 0  # the transaction never committed: rolled back
    cli("train", "--config", cfg, cache=cache)
    (stats,) = history(run)["cache"].values()
    # training encoded every distinct input again (evaluation adds the test rows' after)
    assert stats["misses"] > 0 and cache_rows(cache) >= stats["misses"]
    cli("train", "--config", cfg, cache=cache)
    (again,) = history(run)["cache"].values()
    assert again["misses"] == 0 and again["hits"] == stats["misses"] + stats["hits"]


# -- train: report, bundle and summary -------------------------------------------------------


def test_train_outputs_are_whole_or_absent_after_a_kill(cli, toy):
    """Killed while writing the report, the bundle's weights, before the finished bundle folder
    is renamed in: no bundle (a hidden temporary at most), checkpoints whole; the rerun
    succeeds and clears the dead writers' temporaries."""
    run = cli.root / "outputs"
    cfg = config(cli, toy, run, epochs=2)
    for point in ("report.rename", "bundle.weights", "bundle.rename"):
        cli("train", "--config", cfg, crash=point)
        assert bundle_state(run / "bundle") is None
        assert not (run / "summary.json").exists()
        assert_checkpoints_whole(run)
        if point == "report.rename":
            assert not (run / "report" / "metrics.json").exists()
        else:  # the report was finished before the bundle
            json.loads((run / "report" / "metrics.json").read_text())
            assert any(p.name.startswith(".bundle.tmp-") for p in run.iterdir())
    cli("train", "--config", cfg)
    assert bundle_state(run / "bundle") is not None
    assert json.loads((run / "summary.json").read_text())["bundle"] == str(run / "bundle")
    assert not [p for p in run.iterdir() if p.name.startswith(".bundle.")]


def test_retraining_over_a_bundle_keeps_the_old_one_until_the_new_one_is_whole(cli, toy, trained):
    run = cli.root / "retrain"
    shutil.copytree(trained, run)
    cfg = config(cli, toy, run, epochs=2, seed=1)  # another seed: other weights
    before = bundle_state(run / "bundle")
    cli("train", "--config", cfg, crash="bundle.swap")  # the new bundle complete, not swapped
    assert bundle_state(run / "bundle") == before
    cli("train", "--config", cfg, crash="summary.rename")  # swapped in; summary not written
    after = bundle_state(run / "bundle")
    assert after is not None and after != before
    assert not [p for p in run.iterdir() if p.name.startswith(".bundle.")]


# -- export: variants added to a bundle ------------------------------------------------------


def export_args(bundle: Path, toy: Path, *extra: str) -> list:
    return ["export", bundle, "--manifest", toy, "--split", "", "--max-rows", "12", *extra]


PRUNE = ("--prune", "0.3", "--finetune-epochs", "1", "--max-f1-drop", "1")
# the replacement prunes more: other bytes under the same file names
REPRUNE = ("--prune", "0.6", "--finetune-epochs", "1", "--max-f1-drop", "1", "--overwrite")


def test_onnx_export_killed_before_its_files_are_in_leaves_the_bundle_as_it_was(cli, toy, trained):
    bundle = cli.root / "onnx-bundle"
    shutil.copytree(trained / "bundle", bundle)
    before = bundle_state(bundle)
    cli(*export_args(bundle, toy), crash="variant.staged")  # graphs written and checked
    assert bundle_state(bundle) == before
    assert set(load_bundle(bundle).variants) == {"pytorch"}


def test_pruned_variant_old_none_or_new_after_each_kill(cli, toy, trained):
    """A new variant killed with its files renamed in but the manifest not updated; replacing
    it (--overwrite) killed at the manifest that first drops the old one, with the new files in,
    and half way through the final manifest. The bundle verifies after every kill, and holds
    the old variant, none, or the new one."""
    bundle = cli.root / "prune-bundle"
    shutil.copytree(trained / "bundle", bundle)
    base = bundle_state(bundle)
    cli(*export_args(bundle, toy, *PRUNE), crash="variant.files")
    assert bundle_state(bundle) == base  # the stray files are listed nowhere
    assert (bundle / "pruned" / "model.safetensors").is_file()
    cli(*export_args(bundle, toy, *PRUNE))
    first = bundle_state(bundle)
    assert "pruned" in load_bundle(bundle).variants and first != base
    cli(*export_args(bundle, toy, *REPRUNE), crash="variant.manifest.rename:1")
    assert bundle_state(bundle) == first  # the old variant, whole
    cli(*export_args(bundle, toy, *REPRUNE), crash="variant.files")
    assert bundle_state(bundle) == base  # no variant: never a manifest naming the wrong bytes
    # no variant to drop now: the one manifest written is the final one, killed half written
    cli(*export_args(bundle, toy, *REPRUNE), crash="variant.manifest.partial:1")
    assert bundle_state(bundle) == base
    cli(*export_args(bundle, toy, *REPRUNE))
    last = bundle_state(bundle)
    assert load_bundle(bundle).variants["pruned"]["pruning"]["amount"] == 0.6
    assert last.keys() == first.keys() and last != first
    for folder in (bundle, bundle / "pruned"):  # dead writers' temporaries cleared
        assert not [p for p in folder.iterdir() if p.name.startswith(".")]


# -- index build -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(cli, toy) -> Path:
    out = cli.root / "clip"
    cfg = config(cli, toy, out, pairs=["image:text"], embed_dim=16, epochs=2, finetune=None,
                 task="contrastive", schema=None)  # fmt: skip
    cli("train", "--config", cfg)
    return out / "bundle"


def index_state(path: Path) -> tuple | None:
    if not path.exists():
        return None
    index = EmbeddingIndex.load(path)  # raises on a partial or inconsistent folder
    return len(index), index.info["manifest"], sha256_file(path / "vectors.npy")


@pytest.mark.parametrize("point", ["index.write", "index.vectors", "index.rename"])
def test_index_build_killed_leaves_no_index(cli, toy, clip, point):
    out = cli.root / f"idx-{point.replace('.', '-')}"
    cli("index", "build", clip, "--manifest", toy, "--out", out, crash=point)
    assert index_state(out) is None
    cli("index", "build", clip, "--manifest", toy, "--out", out)
    assert index_state(out)[0] == 60
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_index_rebuild_killed_keeps_the_old_index(cli, toy, clip):
    out = cli.root / "idx-swap"
    half = toy.with_name("half.csv")
    half.write_text("".join(toy.read_text().splitlines(keepends=True)[:31]))  # 30 rows
    cli("index", "build", clip, "--manifest", half, "--out", out)
    old = index_state(out)
    cli("index", "build", clip, "--manifest", toy, "--out", out, "--overwrite",
        crash="index.swap")  # fmt: skip
    assert index_state(out) == old and old[0] == 30
    # the same kill in a fresh interpreter: python -m modalforge.cli, as a user runs it
    env = {**ENV, "MODALFORGE_CACHE": str(cli.cache), "MODALFORGE_CRASH_AT": "index.swap"}
    proc = subprocess.run([sys.executable, "-m", "modalforge.cli", "index", "build", str(clip),
                           "--manifest", str(toy), "--out", str(out), "--overwrite"], env=env,
                          capture_output=True, timeout=300)  # fmt: skip
    assert proc.returncode == KILLED, proc.stderr.decode()[-2000:]
    assert index_state(out) == old
    cli("index", "build", clip, "--manifest", toy, "--out", out, "--overwrite")
    assert index_state(out)[0] == 60


# -- kills at random moments -----------------------------------------------------------------


def test_kills_at_random_moments_leave_whole_artefacts(cli, toy, clip):
    """A timer, not a crash point: train (again over a finished run) and index build
    --overwrite, killed at seeded random moments of their run time; then everything on disk is
    whole and --resume / a rerun finishes."""
    rng = random.Random(18)
    run = cli.root / "random"
    cfg = config(cli, toy, run, epochs=4)
    took = cli("train", "--config", cfg).seconds
    for _ in range(3):
        done = cli("train", "--config", cfg, kill_after=rng.uniform(0.1, took))
        assert done.rc in (0, KILLED)
        assert_checkpoints_whole(run)
        bundle_state(run / "bundle")  # absent or whole
        if (run / "summary.json").exists():
            json.loads((run / "summary.json").read_text())
    cli("train", "--config", cfg, "--resume")
    assert ckpt_epoch(run / "checkpoints" / "last.ckpt") == 3
    out = cli.root / "idx-random"
    took = cli("index", "build", clip, "--manifest", toy, "--out", out).seconds
    for _ in range(3):
        done = cli("index", "build", clip, "--manifest", toy, "--out", out, "--overwrite",
                   kill_after=rng.uniform(0.05, took))  # fmt: skip
        assert done.rc in (0, KILLED) and index_state(out)[0] == 60


# -- data build ------------------------------------------------------------------------------


def _has_speech() -> bool:
    from modalforge.data.catalog import avdigits

    return shutil.which("espeak-ng") is not None and avdigits.ASTERISK_DIR.is_dir()


def assert_dataset(out: Path, rows: int) -> None:
    import pandas as pd
    import soundfile as sf
    from PIL import Image

    meta = json.loads((out / "dataset.json").read_text())
    frame = pd.read_csv(out / "manifest.csv", dtype=str)
    assert meta["rows"] == len(frame) == rows
    for image, audio in zip(frame["image"], frame["audio"], strict=True):
        with Image.open(out / image) as img:
            img.load()
        assert len(sf.read(out / audio)[0]) > 0


@pytest.mark.system
@pytest.mark.skipif(not _has_speech(), reason="needs espeak-ng and asterisk sounds (make install)")
def test_data_build_killed_is_never_taken_for_a_finished_build(cli):
    """Killed mid-way through the samples, before the manifest is renamed in, before
    dataset.json is: no dataset.json (the mark of a finished build) and each file there whole;
    then a rebuild with another seed killed mid-way leaves no sign of the old build either, so
    the old seed's rerun builds again instead of reusing mixed files."""
    out = cli.root / "avdigits"
    build = ("data", "build", "avdigits", "--out", out, "--limit", "6", "--workers", "2")
    for point in ("data.sample:3", "manifest.rename", "data.meta.rename"):
        cli(*build, crash=point)
        assert not (out / "dataset.json").exists()
        if point != "data.meta.rename":
            assert not (out / "manifest.csv").exists()
        for file in [*(out / "images").glob("*.png"), *(out / "audio").glob("*.flac")]:
            assert file.stat().st_size > 0
    assert "built avdigits: 6 rows" in cli(*build).log
    assert_dataset(out, 6)
    stamp = (out / "dataset.json").read_bytes()
    cli(*build, "--seed", "1", crash="data.sample:2")
    assert not (out / "dataset.json").exists() and not (out / "manifest.csv").exists()
    assert "built avdigits: 6 rows" in cli(*build).log  # rebuilt, not "up to date"
    assert_dataset(out, 6)
    assert (out / "dataset.json").read_bytes() == stamp


# -- modalforge.files itself ----------------------------------------------------------------


def test_crash_point_fires_on_the_nth_pass_only():
    code = ("from modalforge.files import crash_point\n"
            "for i in range(5):\n"
            "    crash_point('other'); crash_point('here'); print(i, flush=True)\n")  # fmt: skip
    for wanted, printed in (("here", ""), ("here:3", "0\n1\n"), ("nowhere", "0\n1\n2\n3\n4\n")):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**ENV, "MODALFORGE_CRASH_AT": wanted}, timeout=60)  # fmt: skip
        assert proc.stdout == printed
        assert proc.returncode == (0 if wanted == "nowhere" else KILLED)


def test_atomic_writes_leave_the_old_file_on_error_and_no_temporary(tmp_path):
    from modalforge.files import atomic_path, atomic_write_json

    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(OSError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("{half")
        raise OSError("disk full")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_dir_swaps_a_whole_folder_and_clears_dead_writers_temporaries(tmp_path):
    from modalforge.files import atomic_dir, remove_stale_temps, temp_name

    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("old")
    dead = tmp_path / ".out.tmp-999999999-0123abcd"  # no such pid
    dead.mkdir()
    live = temp_name(target)  # this process: still writing
    live.write_text("")
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "x").write_text("new, never finished")
        raise ValueError
    assert (target / "x").read_text() == "old" and not dead.exists() and live.exists()
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("new")
    assert (target / "x").read_text() == "new"
    assert remove_stale_temps(tmp_path) == []  # the live one is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])


# -- the harness as a whole ------------------------------------------------------------------

POINTS = [
    "checkpoint.last.partial", "checkpoint.last.rename", "checkpoint.last.saved",
    "checkpoint.best.partial", "cache.insert", "cache.commit", "report.rename", "bundle.weights",
    "bundle.rename", "bundle.swap", "summary.rename", "variant.staged", "variant.files",
    "variant.files (overwrite)", "variant.manifest.rename", "variant.manifest.partial",
    "index.write", "index.vectors", "index.rename", "index.swap", "index.swap (fresh python)",
    "data.sample", "manifest.rename", "data.meta.rename", "data.sample (other seed)",
]  # fmt: skip


def test_the_harness_kills_at_twenty_points_or_more():
    assert len(POINTS) == len(set(POINTS)) >= 20
    # twenty without the data build, which needs espeak-ng (skipped where it is missing)
    assert len([p for p in POINTS if not p.startswith(("data.", "manifest."))]) >= 20
