"""Pieces shared by the dataset builders: build state, atomic writes, a deterministic RNG."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import soundfile as sf

T = TypeVar("T")


def cache_dir() -> Path:
    """Where downloaded package files are kept: $MODALFORGE_CACHE or ~/.cache/modalforge."""
    root = os.environ.get("MODALFORGE_CACHE") or Path.home() / ".cache" / "modalforge"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_rng(*parts: object) -> np.random.Generator:
    """A NumPy generator seeded from the parts' text (same parts -> same draws, on any machine)."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_flac(path: Path, wave: np.ndarray, sample_rate: int) -> None:
    """Write a mono float wave as 16-bit FLAC, atomically (an interrupted build leaves no stub)."""
    tmp = path.with_name(f".{path.stem}.tmp.flac")
    sf.write(tmp, np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16", format="FLAC")
    tmp.replace(path)


def is_up_to_date(out: Path, recipe: dict[str, Any], files: Callable[[], Iterable[Path]]) -> bool:
    """True when ``out/dataset.json`` was written for the same recipe and every file exists."""
    meta_path = out / "dataset.json"
    if not meta_path.is_file() or not (out / "manifest.csv").is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("recipe") == recipe and all(p.is_file() for p in files())


def write_meta(out: Path, meta: dict[str, Any]) -> None:
    tmp = out / ".dataset.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(out / "dataset.json")


def parallel_map(fn: Callable[[T], Any], items: list[T], description: str, workers: int) -> list:
    """Run ``fn`` over ``items`` in threads (subprocess / C work releases the GIL), with a bar."""
    from rich.progress import Progress

    results: list = [None] * len(items)
    if not items:
        return results
    with Progress(transient=True) as progress, ThreadPoolExecutor(max_workers=workers) as pool:
        task = progress.add_task(description, total=len(items))
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for future in futures:
            results[futures[future]] = future.result()
            progress.advance(task)
    return results


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
