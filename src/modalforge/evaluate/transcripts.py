"""Scoring a speech-to-text model on a manifest: word error rate per row and over the corpus,
``metrics.json``, ``report.md`` and ``transcripts.csv``.

    metrics = evaluate_transcriber(transcriber, "speech.csv", out_dir="runs/asr")
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from modalforge.data.audio import SAMPLE_RATE, AudioConfig, load_audio
from modalforge.data.errors import DecodeError
from modalforge.data.manifest import is_missing
from modalforge.encoders.pretrained.whisper import normalize_words, word_error_rate
from modalforge.files import atomic_path, atomic_write_json, atomic_write_text
from modalforge.progress import progress_bar

AUDIO_COLUMN = "audio"


def evaluate_transcriber(
    transcriber,
    manifest: Any,
    audio: str = AUDIO_COLUMN,
    text: str = "text",
    out_dir: str | Path | None = None,
    progress: bool = True,
    worst: int = 10,
) -> dict[str, Any]:
    """Word error rate on a manifest (CSV / JSONL / Parquet path or a ``Manifest``) with an
    audio column (paths under the manifest's folder) and a reference ``text`` column.

    Returns ``wer`` (corpus: total word edits / total reference words, after
    ``normalize_words``), ``mean_row_wer``, ``n`` (rows scored), ``edits``,
    ``reference_words``, ``worst`` (the ``worst`` rows by WER), ``failed`` (rows whose audio
    could not be decoded or that have no reference; not scored), ``audio_seconds``,
    ``seconds`` and ``real_time_factor``. With ``out_dir``: ``metrics.json``,
    ``report.md`` and ``transcripts.csv`` (every row) are written there."""
    from modalforge.data.manifest import Manifest, read_manifest

    m = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    name = str(m.path) if m.path is not None else "the manifest"
    missing = [c for c in (audio, text) if c not in m.columns]
    if missing:
        raise ValueError(f"{name}: no column {missing} (columns: {m.columns})")
    if len(m) == 0:
        raise ValueError(f"{name}: no rows to evaluate")
    start = time.perf_counter()
    cfg = AudioConfig(sample_rate=SAMPLE_RATE, clip_seconds=None)
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    audio_seconds = 0.0
    step = 4 * transcriber.options.batch_size
    with progress_bar(len(m), "transcribing", progress) as advance:
        for first in range(0, len(m), step):
            chunk, waves = [], []
            for i in range(first, min(first + step, len(m))):
                value, reference = m.frame[audio].iloc[i], m.frame[text].iloc[i]
                where = f"{m.describe_row(i)}, {audio}={value!r}"
                try:
                    if is_missing(value):
                        raise DecodeError("no audio")
                    if is_missing(reference):
                        raise DecodeError(f"no reference text in column {text!r}")
                    wave = load_audio(m.resolve(value), cfg)
                except (DecodeError, ValueError) as err:
                    failed.append({"row": i, "audio": str(value), "error": f"{where}: {err}"})
                    continue
                audio_seconds += len(wave) / SAMPLE_RATE
                chunk.append({"row": i, "audio": str(value), "reference": str(reference)})
                waves.append(wave)
            for record, hypothesis in zip(chunk, transcriber.transcribe(waves), strict=True):
                record.update(hypothesis=hypothesis, **word_edits(record["reference"],
                                                                  hypothesis))  # fmt: skip
                rows.append(record)
            advance(min(step, len(m) - first))
    seconds = time.perf_counter() - start
    edits = sum(r["edits"] for r in rows)
    ref_words = sum(r["reference_words"] for r in rows)
    metrics: dict[str, Any] = {
        "wer": edits / ref_words if ref_words else None,
        "mean_row_wer": float(np.mean([r["wer"] for r in rows])) if rows else None,
        "n": len(rows),
        "n_failed": len(failed),
        "edits": edits,
        "reference_words": ref_words,
        "worst": sorted(rows, key=lambda r: (-r["wer"], r["row"]))[:worst],
        "failed": failed,
        "audio_seconds": round(audio_seconds, 3),
        "seconds": round(seconds, 3),
        "real_time_factor": round(seconds / audio_seconds, 4) if audio_seconds else None,
        "model": transcriber.weights_id,
        "window": transcriber.options.window,
    }
    if out_dir is not None:
        write_evaluation(Path(out_dir), metrics, rows, name)
    return metrics


def word_edits(reference: str, hypothesis: str) -> dict[str, Any]:
    """``{"wer", "edits", "reference_words"}`` of one row, from ``word_error_rate`` (edits =
    WER x reference words; an empty reference counts every hypothesis word as an insertion)."""
    n_ref = len(normalize_words(reference))
    wer = word_error_rate(reference, hypothesis)
    edits = round(wer * n_ref) if n_ref else len(normalize_words(hypothesis))
    return {"wer": wer, "edits": edits, "reference_words": n_ref}


def write_evaluation(out_dir: Path, metrics: dict[str, Any], rows: list[dict[str, Any]],
                     manifest_name: str) -> None:  # fmt: skip
    """``metrics.json``, ``report.md`` and ``transcripts.csv`` under ``out_dir``."""
    from modalforge.evaluate.document import Paragraph, Section, Table, to_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    with (
        atomic_path(out_dir / "transcripts.csv") as tmp,
        tmp.open("w", newline="", encoding="utf-8") as f,
    ):
        writer = csv.DictWriter(f, ["row", "audio", "reference", "hypothesis", "wer", "edits",
                                    "reference_words"])  # fmt: skip
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["row"]))

    def num(x: float | None) -> str:
        return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"

    summary = Table(["metric", "value"], [
        ["corpus WER (edits / reference words)", num(metrics["wer"])],
        ["mean per-row WER", num(metrics["mean_row_wer"])],
        ["rows scored", str(metrics["n"])],
        ["rows failed", str(metrics["n_failed"])],
        ["word edits / reference words", f"{metrics['edits']} / {metrics['reference_words']}"],
        ["audio seconds", f"{metrics['audio_seconds']:.1f}"],
        ["real-time factor", num(metrics["real_time_factor"])],
    ])  # fmt: skip
    note = Paragraph(
        f"{manifest_name}, model {metrics['model'] or 'whisper'}, window {metrics['window']}. "
        "Words are compared after lower-casing, dropping punctuation and spelling out digits "
        "0-10.",
        note=True,
    )
    worst = Table(
        ["row", "audio", "WER", "reference", "hypothesis"],
        [
            [str(r["row"]), r["audio"], num(r["wer"]), r["reference"], r["hypothesis"]]
            for r in metrics["worst"]
        ],
    )
    sections = [Section("Summary", [note, summary]), Section("Worst rows", [worst])]
    if metrics["failed"]:
        failed = Table(["row", "error"], [[str(r["row"]), r["error"]] for r in metrics["failed"]])
        sections.append(Section("Rows not scored", [failed]))
    atomic_write_text(out_dir / "report.md", to_markdown("Transcription evaluation", sections))
    atomic_write_json(out_dir / "metrics.json", metrics, ensure_ascii=False)


__all__ = ["evaluate_transcriber", "word_edits", "write_evaluation"]
