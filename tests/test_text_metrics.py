"""Caption metrics: BLEU against sacrebleu, the documented differences with nltk and
pycocoevalcap, and CIDEr-D against numbers from pycocoevalcap 1.2.

pycocoevalcap is not a test dependency (its wheel is 104 MB of bundled Java jars), so its
outputs below were computed once with ``pycocoevalcap==1.2`` (``Bleu(4)``, ``Cider()``) on the
same corpora and are frozen here.
"""

from __future__ import annotations

import math
import sys
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.translate import bleu_score as nltk_bleu
from sacrebleu.metrics import BLEU

from modalforge.evaluate.text_metrics import (
    DocumentFrequency,
    cider_d,
    compute_document_frequency,
    corpus_bleu,
)

# captions with several (and a varying number of) references, a short hypothesis, clipping
CAPTIONS = (
    [
        "a cat sits on the mat",
        "the dog runs in the park",
        "a red apple on a table",
        "grinning face",
        "a a a a cat",
    ],
    [
        ["the cat sits on the mat", "a cat is on the mat"],
        ["a dog runs in a park", "the dog is running in the park", "dogs run"],
        ["a red apple", "an apple on the table", "a red apple on a wooden table"],
        ["grinning face with big eyes"],
        ["a cat", "a small cat"],
    ],
)
# emoji names: every hypothesis is shorter than 3 tokens, every word and bigram matches
EMOJI = (
    ["red heart", "thumbs up", "fire", "smiling face"],
    [
        ["red heart"],
        ["thumbs up sign", "thumbs up"],
        ["fire", "flame"],
        ["smiling face with smiling eyes", "grinning face"],
    ],
)

CORPORA = {
    "captions": CAPTIONS,
    "emoji": EMOJI,
    "empty hypotheses": (
        ["", "a red apple", ""],
        [["an apple"], ["a red apple", "red apple"], ["x"]],
    ),
    "all empty": (["", ""], [["x y"], ["z"]]),
    "shorter than every reference": (
        ["grinning face", "cat"],
        [
            ["grinning face with big eyes", "grinning face with smiling eyes"],
            ["cat face", "grinning cat"],
        ],
    ),
    "one word": (["fire", "cat", "dog"], [["fire"], ["cat face"], ["hot dog", "dog"]]),
    "perfect": (["a b c d e", "x y z"], [["a b c d e"], ["q", "x y z"]]),
    "no match": (["x y z", "u v"], [["a b c"], ["a b", "c d e"]]),
    "clipping": (
        ["the the the the the the the"],
        [["the cat is on the mat", "there is a cat on the mat"]],
    ),
    "repeated bigrams": (["a b a b a b", "c c c c"], [["a b a b", "b a"], ["c c", "c"]]),
    "length tie": (["a b c d"], [["a b c", "a b c d e"]]),
    "empty reference": (["a", "a b"], [["", "a b"], ["", "a b c"]]),
}


def sacrebleu_bleu(hyps: list[str], refs: list[list[str]], n: int) -> float:
    """sacrebleu's corpus BLEU-n as a fraction; its references are streams padded with None."""
    depth = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(depth)]
    metric = BLEU(tokenize="none", smooth_method="none", max_ngram_order=n, effective_order=False)
    return metric.corpus_score(hyps, streams).score / 100


def nltk_corpus_bleu(hyps: list[str], refs: list[list[str]], n: int) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "The hypothesis contains 0 counts of n-gram overlaps"
        return nltk_bleu.corpus_bleu(
            [[r.split() for r in rs] for rs in refs],
            [h.split() for h in hyps],
            weights=(1 / n,) * n,
        )


# -- BLEU --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CORPORA))
def test_bleu_equals_sacrebleu(name):
    hyps, refs = CORPORA[name]
    score = corpus_bleu(hyps, refs)
    for n in range(1, 5):
        assert score.bleu[n - 1] == pytest.approx(sacrebleu_bleu(hyps, refs, n), abs=1e-6), n
        # BLEU-n does not depend on the highest order computed
        assert corpus_bleu(hyps, refs, max_n=n).bleu == pytest.approx(score.bleu[:n], abs=1e-12)


def test_bleu_hand_computed():
    # Papineni et al.'s example: 7 "the" clip to 2 (the most in one reference)
    s = corpus_bleu(*CORPORA["clipping"], max_n=2)
    assert s.counts == [2, 0] and s.totals == [7, 6]
    assert s.precisions == [pytest.approx(2 / 7), 0.0]
    assert s.bleu == [pytest.approx(2 / 7), 0.0]
    # the closest reference has 7 tokens, as many as the hypothesis: no brevity penalty
    assert (s.hyp_len, s.ref_len, s.brevity_penalty) == (7, 7, 1.0)

    # a tie between references 3 and 5 tokens from a 4-token hypothesis takes the shorter
    s = corpus_bleu(*CORPORA["length tie"])
    # (the longer one would give r = 5 > c = 4 and a brevity penalty of exp(1 - 5/4))
    assert s.ref_len == 3 and s.brevity_penalty == 1.0
    assert s.bleu == [1.0] * 4  # every n-gram is in "a b c d e"

    # shorter than every reference: r = 5 + 2, c = 3
    s = corpus_bleu(*CORPORA["shorter than every reference"])
    assert (s.hyp_len, s.ref_len) == (3, 7)
    assert s.brevity_penalty == pytest.approx(math.exp(1 - 7 / 3))
    assert s.bleu[:2] == [pytest.approx(s.brevity_penalty), pytest.approx(s.brevity_penalty)]
    assert s.bleu[2:] == [0.0, 0.0]  # no hypothesis has a trigram


def test_bleu_edge_cases():
    assert corpus_bleu(*CORPORA["perfect"]).bleu == [1.0, 1.0, 1.0, 1.0]
    assert corpus_bleu(*CORPORA["no match"]).bleu == [0.0, 0.0, 0.0, 0.0]
    empty = corpus_bleu(*CORPORA["all empty"])
    assert empty.bleu == [0.0] * 4 and empty.brevity_penalty == 0.0 and empty.totals == [0] * 4
    # 1-2 word captions: BLEU-1 and -2 are perfect, BLEU-3 and -4 are 0 (no trigram to match)
    assert corpus_bleu(*EMOJI).bleu == [1.0, 1.0, 0.0, 0.0]


def test_bleu_input_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference sets"):
        corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        corpus_bleu(["a", "b"], [["a"], []])
    with pytest.raises(TypeError, match=r"references\[0\] is a str"):
        corpus_bleu(["a cat"], ["a cat"])
    with pytest.raises(ValueError, match="corpus is empty"):
        corpus_bleu([], [])
    with pytest.raises(ValueError, match="max_n"):
        corpus_bleu(["a"], [["a"]], max_n=0)


WORDS = st.text(alphabet="abc", min_size=0, max_size=6).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            WORDS,
            st.lists(st.text(alphabet="abc", max_size=7).map(" ".join), min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_bleu_equals_sacrebleu_on_random_corpora(items):
    hyps = [h for h, _ in items]
    refs = [r for _, r in items]
    score = corpus_bleu(hyps, refs)
    for n in range(1, 5):
        assert score.bleu[n - 1] == pytest.approx(sacrebleu_bleu(hyps, refs, n), abs=1e-6)


# -- nltk --------------------------------------------------------------------------------------


def test_nltk_equals_ours_when_every_hypothesis_has_n_tokens():
    hyps, refs = CORPORA["captions"]
    long_enough = [(h, r) for h, r in zip(hyps, refs, strict=True) if len(h.split()) >= 4]
    hyps, refs = [h for h, _ in long_enough], [r for _, r in long_enough]
    ours = corpus_bleu(hyps, refs)
    for n in range(1, 5):
        assert nltk_corpus_bleu(hyps, refs, n) == pytest.approx(ours.bleu[n - 1], abs=1e-9)


def nltk_rule(hyps: list[str], refs: list[list[str]], n: int) -> float:
    """nltk's corpus BLEU-n rebuilt from our statistics with its denominator rule:
    ``max(1, #k-grams)`` per hypothesis, so each hypothesis shorter than k adds 1 to totals[k]."""
    s = corpus_bleu(hyps, refs, max_n=n)
    short = [sum(len(h.split()) < k for h in hyps) for k in range(1, n + 1)]
    logs = [math.log(c / (t + m)) for c, t, m in zip(s.counts, s.totals, short, strict=True)]
    return s.brevity_penalty * math.exp(sum(logs) / n)


@pytest.mark.parametrize(
    ("hyps", "refs", "expected"),
    [
        # "x" has no bigram: totals 3, 2, 1 here, 4, 3, 2 in nltk -> p = 1, 3/4, 2/3, 1/2
        (["a b c d", "x"], [["a b c d"], ["x y"]], 0.5789300674674098),
        # the empty hypothesis also adds a failed unigram: p1 = 4/5
        (["a b c d", ""], [["a b c d"], ["x y"]], 0.4056114983537769),
    ],
)
def test_nltk_counts_a_short_hypothesis_as_one_failed_ngram(hyps, refs, expected):
    ours = corpus_bleu(hyps, refs)
    assert ours.precisions == [1.0, 1.0, 1.0, 1.0]  # nothing is missed in our definition
    for n in range(1, 5):
        got = nltk_corpus_bleu(hyps, refs, n)
        assert got == pytest.approx(nltk_rule(hyps, refs, n), rel=1e-12)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got < ours.bleu[3] - 0.2


def test_nltk_zero_match_order_is_float_min_not_zero():
    hyps, refs = ["a b c d"], [["a b x d"]]  # p = 3/4, 1/3, 0/2, 0/1
    ours = corpus_bleu(hyps, refs)
    assert ours.bleu[2:] == [0.0, 0.0]
    with pytest.warns(UserWarning, match="0 counts of 3-gram overlaps"):
        got = nltk_bleu.corpus_bleu([[refs[0][0].split()]], [hyps[0].split()], weights=(1 / 3,) * 3)
    expected = math.exp((math.log(3 / 4) + math.log(1 / 3) + math.log(sys.float_info.min)) / 3)
    assert got == pytest.approx(expected, rel=1e-12)
    assert 0 < got < 1e-100


@pytest.mark.parametrize("name", list(CORPORA))
def test_nltk_reference_length_and_brevity_penalty_match(name):
    hyps, refs = CORPORA[name]
    ours = corpus_bleu(hyps, refs)
    r = sum(
        nltk_bleu.closest_ref_length([x.split() for x in rs], len(h.split()))
        for h, rs in zip(hyps, refs, strict=True)
    )
    assert r == ours.ref_len
    assert nltk_bleu.brevity_penalty(r, ours.hyp_len) == pytest.approx(ours.brevity_penalty)


# -- pycocoevalcap (numbers frozen from pycocoevalcap 1.2) --------------------------------------

COCO_BLEU = {
    "captions": [0.8799999999296001, 0.8390470784648022, 0.7214237943321996, 0.607868548459336],
    "emoji": [0.9999999997142859, 0.9999999996190478, 0.009999999996984131, 0.0009999999997380954],
}
COCO_CIDER = {
    "captions": [
        5.838305629547954,
        2.5753544757118156,
        4.509165978136196,
        2.4984712483362728,
        1.459681575146592,
    ],
    "emoji": [5.0, 4.378235598515069, 1.25, 2.0610251322477224],
}


def coco_rule(hyps: list[str], refs: list[list[str]]) -> list[float]:
    """pycocoevalcap's BLEU-1..4 rebuilt from our statistics with its epsilons."""
    s = corpus_bleu(hyps, refs)
    ratio = (s.hyp_len + 1e-15) / (s.ref_len + 1e-9)
    bp = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    out, product = [], 1.0
    for k, (c, t) in enumerate(zip(s.counts, s.totals, strict=True), start=1):
        product *= (c + 1e-15) / (t + 1e-9)
        out.append(bp * product ** (1 / k))
    return out


def test_pycocoevalcap_bleu_equals_ours_when_every_order_matches():
    ours = corpus_bleu(*CAPTIONS)
    assert all(ours.counts)
    assert ours.bleu == pytest.approx(COCO_BLEU["captions"], abs=1e-6)
    assert coco_rule(*CAPTIONS) == pytest.approx(COCO_BLEU["captions"], rel=1e-12)


def test_pycocoevalcap_epsilons_score_an_unmatched_order():
    # no hypothesis has a trigram: p3 = p4 = 1e-15 / 1e-9 = 1e-6 there, BLEU-3 = 0.01, BLEU-4 = 0.001
    assert corpus_bleu(*EMOJI).bleu == [1.0, 1.0, 0.0, 0.0]
    assert coco_rule(*EMOJI) == pytest.approx(COCO_BLEU["emoji"], rel=1e-12)
    assert COCO_BLEU["emoji"][2:] == pytest.approx([1e-2, 1e-3], rel=1e-8)


@pytest.mark.parametrize("name", ["captions", "emoji"])
def test_cider_d_equals_pycocoevalcap(name):
    score = cider_d(*CORPORA[name])
    assert score.per_hypothesis == pytest.approx(COCO_CIDER[name], abs=1e-6)
    assert score.score == pytest.approx(sum(COCO_CIDER[name]) / len(COCO_CIDER[name]), abs=1e-6)


# -- CIDEr-D -----------------------------------------------------------------------------------


def test_cider_d_identical_caption_gets_the_maximum():
    refs = [["a b c d"], ["e f g h"]]
    assert cider_d(["a b c d", "e f g h"], refs).per_hypothesis == [pytest.approx(10.0)] * 2
    # a one-word copy only has unigrams: 1 of the 4 orders
    assert cider_d(["a", "e"], [["a"], ["e"]]).per_hypothesis == [pytest.approx(2.5)] * 2


def test_cider_d_no_shared_ngram_and_empty_hypothesis_score_zero():
    refs = [["a b c d"], ["e f g h"]]
    assert cider_d(["x y z", ""], refs).per_hypothesis == [0.0, 0.0]


def test_cider_d_ngrams_in_every_reference_set_weigh_nothing():
    # "the" is in both items' references: IDF log(2) - log(2) = 0
    score = cider_d(["the", "the"], [["the cat"], ["the dog"]])
    assert score.score == 0.0
    # a one-item corpus has IDF 0 for everything
    assert cider_d(["a b c d"], [["a b c d"]]).score == 0.0


def test_cider_d_length_penalty():
    # n = 1 and "the" (IDF 0) as padding: same unigram vectors, cosine 1, lengths 5 vs 2
    refs = [["a b the"], ["c d the"]]
    hyps = ["a b the the the", "c d the"]
    for sigma in (1.0, 6.0):
        s = cider_d(hyps, refs, n=1, sigma=sigma)
        assert s.per_hypothesis == [
            pytest.approx(10 * math.exp(-(2**2) / (2 * sigma**2))),
            pytest.approx(10.0),
        ]


def test_cider_d_clips_repeated_words():
    refs = [["a cat"], ["a dog"]]
    # "cat cat cat" has the direction of "cat" but only one "cat" counts: 10 / 3 over 1 of 4 orders
    s = cider_d(["cat cat cat", "dog"], refs, sigma=1e9)
    assert s.per_hypothesis[0] == pytest.approx(10 / 3 / 4)
    assert s.per_hypothesis[0] < s.per_hypothesis[1]


def test_cider_d_with_a_document_frequency_from_a_larger_corpus():
    train_refs = [["a cat sits down"], ["a dog runs"], ["red heart"], ["fire"]]
    df = compute_document_frequency(train_refs)
    assert df.num_documents == 4 and df.counts[("a",)] == 2 and df.counts[("a", "cat")] == 1
    # one item cannot score with its own IDF, but can with the larger corpus'
    assert cider_d(["a cat sits down"], [["a cat sits down"]]).score == 0.0
    got = cider_d(["a cat sits down"], [["a cat sits down"]], document_frequency=df).score
    assert got == pytest.approx(10.0)
    with pytest.raises(ValueError, match="up to 2, n is 4"):
        cider_d(["a"], [["a"]], document_frequency=compute_document_frequency(train_refs, n=2))
    with pytest.raises(ValueError, match="more reference sets"):
        DocumentFrequency({("a",): 3}, num_documents=2, n=1)


def test_cider_d_input_errors():
    with pytest.raises(ValueError, match="1 hypotheses but 2 reference sets"):
        cider_d(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="sigma"):
        cider_d(["a"], [["a"]], sigma=0)
