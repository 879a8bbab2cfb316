from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modalforge.data.split import stratified_split


def test_same_seed_same_split_other_seed_other_split():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    first = stratified_split(labels, seed=3)
    assert (first == stratified_split(labels, seed=3)).all()
    assert not (first == stratified_split(labels, seed=4)).all()


def test_stratified_fractions_per_class():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    split = stratified_split(labels, (0.8, 0.1, 0.1), seed=0)
    for label, n in Counter(labels).items():
        got = Counter(s for s, lab in zip(split, labels, strict=True) if lab == label)
        assert got == {"train": round(0.8 * n), "val": round(0.1 * n), "test": round(0.1 * n)}


def test_groups_never_straddle_and_order_does_not_matter():
    rng = np.random.default_rng(0)
    groups = [f"g{i // 3}" for i in range(90)]
    labels = [f"c{(i // 3) % 4}" for i in range(90)]
    split = stratified_split(labels, seed=1, groups=groups)
    by_group: dict[str, set] = {}
    for g, s in zip(groups, split, strict=True):
        by_group.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in by_group.values())
    order = rng.permutation(90)
    shuffled = stratified_split(
        [labels[i] for i in order], seed=1, groups=[groups[i] for i in order]
    )
    assert all(shuffled[k] == split[i] for k, i in enumerate(order))


def test_small_classes_reach_train_first():
    split = stratified_split(["rare", "common", "common", "common", "common"], seed=0)
    assert split[0] == "train"


def test_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(["a"], (0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="one entry per row"):
        stratified_split(["a", "b"], groups=["g"])


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.sampled_from(["x", "y", "z"]), min_size=1, max_size=80),
    seed=st.integers(0, 10_000),
    train=st.floats(0.1, 0.9),
)
def test_property_every_row_assigned_and_counts_exact(labels, seed, train):
    rest = (1 - train) / 2
    split = stratified_split(labels, (train, rest, rest), seed=seed)
    assert len(split) == len(labels) and set(split) <= {"train", "val", "test"}
    for label, n in Counter(labels).items():
        got = Counter(s for s, lab in zip(split, labels, strict=True) if lab == label)
        assert sum(got.values()) == n
        assert got["train"] >= 1  # every class is trainable
        assert abs(got["train"] - n * train) <= 1.0 + 1e-9 or n * train < 1
