"""Pieces shared by the dataset builders: build state, FLAC writes, a deterministic RNG."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import soundfile as sf

from modalforge.files import atomic_path, atomic_write_json, fsync_dir, sync_all

T = TypeVar("T")


def stable_rng(*parts: object) -> np.random.Generator:
    """A NumPy generator seeded from the parts' text (same parts -> same draws, on any machine)."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def write_flac(path: Path, wave: np.ndarray, sample_rate: int) -> None:
    """Write a mono float wave as 16-bit FLAC, atomically (an interrupted build leaves no stub)."""
    with atomic_path(path, durable=False) as tmp:  # write_meta syncs once for all of them
        sf.write(tmp, np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16", format="FLAC")


def is_up_to_date(out: Path, recipe: dict[str, Any], files: Callable[[], Iterable[Path]]) -> bool:
    """True when ``out/dataset.json`` was written for the same recipe and every file exists.
    The recipe is compared in its JSON form (tuples and lists compare equal)."""
    meta_path = out / "dataset.json"
    if not meta_path.is_file() or not (out / "manifest.csv").is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    same = meta.get("recipe") == json.loads(json.dumps(recipe))
    return same and all(p.is_file() for p in files())


def reuse_build(name: str, out: Path, recipe: dict[str, Any], file_columns: Iterable[str]):
    """The existing build in ``out`` as a ``BuildResult`` if it is up to date for ``recipe``
    (every file of ``file_columns`` present), else None."""
    import pandas as pd

    from modalforge.data.catalog import BuildResult

    manifest = out / "manifest.csv"

    def files():
        frame = pd.read_csv(manifest, keep_default_na=False)
        for column in file_columns:
            yield from (out / p for p in frame[column])

    if not is_up_to_date(out, recipe, files):
        return None
    return BuildResult(name, manifest, len(pd.read_csv(manifest, usecols=["id"])), 0.0, reused=True)


def start_build(out: Path, recipe: dict[str, Any], generated: Iterable[str]) -> None:
    """Record the recipe being built in ``out/.build.json``. If a different recipe was built or
    started there, its generated folders are removed first, so files made with other settings
    (another seed's voices) are never mistaken for finished work; an interrupted build of the
    same recipe keeps its files and resumes."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    marker = out / ".build.json"
    wanted = json.loads(json.dumps(recipe))
    previous = None
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = {}
    elif (out / "dataset.json").is_file():
        previous = {}  # built by an older modalforge: its recipe is unknown
    # dataset.json says "this build is complete" and manifest.csv lists its files: both go
    # before any file changes, so a build killed from here on is never taken (or read) for a
    # finished one, of this recipe or the last; both are written again at the end
    for done in ("dataset.json", "manifest.csv"):
        (out / done).unlink(missing_ok=True)
    fsync_dir(out)
    if previous is not None and previous != wanted:
        for name in generated:
            shutil.rmtree(out / name, ignore_errors=True)
    for name in generated:
        (out / name).mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, wanted)


def write_meta(out: Path, meta: dict[str, Any]) -> None:
    """``out/dataset.json``, the last file of a build: its presence marks the build complete,
    so the sample files (written without an fsync each) are flushed to disk first."""
    sync_all()
    atomic_write_json(out / "dataset.json", meta, point="data.meta", ensure_ascii=False)


def parallel_map(fn: Callable[[T], Any], items: list[T], description: str, workers: int) -> list:
    """Run ``fn`` over ``items`` in threads (subprocess / C work releases the GIL), with a bar."""
    from rich.progress import Progress

    results: list = [None] * len(items)
    if not items:
        return results
    with Progress(transient=True) as progress, ThreadPoolExecutor(max_workers=workers) as pool:
        task = progress.add_task(description, total=len(items))
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        try:
            for future in futures:
                results[futures[future]] = future.result()
                progress.advance(task)
        except BaseException:
            for future in futures:  # fail fast: do not run the rest of the queue
                future.cancel()
            raise
    return results


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
