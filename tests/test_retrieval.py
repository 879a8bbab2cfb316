"""Retrieval metrics: hand-computed cases, the tie rule, and agreement with torchmetrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalRecall

from modalforge.evaluate.retrieval import (
    best_positive_ranks,
    bidirectional,
    positives_mask,
    retrieval_metrics,
)

# 3 queries × 4 candidates; positives 0, 2, 3 -> ranks 1, 2, 4
SCORES = np.array(
    [
        [0.9, 0.1, 0.5, 0.3],
        [0.2, 0.8, 0.7, 0.1],
        [0.4, 0.6, 0.5, 0.1],
    ]
)


def test_hand_computed_one_positive():
    m = retrieval_metrics(SCORES, np.array([0, 2, 3]), ks=(1, 2, 3, 4))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["recall@4"] == pytest.approx(1.0)
    assert m["median_rank"] == 2.0
    assert m["mean_rank"] == pytest.approx(7 / 3)
    assert m["queries"] == 3 and m["candidates"] == 4


def test_default_keys_and_k_larger_than_candidates():
    m = retrieval_metrics(SCORES, [0, 2, 3])
    assert list(m) == [
        "recall@1",
        "recall@5",
        "recall@10",
        "median_rank",
        "mean_rank",
        "queries",
        "candidates",
    ]
    # only 4 candidates: the top 5 / top 10 is everything
    assert m["recall@5"] == 1.0 and m["recall@10"] == 1.0
    assert m["recall@1"] == pytest.approx(1 / 3)


def test_several_positives_use_the_best_ranked_one():
    # query 2 is also right with candidate 0 (score 0.4, behind 0.6 and 0.5 -> rank 3, not 4);
    # query 1 with candidate 1 (its top score -> rank 1)
    m = retrieval_metrics(SCORES, [{0}, {1, 2}, {0, 3}], ks=(1, 3))
    assert m["recall@1"] == pytest.approx(2 / 3)
    assert m["recall@3"] == 1.0
    assert m["mean_rank"] == pytest.approx((1 + 1 + 3) / 3)
    assert m["median_rank"] == 1.0


def test_median_rank_even_count_by_hand():
    # 4 queries × 8 candidates; positive of each query is candidate q with the score placed so
    # that the ranks are 1, 2, 4, 7 -> median (2 + 4) / 2 = 3, mean 14 / 4 = 3.5
    rng = np.random.default_rng(0)
    base = rng.permutation(np.linspace(0.0, 0.7, 8))
    scores = np.tile(base, (4, 1))
    order = np.argsort(-base)  # candidate indices from best to worst
    pos = [int(order[rank - 1]) for rank in (1, 2, 4, 7)]
    m = retrieval_metrics(scores, pos, ks=(1, 4))
    assert m["median_rank"] == 3.0
    assert m["mean_rank"] == 3.5
    assert m["recall@1"] == 0.25 and m["recall@4"] == 0.75


def test_ties_are_pessimistic():
    scores = np.array([[0.5, 0.5, 0.5, 0.2]])
    # one positive tied with two negatives: ranked after both
    assert best_positive_ranks(scores, positives_mask([1], 1, 4)).tolist() == [3]
    # two tied positives do not push each other down: one negative ahead
    assert best_positive_ranks(scores, positives_mask([{0, 1}], 1, 4)).tolist() == [2]
    # a constant scorer gets no lucky rank 1: rank N - P + 1
    flat = np.zeros((2, 5))
    m = retrieval_metrics(flat, [0, 4], ks=(1, 5))
    assert m["recall@1"] == 0.0 and m["recall@5"] == 1.0
    assert m["median_rank"] == 5.0


def test_positive_forms_agree():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((6, 9))
    idx = rng.integers(0, 9, size=6)
    mask = np.zeros((6, 9), bool)
    mask[np.arange(6), idx] = True
    expected = retrieval_metrics(scores, idx)
    for form in (
        idx.tolist(),
        torch.as_tensor(idx),
        [{int(i)} for i in idx],
        [[int(i)] for i in idx],
        mask,
        torch.as_tensor(mask),
    ):
        assert retrieval_metrics(scores, form) == expected
    assert retrieval_metrics(torch.as_tensor(scores, dtype=torch.float32), idx) == expected


def test_bidirectional_hand_computed():
    s = np.array([[0.9, 0.8, 0.1], [0.95, 0.5, 0.2], [0.3, 0.2, 0.4]])
    out = bidirectional(s, [0, 1, 2], ks=(1, 2))
    # image→text: ranks 1, 2, 1; text→image (columns): ranks 2, 2, 1
    assert set(out) == {"image→text", "text→image"}
    assert out["image→text"]["recall@1"] == pytest.approx(2 / 3)
    assert out["image→text"]["mean_rank"] == pytest.approx(4 / 3)
    assert out["text→image"]["recall@1"] == pytest.approx(1 / 3)
    assert out["text→image"]["recall@2"] == 1.0
    assert out["text→image"]["mean_rank"] == pytest.approx(5 / 3)


def test_bidirectional_rectangular_shared_names():
    # images 0 and 1 share caption 0; image 2 has caption 1
    s = np.array([[0.2, 0.9], [0.8, 0.1], [0.3, 0.4]])
    out = bidirectional(s, [0, 0, 1], names=("audio", "text"), ks=(1,))
    assert out["audio→text"]["queries"] == 3 and out["audio→text"]["candidates"] == 2
    assert out["text→audio"]["queries"] == 2 and out["text→audio"]["candidates"] == 3
    # audio: ranks 2, 1, 1; text 0 -> audio {0, 1}: best is 1 (0.8) rank 1; text 1 -> audio 2:
    # 0.4 behind 0.9 -> rank 2
    assert out["audio→text"]["mean_rank"] == pytest.approx(4 / 3)
    assert out["text→audio"]["mean_rank"] == pytest.approx(1.5)
    assert out["text→audio"]["recall@1"] == 0.5


@pytest.mark.parametrize(
    ("positives", "error", "match"),
    [
        ([0, 1], ValueError, "2 entries but scores has 3 queries"),
        ([0, 1, 4], ValueError, "outside the 4 candidates"),
        ([0, 1, -1], ValueError, "outside the 4 candidates"),
        ([{0}, set(), {1}], ValueError, "no positive candidate"),
        (np.zeros((3, 4), bool), ValueError, "no positive candidate"),
        (np.ones((3, 4), np.int64), TypeError, "must be boolean"),
        (np.ones((3, 5), bool), ValueError, "shape"),
        (np.array([0.0, 1.0, 2.0]), TypeError, "candidate indices"),
        ("abc", TypeError, "positives must be"),
    ],
)
def test_bad_positives(positives, error, match):
    with pytest.raises(error, match=match):
        retrieval_metrics(SCORES, positives)


def test_bad_scores_and_ks():
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 1.0]]), [0])
    with pytest.raises(ValueError, match=r"\(Q, N\)"):
        retrieval_metrics(np.zeros(4), [0])
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(SCORES, [0, 1, 2], ks=(0, 5))
    # text→image needs every text to have an image
    with pytest.raises(ValueError, match="no positive"):
        bidirectional(SCORES, [0, 0, 1])


# -- agreement with torchmetrics -------------------------------------------------------------


def _random_case(seed: int, several: bool, q: int = 50, n: int = 80):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((q, n))
    if several:
        mask = rng.random((q, n)) < 0.05
        mask[np.arange(q), rng.integers(0, n, size=q)] = True
        return scores, mask
    return scores, rng.integers(0, n, size=q)


def _torchmetrics(metric, scores: np.ndarray, mask: np.ndarray) -> float:
    q, n = scores.shape
    indexes = torch.arange(q).repeat_interleave(n)
    preds = torch.as_tensor(scores).flatten()
    target = torch.as_tensor(mask).flatten()
    return float(metric(preds, target, indexes=indexes))


@pytest.mark.parametrize("several", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_matches_torchmetrics_hit_rate(seed, several):
    scores, positives = _random_case(seed, several)
    mask = positives_mask(positives, *scores.shape)
    ks = (1, 5, 10, 100)
    m = retrieval_metrics(scores, positives, ks=ks)
    for k in ks:
        expected = _torchmetrics(RetrievalHitRate(top_k=k), scores, mask)
        assert m[f"recall@{k}"] == pytest.approx(expected, abs=1e-6), k
    # the ranks themselves: torchmetrics' MRR is the mean of 1 / (rank of the first positive).
    # It drops positives scored <= 0 (torch.where(preds > 0, ...)), so feed it shifted scores:
    # ranks do not change under a shift
    ranks = best_positive_ranks(scores, mask)
    expected_mrr = _torchmetrics(RetrievalMRR(), scores - scores.min() + 1.0, mask)
    assert float(np.mean(1.0 / ranks)) == pytest.approx(expected_mrr, abs=1e-6)


def test_retrieval_recall_is_the_other_definition():
    # with several positives, torchmetrics' RetrievalRecall (share of positives found) is lower
    # than the hit rate we report; with one positive they coincide
    scores, mask = _random_case(3, several=True)
    assert (mask.sum(axis=1) > 1).any()
    m = retrieval_metrics(scores, mask, ks=(5,))
    recall = _torchmetrics(RetrievalRecall(top_k=5), scores, mask)
    assert recall < m["recall@5"] - 0.01
    scores1, idx = _random_case(3, several=False)
    mask1 = positives_mask(idx, *scores1.shape)
    m1 = retrieval_metrics(scores1, idx, ks=(5,))
    assert _torchmetrics(RetrievalRecall(top_k=5), scores1, mask1) == pytest.approx(m1["recall@5"])
