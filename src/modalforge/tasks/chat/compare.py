"""The project's single-task models on the chat model's own test questions, in the same run.

Given bundles of a captioner, a VQA classifier and a speech-to-text model, each is scored on the
rows of the held-out conversations it can answer -- the caption rows' images and names, the VQA
rows (the same questions ``data vqa`` writes), the spoken names -- with its own ``evaluate``,
so the numbers beside the chat model's are the ones those models report themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

CAPTION, SPEECH = "caption", "speech"  # the question types scored as captions / by WER
VQA_PREFIX = "vqa-"


def _rows(conversations, qtype: str | None = None, prefix: str | None = None) -> list:
    return [c for c in conversations
            if (qtype is not None and c.qtype == qtype)
            or (prefix is not None and (c.qtype or "").startswith(prefix))]  # fmt: skip


def _question(c) -> str:
    text = c.question_turns[-1].text
    return text.replace("<image>", "").replace("<audio>", "").strip()


def _manifest(frame: pd.DataFrame):
    from modalforge.data.manifest import Manifest

    return Manifest(frame.reset_index(drop=True), Path("/"), None)  # paths: absolute, resolved


def caption_baseline(bundle, conversations, out_dir: Path | None) -> dict[str, Any]:
    from modalforge import tasks

    predictor = tasks.load(bundle)
    rows = _rows(conversations, CAPTION)
    frame = pd.DataFrame({predictor.image: [str(c.image) for c in rows],
                          predictor.caption_column: [c.answer for c in rows]})  # fmt: skip
    result = predictor.evaluate(_manifest(frame), out_dir=out_dir, ablation=False)
    return {"bundle": str(bundle), "rows": result["rows"], "scores": result["scores"]}


def vqa_baseline(bundle, conversations, out_dir: Path | None) -> dict[str, Any]:
    from modalforge import tasks

    predictor = tasks.load(bundle)
    image, question = (c.name for c in predictor.schema.inputs)
    if predictor.schema[image].modality.value != "image":
        image, question = question, image
    rows = _rows(conversations, prefix=VQA_PREFIX)
    frame = pd.DataFrame({image: [str(c.image) for c in rows],
                          question: [_question(c) for c in rows],
                          predictor.label: [c.answer for c in rows],
                          "qtype": [c.qtype[len(VQA_PREFIX):] for c in rows]})  # fmt: skip
    result = predictor.evaluate(_manifest(frame), out_dir=out_dir, by="qtype", ablation=False)
    groups = result.get("by", {}).get("groups", {})
    return {"bundle": str(bundle), "rows": len(rows),
            "accuracy": {f"{VQA_PREFIX}{k}": g["accuracy"] for k, g in groups.items()},
            "overall": result["metrics"].get("accuracy")}  # fmt: skip


def speech_baseline(bundle, conversations, out_dir: Path | None) -> dict[str, Any]:
    """``bundle``: a speech-to-text bundle, or ``packaged`` for the packaged Whisper tiny.en."""
    from modalforge import tasks
    from modalforge.tasks.transcription import Transcriber

    transcriber = Transcriber.packaged() if str(bundle) == "packaged" else tasks.load(bundle)
    rows = _rows(conversations, SPEECH)
    frame = pd.DataFrame({"audio": [str(c.audio) for c in rows],
                          "text": [c.answer for c in rows]})  # fmt: skip
    result = transcriber.evaluate(_manifest(frame), out_dir=out_dir, progress=False)
    return {"bundle": str(bundle), "rows": result["n"], "wer": result["wer"]}


BASELINES = {"caption": caption_baseline, "vqa": vqa_baseline, "transcribe": speech_baseline}


def compare(conversations, bundles: dict[str, str | Path],
            out_dir: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """{kind: scores} of every baseline bundle (``kind``: caption, vqa or transcribe)."""
    unknown = sorted(set(bundles) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baseline kind(s) {unknown} (known: {sorted(BASELINES)})")
    out = {}
    for kind, bundle in bundles.items():
        where = Path(out_dir) / f"baseline-{kind}" if out_dir is not None else None
        out[kind] = BASELINES[kind](bundle, conversations, where)
    return out


__all__ = ["BASELINES", "compare"]
