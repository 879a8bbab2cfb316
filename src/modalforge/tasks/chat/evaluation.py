"""Scoring a chat model on held-out conversations, beside the project's single-task models.

Every conversation is answered greedily from its turns up to the last answer, and scored by its
``qtype``: captions with BLEU-1..4 and CIDEr-D exactly as the captioner is scored (the same word
normalization and corpus statistics), VQA / yes-no / matching / digit questions by exact match of
the normalized answer, speech by word error rate. The text-only perplexity of the LLM on a fixed
English passage, before and after the LoRA adapters, says how much language training cost.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from modalforge.llm.types import SamplingParams
from modalforge.tasks.chat.compare import CAPTION, SPEECH, compare

#: a fixed passage of plain English (written for modalforge) for the perplexity check
PASSAGE = (
    "The river town grew slowly over many centuries. Its first houses stood near the old stone "
    "bridge, where farmers brought grain and wool to sell on market days. Later a school and a "
    "small library were built beside the square, and the children of the valley learned to "
    "read there. In the winter the roads were often closed by snow, so the people kept large "
    "stores of food and wood. When the railway finally arrived, the town changed quickly: new "
    "shops opened, visitors came from the city in the summer, and many young people left to "
    "find work elsewhere. Today the bridge is still standing, and on market days the square is "
    "as busy as it ever was."
)
_PUNCT = re.compile(r"[^\w\s']")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, spaces collapsed (how short answers are compared)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


@torch.no_grad()
def answers(predictor, conversations, max_tokens: int = 24, progress: bool = True) -> list[str]:
    """Greedy answers to every conversation, decoded in batches by the engine."""
    from rich.progress import Progress

    media = predictor._media_tokens(conversations, progress)
    out: list[str] = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    engine = predictor.engine()
    chunk = 64
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("answering", total=len(conversations))
        for start in range(0, len(conversations), chunk):
            prompts = []
            for c in conversations[start : start + chunk]:
                tokens = {kind: media[kind][str(getattr(c, kind))] for kind in ("image", "audio")
                          if getattr(c, kind) is not None}  # fmt: skip
                prompts.append(predictor.prompt(c.question_turns, media_tokens=tokens))
            out += [r.text.strip() for r in engine.generate(prompts, params)]
            bar.advance(task, len(prompts))
    return out


def caption_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """The captioner's own scoring (``CaptionPredictor.evaluate``): BLEU-1..4, CIDEr-D, exact."""
    from modalforge.evaluate.text_metrics import cider_d, corpus_bleu
    from modalforge.tasks.caption import caption_words

    hyps = [" ".join(caption_words(h)) for h in hypotheses]
    refs = [[" ".join(caption_words(r))] for r in references]
    bleu = corpus_bleu(hyps, refs)
    exact = sum(h == r[0] for h, r in zip(hyps, refs, strict=True)) / len(hyps)
    return {**{f"bleu{n + 1}": b for n, b in enumerate(bleu.bleu)},
            "cider_d": cider_d(hyps, refs).score, "exact": exact}  # fmt: skip


def speech_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    from modalforge.evaluate.transcripts import word_edits

    rows = [word_edits(r, h) for r, h in zip(references, hypotheses, strict=True)]
    words = sum(r["reference_words"] for r in rows)
    return {"wer": sum(r["edits"] for r in rows) / max(1, words), "n": len(rows)}


@torch.no_grad()
def perplexity(llm, tokenizer, text: str = PASSAGE) -> float:
    """exp(mean next-token cross-entropy) of ``text`` under a plain causal LM."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    out = llm(input_ids=ids, labels=ids)
    return float(math.exp(out.loss))


def evaluate_chat(predictor, conversations, out_dir: str | Path | None = None,
                  progress: bool = True, examples: int = 12,
                  baselines: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Scores per question type (and the perplexity check) on ``conversations``, and those of
    the ``baselines`` bundles on the same questions (``compare``); with ``out_dir``:
    ``metrics.json``, ``answers.jsonl`` (every answer) and ``report.md``."""
    if not conversations:
        raise ValueError("no conversations to evaluate")
    t0 = time.perf_counter()
    hyps = answers(predictor, conversations, progress=progress)
    seconds = time.perf_counter() - t0
    groups: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(conversations):
        groups[c.qtype or "other"].append(i)
    scores: dict[str, Any] = {}
    for qtype, rows in sorted(groups.items()):
        h = [hyps[i] for i in rows]
        r = [conversations[i].answer for i in rows]
        if qtype == CAPTION:
            scores[qtype] = {**caption_scores(h, r), "n": len(rows)}
        elif qtype == SPEECH:
            scores[qtype] = speech_scores(h, r)
        else:
            hits = [normalize(a) == normalize(b) for a, b in zip(h, r, strict=True)]
            scores[qtype] = {"accuracy": sum(hits) / len(hits), "n": len(rows)}
    result: dict[str, Any] = {"rows": len(conversations), "scores": scores,
                              "answer_seconds": round(seconds, 1)}  # fmt: skip
    if predictor.config.lora is not None:
        base = predictor.model.base_llm()
        with predictor.model.llm.disable_adapter():
            before = perplexity(base, predictor.tokenizer)
        after = perplexity(predictor.model.merged_llm(), predictor.tokenizer)
        result["perplexity"] = {"before_lora": before, "after_lora": after}
    else:
        result["perplexity"] = {"llm": perplexity(predictor.model.llm, predictor.tokenizer)}
    if baselines:
        result["baselines"] = compare(conversations, baselines, out_dir)
    result["headline"] = {
        (f"{qtype} cider_d" if "cider_d" in s else f"{qtype} wer" if "wer" in s
         else f"{qtype} accuracy"): s.get("cider_d", s.get("wer", s.get("accuracy")))
        for qtype, s in scores.items()
    }  # fmt: skip
    if out_dir is not None:
        _write(Path(out_dir), conversations, hyps, result, examples)
        result["report"] = str(Path(out_dir) / "report.md")
    return result


def _write(out: Path, conversations, hyps, result, examples: int) -> None:
    from modalforge.files import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "metrics.json", json.dumps(result, indent=2).encode())
    rows = [json.dumps({"id": c.id, "qtype": c.qtype, "question": c.question_turns[-1].text,
                        "answer": c.answer, "model": h}) for c, h in zip(conversations, hyps,
                                                                          strict=True)]  # fmt: skip
    atomic_write_bytes(out / "answers.jsonl", ("\n".join(rows) + "\n").encode())
    lines = ["# modalforge: chat model evaluation", "",
             f"{result['rows']} held-out conversations, answered greedily "
             f"in {result['answer_seconds']} s.", "",
             "| question type | n | score |", "|---|---:|---|"]  # fmt: skip
    for qtype, s in result["scores"].items():
        if "cider_d" in s:
            text = f"CIDEr-D {s['cider_d']:.3f}, BLEU-4 {s['bleu4']:.3f}, exact {s['exact']:.3f}"
        elif "wer" in s:
            text = f"WER {s['wer']:.3f}"
        else:
            text = f"accuracy {s['accuracy']:.3f}"
        lines.append(f"| {qtype} | {s['n']} | {text} |")
    lines += _comparison(result)
    ppl = result["perplexity"]
    lines += [
        "",
        "Perplexity of the LLM on a fixed English passage: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in ppl.items()),
        "",
        "## Examples",
        "",
        "| type | question | reference | model |",
        "|---|---|---|---|",
    ]
    shown: dict[str, int] = defaultdict(int)
    for c, h in zip(conversations, hyps, strict=True):
        if shown[c.qtype] < max(1, examples // 6):
            shown[c.qtype] += 1
            q = c.question_turns[-1].text.replace("\n", " ").replace("|", "/")
            lines.append(f"| {c.qtype} | {q} | {c.answer} | {h.replace('|', '/')} |")
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())


def _comparison(result) -> list[str]:
    """The side-by-side table: the chat model and each single-task model on the same rows."""
    base = result.get("baselines") or {}
    if not base:
        return []
    scores = result["scores"]
    lines = [
        "",
        "## Beside the single-task models (same questions, same run)",
        "",
        "| question type | metric | chat model | single-task model |",
        "|---|---|---:|---:|",
    ]
    if "caption" in base and CAPTION in scores:
        for name, s in base["caption"]["scores"].items():
            lines.append(f"| caption | CIDEr-D (captioner: {name}) | "
                         f"{scores[CAPTION]['cider_d']:.3f} | {s['cider_d']:.3f} |")  # fmt: skip
    for qtype, acc in (base.get("vqa") or {}).get("accuracy", {}).items():
        if qtype in scores:
            lines.append(f"| {qtype} | accuracy (VQA model) | {scores[qtype]['accuracy']:.3f} | "
                         f"{acc:.3f} |")  # fmt: skip
    if "transcribe" in base and SPEECH in scores:
        lines.append(f"| speech | WER (Whisper) | {scores[SPEECH]['wer']:.3f} | "
                     f"{base['transcribe']['wer']:.3f} |")  # fmt: skip
    return lines


__all__ = ["PASSAGE", "answers", "caption_scores", "evaluate_chat", "normalize", "perplexity"]
