"""An embedding index: nearest-neighbour search over vectors with ids and metadata, on disk.

Contrastive models (image / text / audio towers projected into one space) are used for retrieval:
embed a catalogue once, then find the rows nearest to a query embedding. :class:`EmbeddingIndex`
holds the catalogue's ids, vectors and per-row metadata (caption, category, image path, ...) and
searches it two ways:

* ``"exact"`` — a chunked matrix product over all rows, so memory stays bounded whatever the
  size; exact and fast enough below a few tens of thousands of rows;
* ``"hnsw"`` — an approximate HNSW graph (faiss ``IndexHNSWFlat``, inner product); sub-linear,
  with recall below 1 traded for speed on large catalogues.

``kind="auto"`` (the default) picks exact below ``exact_threshold`` rows and HNSW from there on.
The defaults come from ``benchmarks/index.py`` (100,000 vectors, d = 256, one thread): exact
search of one query takes 0.7 ms at 20,000 float32 rows, 2.0 ms at 50,000 and 4.1 ms at 100,000,
while a float16 store pays a conversion per call (7.4 ms at 20,000); so HNSW takes over at
50,000 float32 rows or 12,000 float16 ones. faiss HNSW (M = 32, efSearch = 128) reached
recall@10 1.0 on clustered vectors; hnswlib at the same settings gave the same recall and speed,
IVF needs training and fits a growing index badly; efConstruction 100 instead of 200 built 27-57 %
faster at the same recall on clustered data. On random vectors no approximate method beats exact
search (recall <= 0.62): such data has no near neighbours.

``metric="cosine"`` L2-normalizes vectors when they are added and queries when they are searched,
so the inner product is the cosine similarity; ``metric="ip"`` keeps the raw inner product.
``dtype="float16"`` halves the memory and disk of the stored vectors (search still computes in
float32; the HNSW graph keeps its own float32 copy, as faiss' flat storage needs).

A saved index is a folder: ``index.json`` (ids, metadata, settings, counts, ``info`` such as the
model bundle that made the vectors), ``vectors.npy`` (``np.save`` without pickles) and, for HNSW,
``hnsw.faiss`` (faiss' own binary format). Nothing is pickled, and :meth:`EmbeddingIndex.load`
checks that the three files agree before trusting them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from modalforge.files import atomic_dir, crash_point

INDEX_FORMAT_VERSION = 1
MANIFEST_NAME = "index.json"
VECTORS_NAME = "vectors.npy"
HNSW_NAME = "hnsw.faiss"

Kind = Literal["exact", "hnsw", "auto"]
Metric = Literal["cosine", "ip"]
StoreDtype = Literal["float32", "float16"]

_KINDS = ("exact", "hnsw", "auto")
_METRICS = ("cosine", "ip")
_DTYPES = ("float32", "float16")
#: score-matrix elements computed at once by exact search (64 MiB of float32)
_EXACT_CHUNK_ELEMENTS = 1 << 24


class Hit(NamedTuple):
    """One search result; unpacks as ``(id, score, metadata)``."""

    id: str
    score: float
    metadata: dict[str, Any]


class EmbeddingIndex:
    """Vectors with string ids and JSON metadata, searchable exactly or with HNSW.

    Args:
        ids: one unique string per row.
        vectors: ``(N, D)`` float array (``N`` may be 0).
        metadata: one JSON-safe dict per row (``None``: empty dicts).
        dtype: how vectors are stored, ``"float32"`` or ``"float16"``.
        metric: ``"cosine"`` (rows and queries L2-normalized) or ``"ip"`` (raw inner product).
        kind: ``"exact"``, ``"hnsw"`` or ``"auto"`` (HNSW from ``exact_threshold`` rows on).
        exact_threshold: the row count from which ``kind="auto"`` uses HNSW (default: 50,000
            for float32, 12,000 for float16 stores; see the module docstring).
        hnsw_m: HNSW graph degree (faiss ``M``): higher is more accurate, larger and slower.
        ef_construction: HNSW build beam width: higher builds a better graph, slower.
        ef_search: HNSW search beam width (raised to ``k`` when ``k`` is larger).
        info: JSON-safe facts stored with the index, e.g. the model bundle that made the vectors.
    """

    def __init__(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        *,
        dtype: StoreDtype = "float32",
        metric: Metric = "cosine",
        kind: Kind = "auto",
        exact_threshold: int | None = None,
        hnsw_m: int = 32,
        ef_construction: int = 100,
        ef_search: int = 128,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        _check_choice("dtype", dtype, _DTYPES)
        _check_choice("metric", metric, _METRICS)
        _check_choice("kind", kind, _KINDS)
        if exact_threshold is None:
            exact_threshold = 50_000 if dtype == "float32" else 12_000
        for name, value in (
            ("exact_threshold", exact_threshold),
            ("hnsw_m", hnsw_m),
            ("ef_construction", ef_construction),
            ("ef_search", ef_search),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        vecs = _as_matrix(vectors, "vectors")
        self.dtype: StoreDtype = dtype
        self.metric: Metric = metric
        self.kind: Kind = kind
        self.exact_threshold = exact_threshold
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.info: dict[str, Any] = _json_copy(dict(info or {}), "info")
        self.dim = int(vecs.shape[1])
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._metadata: list[dict[str, Any]] = []
        self._vectors = np.zeros((0, self.dim), dtype=dtype)
        self._hnsw: Any = None  # a faiss.IndexHNSWFlat while backend == "hnsw"
        self.add(ids, vecs, metadata)

    # -- facts -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def vectors(self) -> np.ndarray:
        """The stored ``(N, D)`` vectors (normalized under cosine), in the storage dtype."""
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    @property
    def backend(self) -> Literal["exact", "hnsw"]:
        """The search actually used: ``kind``, with ``"auto"`` resolved by the row count."""
        if self.kind == "auto":
            return "hnsw" if len(self) >= self.exact_threshold else "exact"
        return self.kind

    @property
    def params(self) -> dict[str, int]:
        return {
            "exact_threshold": self.exact_threshold,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
        }

    def __repr__(self) -> str:
        return (
            f"EmbeddingIndex({len(self)} × {self.dim}, {self.dtype}, metric={self.metric!r}, "
            f"backend={self.backend!r})"
        )

    # -- growing -----------------------------------------------------------------------------
    def add(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Append rows. Ids already in the index (or repeated in ``ids``) are refused."""
        vecs = _as_matrix(vectors, "vectors")
        if vecs.shape[1] != self.dim:
            raise ValueError(f"vectors have {vecs.shape[1]} dims, index has {self.dim}")
        new_ids = _check_ids(ids, vecs.shape[0], existing=self._pos)
        meta = _check_metadata(metadata, len(new_ids))
        if self.metric == "cosine":
            vecs = _normalize(vecs, "vectors")
        stored = vecs.astype(self.dtype)
        # commit only after every check passed, so a refused add leaves the index unchanged
        start = len(self._ids)
        self._vectors = np.concatenate([self._vectors, stored])
        self._ids.extend(new_ids)
        self._pos.update((id_, start + i) for i, id_ in enumerate(new_ids))
        self._metadata.extend(meta)
        self._sync_hnsw(start)

    def _sync_hnsw(self, start: int) -> None:
        """Keep the HNSW graph in step with the rows after ``start`` were added."""
        if self.backend != "hnsw":
            self._hnsw = None
        elif self._hnsw is None:
            # first time HNSW is needed ("auto" crossed the threshold): build over every row
            self._hnsw = self._new_hnsw()
            self._hnsw.add(self._vectors.astype(np.float32))
        elif start < len(self):
            # HNSW supports appending: new nodes are linked into the existing graph
            self._hnsw.add(self._vectors[start:].astype(np.float32))

    def _new_hnsw(self) -> Any:
        faiss = _faiss()
        index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self.ef_search
        return index

    # -- searching ---------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The ``k`` best rows for each query, best first: one list of :class:`Hit` per query.

        ``queries`` is ``(Q, D)`` or one ``(D,)`` vector (still answered as a list of one list).
        Fewer than ``k`` hits come back when the index has fewer rows.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = self._prepare_queries(queries)
        rows, scores = self.search_arrays(q, k, prepared=True)
        return [
            [
                Hit(self._ids[j], float(s), dict(self._metadata[j]))
                for j, s in zip(r, sc, strict=True)
                if j >= 0
            ]
            for r, sc in zip(rows, scores, strict=True)
        ]

    def search_arrays(
        self, queries: np.ndarray, k: int = 10, *, prepared: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` but returns ``(rows, scores)``, both ``(Q, min(k, N))``.

        ``rows`` are int64 row positions (``-1`` where HNSW found fewer than ``k``), ``scores``
        float32. For evaluation loops that do not need ids and metadata.
        """
        q = queries if prepared else self._prepare_queries(queries)
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
        if self.backend == "hnsw":
            return self._search_hnsw(q, k)
        return _exact_top_k(q, self._vectors, k)

    def _prepare_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        q = _as_matrix(q, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"query has {q.shape[1]} dims, index has {self.dim}")
        if self.metric == "cosine":
            q = _normalize(q, "queries")
        return np.ascontiguousarray(q, dtype=np.float32)

    def _search_hnsw(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        # the beam must be at least k wide to return k results; passed per call so concurrent
        # searches with different k do not race on index.hnsw.efSearch
        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
        scores, rows = self._hnsw.search(q, k, params=params)
        return rows.astype(np.int64), scores.astype(np.float32)

    # -- saving and loading ------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the index folder at ``path`` (atomically: built aside, then renamed in).

        An existing ``path`` is replaced only with ``overwrite=True`` and only if it is an index
        folder (holds ``index.json``) or empty, so a wrong path cannot wipe unrelated files.
        """
        target = Path(path)
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
            if not target.is_dir() or (
                any(target.iterdir()) and not (target / MANIFEST_NAME).is_file()
            ):
                raise FileExistsError(f"{target} exists and is not an embedding index folder")
        with atomic_dir(target, point="index") as tmp:
            self._write_files(tmp)
        return target

    def _write_files(self, folder: Path) -> None:
        np.save(folder / VECTORS_NAME, self._vectors, allow_pickle=False)
        crash_point("index.vectors")
        if self._hnsw is not None:
            _faiss().write_index(self._hnsw, str(folder / HNSW_NAME))
        manifest = {
            "format_version": INDEX_FORMAT_VERSION,
            "count": len(self),
            "dim": self.dim,
            "dtype": self.dtype,
            "metric": self.metric,
            "kind": self.kind,
            "backend": self.backend,
            "params": self.params,
            "info": self.info,
            "ids": self._ids,
            "metadata": self._metadata,
        }
        text = json.dumps(manifest, ensure_ascii=False, allow_nan=False, indent=1)
        (folder / MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EmbeddingIndex:
        """Read a folder written by :meth:`save`; ``ValueError`` naming the file when the files
        disagree (counts, shapes, dtype, metric) or one is missing or unreadable."""
        folder = Path(path)
        manifest_path = folder / MANIFEST_NAME
        m = _read_manifest(manifest_path)
        vectors = _read_vectors(folder / VECTORS_NAME, m)
        params = m["params"]
        index = cls(
            [],
            np.zeros((0, m["dim"]), np.float32),
            dtype=m["dtype"],
            metric=m["metric"],
            kind=m["kind"],
            exact_threshold=params["exact_threshold"],
            hnsw_m=params["hnsw_m"],
            ef_construction=params["ef_construction"],
            ef_search=params["ef_search"],
            info=m["info"],
        )
        ids = _check_ids(m["ids"], m["count"], existing={}, where=manifest_path)
        index._ids = ids
        index._pos = {id_: i for i, id_ in enumerate(ids)}
        index._metadata = _check_metadata(m["metadata"], m["count"], where=manifest_path)
        # stored vectors are used as saved: re-normalizing could change float16 rows by an ulp
        index._vectors = vectors
        if index.backend != m["backend"]:
            raise ValueError(
                f"{manifest_path}: backend {m['backend']!r} does not follow from kind "
                f"{m['kind']!r} with {m['count']} rows"
            )
        if index.backend == "hnsw":
            index._hnsw = _read_hnsw(folder / HNSW_NAME, m, vectors)
        return index


# -- exact search ----------------------------------------------------------------------------


def _exact_top_k(q: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product, in (query, row) chunks of bounded size.

    Each row chunk's own top-k is merged into a running top-k, so memory is
    ``O(chunk + Q·k)`` whatever ``N``. Ties are ordered by row position.
    """
    n = len(vectors)
    row_chunk = max(k, min(n, _EXACT_CHUNK_ELEMENTS // 1024))
    q_chunk = max(1, _EXACT_CHUNK_ELEMENTS // row_chunk)
    out_rows = np.empty((len(q), k), np.int64)
    out_scores = np.empty((len(q), k), np.float32)
    for qs in range(0, len(q), q_chunk):
        qb = q[qs : qs + q_chunk]
        best_rows = np.zeros((len(qb), 0), np.int64)
        best_scores = np.zeros((len(qb), 0), np.float32)
        for rs in range(0, n, row_chunk):
            block = vectors[rs : rs + row_chunk].astype(np.float32, copy=False)
            s = qb @ block.T
            kk = min(k, s.shape[1])
            top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            best_rows = np.concatenate([best_rows, top + rs], axis=1)
            best_scores = np.concatenate([best_scores, np.take_along_axis(s, top, 1)], axis=1)
            best_rows, best_scores = _sorted_top(best_rows, best_scores, k)
        out_rows[qs : qs + len(qb)] = best_rows
        out_scores[qs : qs + len(qb)] = best_scores
    return out_rows, out_scores


def _sorted_top(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the ``k`` best (rows, scores), score descending, then row ascending."""
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)


# -- checks ----------------------------------------------------------------------------------


def _faiss() -> Any:
    # imported on first use: exact-only callers (tests, small catalogues) never load faiss
    import faiss

    return faiss


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _as_matrix(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a (N, D) matrix with D > 0, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} hold NaN or infinite values (or overflow float32)")
    return a


def _normalize(a: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        # a zero embedding has no direction: its cosine to everything is undefined
        raise ValueError(f"{name} row {int(zero[0])} is all zeros; cosine needs a direction")
    return a / norms


def _check_ids(
    ids: Any, n: int, *, existing: Mapping[str, int], where: Path | None = None
) -> list[str]:
    prefix = f"{where}: " if where else ""
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise ValueError(f"{prefix}ids must be a list of strings")
    ids = list(ids)
    if len(ids) != n:
        raise ValueError(f"{prefix}{len(ids)} ids for {n} vectors")
    if not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{prefix}ids must be strings")
    seen: set[str] = set()
    dups: list[str] = []
    for i in ids:
        if i in existing or i in seen:
            dups.append(i)
        seen.add(i)
    if dups:
        raise ValueError(
            f"{prefix}duplicate ids ({len(dups)}): {', '.join(map(repr, dups[:5]))}"
            + (", ..." if len(dups) > 5 else "")
        )
    return ids


def _check_metadata(metadata: Any, n: int, *, where: Path | None = None) -> list[dict[str, Any]]:
    prefix = f"{where}: " if where else ""
    if metadata is None:
        return [{} for _ in range(n)]
    if not isinstance(metadata, Sequence) or isinstance(metadata, str):
        raise ValueError(f"{prefix}metadata must be a list of dicts, one per row")
    if len(metadata) != n:
        raise ValueError(f"{prefix}{len(metadata)} metadata entries for {n} rows")
    if not all(isinstance(m, Mapping) for m in metadata):
        raise ValueError(f"{prefix}metadata must be a list of dicts, one per row")
    return _json_copy([dict(m) for m in metadata], f"{prefix}metadata")


def _json_copy(value: Any, name: str) -> Any:
    """A deep copy through JSON: proves ``value`` can be saved, and detaches it from the caller."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{name} must be JSON-safe (str/int/float/bool/None/list/dict): {e}"
        ) from e


# -- reading a folder ------------------------------------------------------------------------

_MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "count": int,
    "dim": int,
    "dtype": str,
    "metric": str,
    "kind": str,
    "backend": str,
    "params": dict,
    "info": dict,
    "ids": list,
    "metadata": list,
}


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: missing; not an embedding index folder")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable JSON: {e}") from e
    if not isinstance(m, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key, typ in _MANIFEST_TYPES.items():
        if key not in m:
            raise ValueError(f"{path}: missing key {key!r}")
        if not isinstance(m[key], typ) or isinstance(m[key], bool):
            raise ValueError(f"{path}: {key!r} has the wrong type ({type(m[key]).__name__})")
    if m["format_version"] != INDEX_FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {m['format_version']} (this code reads {INDEX_FORMAT_VERSION})"
        )
    if m["count"] < 0 or m["dim"] < 1:
        raise ValueError(f"{path}: bad count {m['count']} / dim {m['dim']}")
    for key, choices in (("dtype", _DTYPES), ("metric", _METRICS), ("kind", _KINDS)):
        if m[key] not in choices:
            raise ValueError(f"{path}: {key} {m[key]!r} is not one of {choices}")
    if set(m["params"]) != {"exact_threshold", "hnsw_m", "ef_construction", "ef_search"}:
        raise ValueError(f"{path}: params has keys {sorted(m['params'])}")
    if len(m["ids"]) != m["count"] or len(m["metadata"]) != m["count"]:
        raise ValueError(
            f"{path}: count is {m['count']} but it lists {len(m['ids'])} ids and "
            f"{len(m['metadata'])} metadata entries"
        )
    return m


def _read_vectors(path: Path, m: Mapping[str, Any]) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable (or holds pickled objects): {e}") from e
    expected = (m["count"], m["dim"])
    if vectors.shape != expected:
        raise ValueError(
            f"{path}: shape {vectors.shape} but {MANIFEST_NAME} says {m['count']} rows × "
            f"{m['dim']} dims"
        )
    if vectors.dtype != np.dtype(m["dtype"]):
        raise ValueError(f"{path}: dtype {vectors.dtype} but {MANIFEST_NAME} says {m['dtype']}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{path}: holds NaN or infinite values")
    return vectors


def _read_hnsw(path: Path, m: Mapping[str, Any], vectors: np.ndarray) -> Any:
    faiss = _faiss()
    if not path.is_file():
        raise ValueError(f"{path}: missing (the index's backend is hnsw)")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:  # faiss raises RuntimeError on a corrupt or foreign file
        raise ValueError(f"{path}: unreadable faiss index: {e}") from e
    if not isinstance(index, faiss.IndexHNSWFlat):  # read_index downcasts to the real class
        raise ValueError(f"{path}: a {type(index).__name__}, expected IndexHNSWFlat")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"{path}: metric is not inner product")
    if index.d != m["dim"] or index.ntotal != m["count"]:
        raise ValueError(
            f"{path}: {index.ntotal} vectors × {index.d} dims but {MANIFEST_NAME} says "
            f"{m['count']} × {m['dim']}"
        )
    # the graph keeps its own copy of the vectors: spot-check it is a copy of *these* vectors
    sample = np.unique(np.linspace(0, m["count"] - 1, num=min(m["count"], 64)).astype(np.int64))
    copies = np.stack([index.reconstruct(int(i)) for i in sample]) if sample.size else None
    if copies is not None and not np.array_equal(copies, vectors[sample].astype(np.float32)):
        raise ValueError(f"{path}: its vectors differ from {VECTORS_NAME}")
    index.hnsw.efSearch = m["params"]["ef_search"]
    return index
