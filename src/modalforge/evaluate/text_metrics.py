"""Caption metrics: corpus BLEU-1..4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015).

Both take ``hypotheses`` (one generated caption per item) and ``references`` (for each item, one
or more reference captions; the number may differ across items). Tokens are ``str.split()``:
no lowercasing and no punctuation splitting, so normalize before calling (the COCO toolkit runs
the Java PTB tokenizer, which lowercases and drops punctuation).

BLEU, checked against sacrebleu in ``tests/test_text_metrics.py``
-------------------------------------------------------------------
* Clipped n-gram counts: a hypothesis n-gram counts at most as often as it occurs in any *one*
  of its references. Matches and hypothesis n-gram totals are summed over the corpus per order
  (corpus BLEU, not a mean of sentence BLEUs); ``p_k = counts[k] / totals[k]``, and ``0`` when
  no hypothesis has a ``k``-gram.
* Brevity penalty: ``c`` = total hypothesis length, ``r`` = sum over items of the reference
  length closest to the hypothesis length (ties -> the shorter reference);
  ``BP = 1`` if ``c >= r``, ``exp(1 - r / c)`` if ``0 < c < r``, ``0`` if ``c = 0 < r``.
* ``BLEU-n = BP * exp(mean(log p_1 .. log p_n))``, uniform weights, no smoothing: if any order
  ``<= n`` has no match, ``BLEU-n = 0``.

This is sacrebleu's ``BLEU(tokenize="none", smooth_method="none", max_ngram_order=n,
effective_order=False)`` (which reports ×100; pad its reference streams with ``None``, not
``""``: an empty string is kept as a zero-length reference). Other implementations differ:

* **nltk** (3.10, ``nltk.translate.bleu_score.corpus_bleu``): ``modified_precision`` gives each
  hypothesis the denominator ``max(1, #k-grams)``, so a hypothesis with fewer than ``k`` tokens
  (an empty one: fewer than 1) adds one unmatched ``k``-gram to the corpus total of order ``k``.
  Short captions (emoji names are 1-6 words) thus lower nltk's BLEU: hypotheses
  ``["a b c d", "x"]`` against ``[["a b c d"], ["x y"]]`` have p = 1, 1, 1, 1 here (BLEU-4 =
  BP = exp(-0.2) = 0.8187) and p = 1, 3/4, 2/3, 1/2 in nltk (BLEU-4 = 0.5789). An order with no
  match is replaced by ``sys.float_info.min`` (and a warning), so BLEU-n is ~1e-100, not 0.
  The closest reference length (ties -> shorter) and the brevity penalty are the same as here.
* **pycocoevalcap** (1.2, ``bleu/bleu_scorer.py``, what COCO captioning papers report): per order
  ``p_k = (counts + 1e-15) / (totals + 1e-9)``, and the length ratio ``(c + 1e-15) / (r + 1e-9)``
  for the brevity penalty. With a match at every order it agrees with this module to ~1e-10; an
  order with no match gives a small positive score instead of 0, not a negligible one once the
  ``n``-th root is taken: an order no hypothesis reaches (all captions shorter than ``k``) has
  ``p_k = 1e-6``, so 1-2 word captions matching their references exactly get BLEU-3 = 0.01 and
  BLEU-4 = 0.001 there, 0 here. The closest reference length uses the same tie rule as here.

CIDEr-D, as in the coco-caption scorer (``pycocoevalcap/cider/cider_scorer.py``)
--------------------------------------------------------------------------------
* Each sentence becomes, per order ``k = 1..n``, a TF-IDF vector of its ``k``-grams:
  ``g(w) = tf(w) * (log(N) - log(max(1, df(w))))``, with ``tf`` the raw count in the sentence,
  ``df(w)`` the number of items whose reference *set* contains ``w`` and ``N`` the number of
  items (or a :class:`DocumentFrequency` computed once on a larger reference corpus). An n-gram
  in every item's references weighs 0, so CIDEr-D of a one-item corpus is 0.
* Per reference and order: ``sum_w min(g_h(w), g_r(w)) * g_r(w) / (|g_h| |g_r|)`` (the cosine
  with the hypothesis clipped to the reference, the "-D" against repeating words; 0 if either
  vector is zero), times the length penalty ``exp(-(len_h - len_r)^2 / (2 sigma^2))``.
* An item scores ``10 *`` the mean over its references and the ``n`` orders; the corpus score is
  the mean over items. An exact copy of a sole reference scores 10 if it has n-grams of every order
  (and they are not in every item's references), but a one-word copy only ``10 / n``.

The paper normalizes ``tf`` by sentence length; coco-caption (and this module) use raw counts,
which only matters for the clipping. coco-caption measures a sentence's length as its number of
bigrams, ``len - 1``: the same ``len_h - len_r`` whenever neither side is empty, and an empty side
scores 0 anyway. Its ``n`` is fixed at 4 (n-grams are always extracted up to 4; another ``n``
fails or scores wrongly); here ``n`` may be any order, with the token-count length penalty.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

NGram = tuple[str, ...]


@dataclass(frozen=True)
class BleuScore:
    """Corpus BLEU-1..max_n; every list has one entry per n-gram order, order 1 first."""

    bleu: list[float]  # BLEU-1 .. BLEU-max_n, in [0, 1]
    precisions: list[float]  # clipped n-gram precision counts[k] / totals[k], in [0, 1]
    brevity_penalty: float
    hyp_len: int  # total hypothesis tokens (c)
    ref_len: int  # total closest-reference tokens (r)
    counts: list[int]  # clipped n-gram matches
    totals: list[int]  # hypothesis n-grams


@dataclass(frozen=True)
class CiderScore:
    """Corpus CIDEr-D (mean of the per-hypothesis scores) and the per-hypothesis scores."""

    score: float
    per_hypothesis: list[float]


@dataclass(frozen=True)
class DocumentFrequency:
    """For CIDEr-D's IDF: in how many of ``num_documents`` reference sets each n-gram occurs."""

    counts: Mapping[NGram, int]
    num_documents: int
    n: int  # highest n-gram order counted

    def __post_init__(self) -> None:
        if self.num_documents < 1:
            raise ValueError(f"num_documents must be >= 1, got {self.num_documents}")
        if self.counts and max(self.counts.values()) > self.num_documents:
            raise ValueError("an n-gram occurs in more reference sets than num_documents")


def corpus_bleu(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4
) -> BleuScore:
    """Corpus BLEU-1..``max_n`` of ``hypotheses`` against their ``references``.

    ``references[i]`` holds the one or more reference strings of ``hypotheses[i]``. See the
    module docstring for the definition and how it differs from nltk and pycocoevalcap.
    """
    _check_corpus(hypotheses, references)
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    counts = [0] * max_n
    totals = [0] * max_n
    hyp_len = ref_len = 0  # c and r of the brevity penalty
    for hyp, refs in zip(hypotheses, references, strict=True):
        tokens = hyp.split()
        ref_tokens = [r.split() for r in refs]
        hyp_ngrams = _ngrams(tokens, max_n)
        max_ref: Counter[NGram] = Counter()
        for rt in ref_tokens:
            max_ref |= _ngrams(rt, max_n)  # | keeps the max count per n-gram
        for gram, count in hyp_ngrams.items():
            counts[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(max_n):
            totals[k] += max(0, len(tokens) - k)
        hyp_len += len(tokens)
        ref_len += min((len(rt) for rt in ref_tokens), key=lambda r: (abs(r - len(tokens)), r))
    precisions = [c / t if t else 0.0 for c, t in zip(counts, totals, strict=True)]
    if hyp_len >= ref_len:
        bp = 1.0
    elif hyp_len == 0:
        bp = 0.0
    else:
        bp = math.exp(1 - ref_len / hyp_len)
    bleu = [
        bp * math.exp(sum(map(math.log, precisions[:n])) / n) if all(precisions[:n]) else 0.0
        for n in range(1, max_n + 1)
    ]
    return BleuScore(bleu, precisions, bp, hyp_len, ref_len, counts, totals)


def compute_document_frequency(
    references: Sequence[Sequence[str]], n: int = 4
) -> DocumentFrequency:
    """Count, for each 1..``n``-gram, the reference sets (items) it occurs in."""
    _check_references(references)
    counts: Counter[NGram] = Counter()
    for refs in references:
        counts.update(set().union(*(_ngrams(r.split(), n) for r in refs)))
    return DocumentFrequency(dict(counts), len(references), n)


def cider_d(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    sigma: float = 6.0,
    n: int = 4,
    document_frequency: DocumentFrequency | None = None,
) -> CiderScore:
    """CIDEr-D of ``hypotheses`` against their ``references`` (see the module docstring).

    The IDF comes from ``references`` themselves unless ``document_frequency`` is given (built
    by :func:`compute_document_frequency` on a larger reference corpus, with an order ``>= n``).
    """
    _check_corpus(hypotheses, references)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    df = document_frequency or compute_document_frequency(references, n)
    if df.n < n:
        raise ValueError(f"document_frequency counts n-grams up to {df.n}, n is {n}")
    log_docs = math.log(df.num_documents)

    def tfidf(tokens: list[str]) -> list[dict[NGram, float]]:
        vecs: list[dict[NGram, float]] = [{} for _ in range(n)]
        for gram, tf in _ngrams(tokens, n).items():
            vecs[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1, df.counts.get(gram, 0))))
        return vecs

    per_hypothesis = []
    for hyp, refs in zip(hypotheses, references, strict=True):
        tokens = hyp.split()
        vh = tfidf(tokens)
        total = 0.0
        for ref in refs:
            ref_tokens = ref.split()
            vr = tfidf(ref_tokens)
            penalty = math.exp(-((len(tokens) - len(ref_tokens)) ** 2) / (2 * sigma**2))
            total += penalty * sum(_clipped_cosine(h, r) for h, r in zip(vh, vr, strict=True))
        per_hypothesis.append(10.0 * total / (n * len(refs)))
    return CiderScore(sum(per_hypothesis) / len(per_hypothesis), per_hypothesis)


def _clipped_cosine(hyp: dict[NGram, float], ref: dict[NGram, float]) -> float:
    norm = math.sqrt(sum(v * v for v in hyp.values())) * math.sqrt(sum(v * v for v in ref.values()))
    if norm == 0:
        return 0.0
    dot = sum(min(v, ref[g]) * ref[g] for g, v in hyp.items() if g in ref)
    return dot / norm


def _ngrams(tokens: list[str], max_n: int) -> Counter[NGram]:
    return Counter(
        tuple(tokens[i : i + k]) for k in range(1, max_n + 1) for i in range(len(tokens) - k + 1)
    )


def _check_corpus(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a sequence of strings, got one str")
    if len(hypotheses) == 0:
        raise ValueError("no hypotheses: the corpus is empty")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} reference sets: "
            "each hypothesis needs its own list of references"
        )
    _check_references(references)


def _check_references(references: Sequence[Sequence[str]]) -> None:
    if isinstance(references, str) or len(references) == 0:
        raise ValueError("references must be a non-empty sequence of reference lists")
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise TypeError(
                f"references[{i}] is a str; give each item a list of references, e.g. [[ref], ...]"
            )
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty: every hypothesis needs a reference")
