"""Cross-modal retrieval metrics (Recall@K, median and mean rank) from query × candidate scores.

Used to evaluate contrastive (CLIP-style) alignment: ``scores[q, j]`` is the similarity of query
``q`` (say an image) to candidate ``j`` (say a caption), and each query has one or more correct
candidates (several images may share one name, so several captions may be right).

Conventions, checked against torchmetrics in ``tests/test_retrieval.py``:

* **Rank** of a query is the 1-based rank of its *best-ranked* positive.
* **Recall@K** is the share of queries with at least one positive in the top ``K`` (rank ≤ K).
  This is CLIP's R@K and torchmetrics' ``RetrievalHitRate(top_k=K)`` (mean over queries, one
  query per ``indexes`` value). It is *not* ``RetrievalRecall``, which is the share of a query's
  positives found in the top K; the two agree only when every query has exactly one positive.
* ``K > N`` is allowed: the top K is then every candidate, so Recall@K is 1.
* **Ties are pessimistic**: a positive tied in score with negatives is ranked after all of them
  (positives tied with each other do not push each other down). So
  ``rank = 1 + #{negatives j : scores[q, j] >= best positive score}``. A degenerate model that
  gives every candidate the same score thus gets rank ``N - P + 1``, not a lucky rank 1.
  torchmetrics breaks ties by ``torch.argsort`` order (unspecified), so the two agree only when
  the scores have no ties at the top-K boundary — true for continuous random scores.
* Every query must have at least one positive: a query without one has no rank, and silently
  counting it as a miss (torchmetrics' ``empty_target_action="neg"``) would hide a data bug.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

#: the Recall@K cut-offs reported by default (CLIP's and most papers' choice)
DEFAULT_KS = (1, 5, 10)

Positives = np.ndarray | torch.Tensor | Sequence[Any]


def retrieval_metrics(
    scores: np.ndarray | torch.Tensor,
    positives: Positives,
    ks: Iterable[int] = DEFAULT_KS,
) -> dict[str, float | int]:
    """Recall@K for each ``K`` in ``ks``, median and mean rank of ``scores`` ``(Q, N)``.

    ``positives`` says which candidates are correct for each query, in one of three forms:

    * ``(Q,)`` integer array (or list of ints): the one positive candidate index of each query;
    * a list of ``Q`` sets / lists of candidate indices (several positives per query);
    * ``(Q, N)`` boolean matrix, ``True`` where candidate ``j`` is correct for query ``q``.

    Returns ``{"recall@1": ..., "recall@5": ..., "recall@10": ..., "median_rank": ...,
    "mean_rank": ..., "queries": Q, "candidates": N}`` (recalls as fractions in ``[0, 1]``).
    See the module docstring for the definitions and the tie rule.
    """
    s = _as_scores(scores)
    mask = positives_mask(positives, *s.shape)
    ranks = best_positive_ranks(s, mask)
    out: dict[str, float | int] = {}
    for k in _as_ks(ks):
        out[f"recall@{k}"] = float(np.mean(ranks <= k))
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(np.mean(ranks))
    out["queries"] = int(s.shape[0])
    out["candidates"] = int(s.shape[1])
    return out


def bidirectional(
    scores: np.ndarray | torch.Tensor,
    positives: Positives,
    names: tuple[str, str] = ("image", "text"),
    ks: Iterable[int] = DEFAULT_KS,
) -> dict[str, dict[str, float | int]]:
    """:func:`retrieval_metrics` in both directions of a ``(A, B)`` score matrix.

    Rows of ``scores`` are ``names[0]`` items, columns ``names[1]`` items, and ``positives`` is
    given for the rows (as in :func:`retrieval_metrics`). Returns
    ``{"image→text": rows retrieving columns, "text→image": columns retrieving rows}``; the second
    direction uses the transposed scores and positives, so every column needs a positive too.
    """
    if len(names) != 2:
        raise ValueError(f"names must be two modality names, got {names!r}")
    s = _as_scores(scores)
    mask = positives_mask(positives, *s.shape)
    ks = _as_ks(ks)
    a, b = names
    return {
        f"{a}→{b}": retrieval_metrics(s, mask, ks),
        f"{b}→{a}": retrieval_metrics(s.T, mask.T, ks),
    }


def best_positive_ranks(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(Q,)`` int64: the 1-based rank of each query's best positive, ties pessimistic.

    ``scores`` ``(Q, N)`` float, ``mask`` ``(Q, N)`` bool with at least one ``True`` per row.
    """
    best = np.where(mask, scores, -np.inf).max(axis=1, keepdims=True)
    # every candidate scoring above the best positive is a negative, so counting negatives at or
    # above it is "strictly better ones + negatives tied with it" in one comparison
    ahead = (~mask) & (scores >= best)
    return 1 + ahead.sum(axis=1).astype(np.int64)


def positives_mask(positives: Positives, q: int, n: int) -> np.ndarray:
    """Any accepted form of ``positives`` -> a ``(Q, N)`` bool mask, validated."""
    if isinstance(positives, torch.Tensor):
        positives = positives.detach().cpu().numpy()
    if isinstance(positives, np.ndarray):
        if positives.ndim == 2:
            return _mask_from_matrix(positives, q, n)
        # (Q,) ints -> python ints (float or bool arrays are refused below); object -> its sets
        positives = positives.tolist()
    if not isinstance(positives, Sequence) or isinstance(positives, str | bytes):
        raise TypeError(
            "positives must be a (Q,) int array, a list of index sets or a (Q, N) bool matrix, "
            f"got {type(positives).__name__}"
        )
    rows = [_as_index_list(p) for p in positives]
    return _mask_from_indices(rows, q, n)


# -- input checks ----------------------------------------------------------------------------


def _as_scores(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        # float64 holds every float16/bfloat16/float32 value exactly, so order and ties survive
        s = scores.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty (Q, N) matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or infinite values")
    return s


def _as_ks(ks: Iterable[int]) -> tuple[int, ...]:
    out = tuple(ks)
    if not out or any(isinstance(k, bool) or int(k) != k or k < 1 for k in out):
        raise ValueError(f"ks must be positive integers, got {out!r}")
    return tuple(int(k) for k in out)


def _as_index_list(p: Any) -> list[int]:
    """One query's positives: an int or an iterable of ints -> a list of ints."""
    if isinstance(p, torch.Tensor | np.ndarray):
        p = p.tolist()
    if isinstance(p, int | np.integer) and not isinstance(p, bool):
        return [int(p)]
    if isinstance(p, Iterable) and not isinstance(p, str | bytes):
        items = list(p)
        if all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in items):
            return [int(i) for i in items]
    raise TypeError(f"a query's positives must be candidate indices (ints), got {p!r}")


def _mask_from_indices(rows: list[list[int]], q: int, n: int) -> np.ndarray:
    if len(rows) != q:
        raise ValueError(f"positives has {len(rows)} entries but scores has {q} queries")
    mask = np.zeros((q, n), dtype=bool)
    for i, row in enumerate(rows):
        bad = [j for j in row if not 0 <= j < n]
        if bad:
            raise ValueError(
                f"query {i} has positive index {bad[0]} outside the {n} candidates [0, {n})"
            )
        mask[i, row] = True
    _check_every_query_has_a_positive(mask)
    return mask


def _mask_from_matrix(m: np.ndarray, q: int, n: int) -> np.ndarray:
    # a 2-D int array could also be read as "K positive indices per query": refuse the guess
    if m.dtype != bool:
        raise TypeError(
            f"a 2-D positives matrix must be boolean (Q, N), got dtype {m.dtype}; "
            "pass several positive indices per query as a list of sets"
        )
    if m.shape != (q, n):
        raise ValueError(f"positives mask has shape {m.shape}, scores has {(q, n)}")
    _check_every_query_has_a_positive(m)
    return m


def _check_every_query_has_a_positive(mask: np.ndarray) -> None:
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(
            f"{empty.size} queries have no positive candidate (first: query {int(empty[0])}); "
            "their rank is undefined"
        )
