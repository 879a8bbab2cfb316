"""On-disk cache of a frozen encoder's pooled features.

One SQLite file per *namespace* = (encoder id, weights fingerprint, preprocessing); inside it one
row per *item key* = sha256 of the input's content (a file's bytes, a text's UTF-8). So a second
run, a fusion sweep or a cross-validation fold never re-encodes unchanged data, and a change of
encoder, weights, preprocessing or file content misses the cache by construction.

Several processes may fill one cache at once (the ranks of a DDP run, two runs sharing
``MODALFORGE_CACHE``): the one that misses takes the namespace's file lock, looks again, encodes
what is still missing and commits; the others wait on the lock and then find those rows. So each
item is encoded once, and SQLite's transactions keep the file whole whoever writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalforge.data.manifest import is_missing, resolve_path
from modalforge.encoders.base import Encoder
from modalforge.files import crash_point
from modalforge.schema import Modality


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    encode_seconds: float = 0.0  # time spent running the encoder on misses
    lookup_seconds: float = 0.0  # time spent hashing inputs and reading the cache


def namespace(encoder: Encoder, preprocessing: dict[str, Any] | None = None) -> str:
    from modalforge.encoders.base import weights_fingerprint

    # hashing ~100 MB of weights takes a while: a frozen encoder's fingerprint is kept
    fingerprint = getattr(encoder, "_fingerprint", None) if encoder.frozen else None
    if fingerprint is None:
        fingerprint = weights_fingerprint(encoder)
        if encoder.frozen:
            encoder._fingerprint = fingerprint  # type: ignore[attr-defined]
    payload = json.dumps(
        {"encoder": encoder.encoder_id, "weights": fingerprint,
         "preprocessing": preprocessing if preprocessing is not None else encoder.preprocessing},
        sort_keys=True, default=str,
    )  # fmt: skip
    return f"{encoder.encoder_id}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def content_key(modality: Modality, value: Any, root: Path | None) -> str:
    """sha256 of what the encoder will see: file bytes for file modalities, text otherwise."""
    if modality.is_file and not isinstance(value, bytes | bytearray):
        data = (
            resolve_path(root, value).read_bytes() if root is not None else Path(value).read_bytes()
        )
    elif isinstance(value, bytes | bytearray):
        data = bytes(value)
    else:
        data = str(value).encode("utf-8")
    return hashlib.sha256(modality.value.encode() + b"\x00" + data).hexdigest()


class FeatureCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stats: dict[str, CacheStats] = {}

    def _db(self, ns: str) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / f"{ns}.sqlite", timeout=60)
        db.execute(
            "CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, dim INTEGER, vec BLOB)"
        )
        return db

    def features(
        self,
        encoder: Encoder,
        modality: Modality,
        values: Sequence[Any],
        root: Path | None,
        encode_batch: Callable[[list[Any]], torch.Tensor],
        batch_size: int = 32,
        progress: bool = True,
        kind: str = "pooled",
        dim: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features ``(N, D)`` float32 for ``values`` and a presence mask ``(N,)``.

        Missing values get zero rows and mask False. ``encode_batch(values) -> (b, D)`` runs the
        encoder on raw values that missed the cache. Another ``kind`` of feature (``"grid"``:
        the flattened sequence a captioner attends over) is kept apart from the pooled ones and
        is ``dim`` wide.
        """
        ns = namespace(encoder) + ("" if kind == "pooled" else f".{kind}")
        stats = self.stats.setdefault(ns, CacheStats())
        t0 = time.perf_counter()
        present = torch.tensor([not is_missing(v) for v in values], dtype=torch.bool)
        keys = [
            content_key(modality, v, root) if p else None
            for v, p in zip(values, present, strict=True)
        ]
        wanted = sorted({k for k in keys if k is not None})
        found = self._lookup(ns, wanted)
        stats.lookup_seconds += time.perf_counter() - t0
        encoded = 0
        if len(found) < len(wanted):
            with self._lock(ns):  # another process may have encoded them while this one waited
                found.update(self._lookup(ns, [k for k in wanted if k not in found]))
                todo = [(k, v) for k, v in dict(zip(keys, values, strict=True)).items()
                        if k is not None and k not in found]  # fmt: skip
                if todo:
                    t0 = time.perf_counter()
                    new = self._encode(todo, encode_batch, batch_size, progress, encoder.name)
                    stats.encode_seconds += time.perf_counter() - t0
                    self._insert(ns, new)
                    found.update(new)
                    encoded = len(todo)
        stats.hits += len(wanted) - encoded
        stats.misses += encoded
        out = np.zeros((len(values), dim or encoder.output_dim), dtype=np.float32)
        for i, key in enumerate(keys):
            if key is not None:
                out[i] = found[key]
        return torch.from_numpy(out), present

    def _lookup(self, ns: str, wanted: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._db(ns) as db:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, dim, blob in db.execute(
                    f"SELECT key, dim, vec FROM features WHERE key IN ({marks})", chunk
                ):
                    found[key] = np.frombuffer(blob, dtype=np.float32, count=dim)
        return found

    def _insert(self, ns: str, new: dict[str, np.ndarray]) -> None:
        crash_point("cache.insert")
        # one transaction: a run killed before its commit leaves the cache as it was (SQLite's
        # journal rolls the half back), and the next run encodes those again
        with self._db(ns) as db:
            db.executemany(
                "INSERT OR REPLACE INTO features VALUES (?, ?, ?)",
                [(k, len(vec), vec.astype(np.float32).tobytes()) for k, vec in new.items()],
            )
            crash_point("cache.commit")

    @contextlib.contextmanager
    def _lock(self, ns: str):
        """The namespace's exclusive file lock (``flock``: released by the kernel if the holder
        dies, so a killed rank never leaves the others waiting)."""
        with open(self.root / f"{ns}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _encode(todo, encode_batch, batch_size, progress, name) -> dict[str, np.ndarray]:
        from rich.progress import Progress

        new: dict[str, np.ndarray] = {}
        with Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task(f"encoding with {name} (cache misses)", total=len(todo))
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                with torch.no_grad():
                    feats = encode_batch([v for _, v in chunk]).detach().float().cpu().numpy()
                for (key, _), vec in zip(chunk, feats, strict=True):
                    new[key] = vec
                bar.advance(task, len(chunk))
        return new
