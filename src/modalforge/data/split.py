"""Deterministic, stratified, group-aware train / val / test splits.

The assignment depends only on the seed, the labels and the group keys: given an id column as
``groups``, shuffling a manifest gives every row the same split (without groups, each row is its
own group, keyed by position). Groups (an emoji and its skin-tone
variants, the clips of one speaker) never straddle two splits.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of n * fractions; train gets at least one when n >= 1."""
    raw = [n * f for f in fractions]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    if n and counts[0] == 0:
        donor = max(range(1, len(counts)), key=lambda i: counts[i])
        counts[donor] -= 1
        counts[0] += 1
    return counts


def _key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


def stratified_split(
    labels: Sequence[object],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    groups: Sequence[object] | None = None,
    names: Sequence[str] = SPLITS,
) -> np.ndarray:
    """Assign each row a split name. Returns an array of ``names`` entries, one per row.

    Rows are grouped (each row its own group if ``groups`` is None); a group's stratum is its
    most common label; within each stratum groups are ordered by a seeded hash and cut by
    ``fractions`` (largest-remainder rounding, so small classes still reach train first).
    """
    if len(fractions) != len(names):
        raise ValueError("one fraction per split name")
    if any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    n = len(labels)
    if groups is not None and len(groups) != n:
        raise ValueError("groups must have one entry per row")
    members: dict[str, list[int]] = defaultdict(list)
    for i in range(n):
        members[str(groups[i]) if groups is not None else f"row:{i}"].append(i)
    strata: dict[str, list[str]] = defaultdict(list)
    for group, rows in members.items():
        label = Counter(str(labels[i]) for i in rows).most_common(1)[0][0]
        strata[label].append(group)
    out = np.empty(n, dtype=object)
    for label in sorted(strata):
        ordered = sorted(strata[label], key=lambda g: _key(seed, g))
        start = 0
        for name, count in zip(names, _allocate(len(ordered), fractions), strict=True):
            for group in ordered[start : start + count]:
                out[members[group]] = name
            start += count
    return out
