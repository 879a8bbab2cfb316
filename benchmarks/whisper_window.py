"""What Whisper tiny.en's trimmed window costs against the stock 30-s window.

    .venv/bin/python benchmarks/whisper_window.py --out benchmarks/results/whisper_window.json

(a) transcription: word error rate of greedy transcripts of 8 espeak-ng sentences (en-us,
    150 wpm; ``whisper.SENTENCES`` + 2) with the full window and the trimmed window + 2 s, 1 s
    (``transcribe``'s default) and no silence tail; repetition loops counted;
(b) downstream: the ``avdigits`` dataset (1,797 noisy spoken digits, 1 s each) is built into
    ``--data`` (default: a temporary folder), pooled ``whisper_tiny_en`` features are extracted
    for every clip per window (trimmed = the registry default, no tail; trimmed + 1-s tail; full),
    and a logistic regression (standardized, C=1, lbfgs, max_iter 2000) fitted on the train split
    is scored on val and test. Feature-extraction time is reported per window (log-mel included),
    in ``--runtime`` (default ``onnxruntime``, through ``OnnxEncoder``: same features within
    1e-5, half the time of eager on the full window; ``eager`` is the PyTorch reference).

Writes JSON and a small PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from _machine import write_results
from modalforge.data.audio import AudioConfig, load_audio
from modalforge.encoders import create_encoder
from modalforge.encoders.pretrained.whisper import (
    SENTENCES,
    load_packaged_whisper_tiny_en,
    transcribe_packaged,
    word_error_rate,
)

EXTRA_SENTENCES = (
    "turn left at the next corner and park near the bank",
    "the meeting has been moved to friday afternoon",
)
# (label, create_encoder options)
WINDOWS = (
    ("trimmed", {"window": "trimmed"}),
    ("trimmed_tail1s", {"window": "trimmed", "tail_seconds": 1.0}),
    ("full", {"window": "full"}),
)


# --------------------------------------------------------------------------- (a) transcription


def transcription(sentences: tuple[str, ...]) -> dict:
    from modalforge.data.catalog.speech import speak

    loaded = load_packaged_whisper_tiny_en()
    waves = [speak(s, voice="en-us", speed=150) for s in sentences]
    rows = [
        {"reference": s, "seconds": round(len(w) / 16_000, 2)}
        for s, w in zip(sentences, waves, strict=True)
    ]
    variants = {
        "full": {"window": "full"},
        "trimmed_tail2s": {"window": "trimmed", "tail_seconds": 2.0},
        "trimmed_tail1s": {"window": "trimmed", "tail_seconds": 1.0},
        "trimmed_tail0s": {"window": "trimmed", "tail_seconds": 0.0},
    }
    summary = {}
    for name, options in variants.items():
        start = time.perf_counter()
        with torch.inference_mode():
            texts = transcribe_packaged(loaded, waves, **options)
        seconds = time.perf_counter() - start
        for row, text in zip(rows, texts, strict=True):
            row[name] = text
            row[f"wer_{name}"] = round(word_error_rate(row["reference"], text), 3)
        summary[name] = {
            "mean_wer": round(float(np.mean([r[f"wer_{name}"] for r in rows])), 3),
            "exact_transcripts": sum(r[f"wer_{name}"] == 0 for r in rows),
            # the decoder repeating the sentence: 1.5x the reference's words or more
            "repetition_loops": sum(
                len(r[name].split()) >= 1.5 * len(r["reference"].split()) for r in rows
            ),
            "seconds": round(seconds, 2),
        }
        print(name, json.dumps(summary[name]), flush=True)
    return {
        "n_sentences": len(sentences),
        "voice": "espeak-ng en-us, 150 wpm",
        "decoding": "greedy, no timestamps",
        "summary": summary,
        "sentences": rows,
    }


# --------------------------------------------------------------------------- (b) downstream


def load_avdigits(
    folder: Path, limit: int | None = None
) -> tuple[pd.DataFrame, list[np.ndarray], dict, float]:
    from modalforge.data.catalog import build_dataset

    start = time.perf_counter()
    result = build_dataset("avdigits", folder, limit=limit)
    build_s = time.perf_counter() - start
    frame = pd.read_csv(result.manifest, keep_default_na=False, dtype=str)
    cfg = AudioConfig(clip_seconds=None)
    waves = [load_audio(folder / p, cfg) for p in frame["audio"]]
    info = json.loads((folder / "dataset.json").read_text())
    return frame, waves, info, build_s


def batches(waves: list[np.ndarray], size: int):
    for start in range(0, len(waves), size):
        chunk = waves[start : start + size]
        lengths = torch.tensor([len(w) for w in chunk])
        padded = torch.zeros(len(chunk), int(lengths.max()))
        for i, w in enumerate(chunk):
            padded[i, : len(w)] = torch.from_numpy(w)
        yield {"waves": padded, "wave_lengths": lengths}


def extract(
    options: dict, waves: list[np.ndarray], runtime: str, batch_size: int, cache: Path
) -> tuple[np.ndarray, dict]:
    """Pooled features of every clip, and how long they took (export excluded)."""
    from modalforge.runtime.onnx_encoder import OnnxEncoder

    encoder = create_encoder("whisper_tiny_en", **options).freeze()
    run = encoder
    export_s, diff = 0.0, None
    if runtime == "onnxruntime":
        run = OnnxEncoder(encoder, next(batches(waves[:2], 2)), cache=cache)
        export_s, diff = run.export_seconds, float(f"{run.max_abs_diff:.2e}")
    parts, per_batch = [], []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for batch in batches(waves, batch_size):
            t0 = time.perf_counter()
            parts.append(run(batch).pooled.numpy())
            if len(batch["waves"]) == batch_size:
                per_batch.append(time.perf_counter() - t0)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    median_batch = float(np.median(per_batch)) if per_batch else seconds
    timing = {
        "runtime": runtime,
        "batch_size": batch_size,
        "seconds": round(seconds, 1),
        "clips_per_s": round(len(waves) / seconds, 1),
        # from the median full batch: robust to a slow spell (the machine may be shared)
        "clips_per_s_median_batch": round(batch_size / median_batch, 1),
        # this process's CPU seconds (all threads): less sensitive than the wall time to other
        # processes sharing the cores; the 1-min load average before the run says if any did
        "cpu_seconds": round(cpu, 1),
        "load_average_before": None if load is None else round(load, 2),
        "export_seconds": round(export_s, 1),
        "onnx_vs_torch_max_abs_diff": diff,
    }
    return np.concatenate(parts), timing


def fit_and_score(x: np.ndarray, frame: pd.DataFrame) -> dict:
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = frame["label"].to_numpy()
    split = frame["split"].to_numpy()
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=0)
    )
    start = time.perf_counter()
    model.fit(x[split == "train"], y[split == "train"])
    fit_s = time.perf_counter() - start
    scores = {
        f"{name}_accuracy": round(float(model.score(x[split == name], y[split == name])), 4)
        for name in ("train", "val", "test")
    }
    # test has 179 rows (+-3.5 points): 5-fold stratified cross-validation over all rows too
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    cv = cross_val_score(clone(model), x, y, cv=folds)
    return scores | {
        "cv5_accuracy_mean": round(float(cv.mean()), 4),
        "cv5_accuracy_std": round(float(cv.std()), 4),
        "fit_seconds": round(fit_s, 2),
    }


def downstream(folder: Path, runtime: str, batch_size: int, full_batch_size: int,
               limit: int | None = None) -> dict:  # fmt: skip
    frame, waves, info, build_s = load_avdigits(folder, limit)
    baselines = info.get("baselines", {})
    recipe = info.get("recipe", {})
    seconds = sorted({round(len(w) / 16_000, 3) for w in waves})
    print(
        f"avdigits: {len(waves)} clips ({seconds[0]}-{seconds[-1]} s) in {build_s:.1f} s",
        flush=True,
    )
    out: dict = {
        "dataset": "avdigits",
        "recipe_version": recipe.get("recipe_version"),
        "audio_recipe": recipe.get("audio"),
        "build_seconds": round(build_s, 1),
        "clips": len(waves),
        "clip_seconds": [seconds[0], seconds[-1]],
        "splits": frame["split"].value_counts().to_dict(),
        "classifier": "StandardScaler + LogisticRegression(C=1, lbfgs, max_iter=2000), "
        "fit on train",
        "dataset_baselines": {
            k: baselines[k]
            for k in ("audio_accuracy", "val_accuracy", "audio_features")
            if k in baselines
        },
        "windows": {},
    }
    with tempfile.TemporaryDirectory() as cache:
        for name, options in WINDOWS:
            size = full_batch_size if options["window"] == "full" else batch_size
            x, timing = extract(options, waves, runtime, size, Path(cache))
            scores = fit_and_score(x, frame)
            out["windows"][name] = {"options": options, **scores, "extraction": timing}
            print(name, json.dumps(out["windows"][name]), flush=True)
    return out


# --------------------------------------------------------------------------- report


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    wer = payload["transcription"]["summary"]
    names = list(wer)
    ticks = [n.replace("_", "\n") for n in names]
    bars = axes[0].bar(ticks, [wer[n]["mean_wer"] for n in names], color="tab:purple")
    axes[0].bar_label(bars, fmt="%.3f", fontsize=8)
    axes[0].set_title(
        f"mean WER, {payload['transcription']['n_sentences']} espeak sentences", fontsize=9
    )
    windows = payload["downstream"]["windows"]
    names = list(windows)
    x = np.arange(len(names))
    for offset, key, label, color in (
        (-0.27, "val_accuracy", "val", "tab:green"),
        (0.0, "test_accuracy", "test", "tab:blue"),
        (0.27, "cv5_accuracy_mean", "5-fold CV", "tab:grey"),
    ):
        values = [100 * windows[n][key] for n in names]
        bars = axes[1].bar(x + offset, values, 0.27, label=label, color=color)
        axes[1].bar_label(bars, fmt="%.1f", fontsize=7)
    base = payload["downstream"]["dataset_baselines"].get("audio_accuracy")
    if base is not None:
        axes[1].axhline(100 * base, color="grey", ls="--", lw=0.8, label="log-mel stats (test)")
    axes[1].set_xticks(x, [n.replace("_", "\n") for n in names], fontsize=8)
    axes[1].set_ylim(0, 119)
    axes[1].set_title("avdigits audio-only accuracy (%), logistic regression", fontsize=9)
    axes[1].legend(fontsize=6, loc="upper left", ncol=4)
    runtime = windows[names[0]]["extraction"]["runtime"]
    rates = [windows[n]["extraction"]["clips_per_s_median_batch"] for n in names]
    bars = axes[2].bar([n.replace("_", "\n") for n in names], rates, color="tab:orange")
    axes[2].bar_label(bars, fmt="%.1f", fontsize=8)
    axes[2].set_yscale("log")
    axes[2].set_title(f"feature extraction, clips / s ({runtime}, log scale)", fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/whisper_window.json"))
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder for the avdigits build (default: a temporary one)",
    )
    parser.add_argument("--runtime", choices=("onnxruntime", "eager"), default="onnxruntime")
    parser.add_argument("--batch-size", type=int, default=32, help="trimmed windows")
    parser.add_argument("--full-batch-size", type=int, default=8, help="the 30-s window")
    parser.add_argument("--skip-downstream", action="store_true")
    parser.add_argument(
        "--limit", type=int, default=None, help="first N digits only (a quick check)"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    payload: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "transcription": transcription(SENTENCES + EXTRA_SENTENCES),
    }
    if not args.skip_downstream:
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.data or Path(tmp) / "avdigits"
            payload["downstream"] = downstream(
                folder, args.runtime, args.batch_size, args.full_batch_size, args.limit
            )
    payload["total_seconds"] = round(time.perf_counter() - start, 1)
    write_results(args.out, payload, plot if "downstream" in payload else None)
    print(f"wrote {args.out} in {payload['total_seconds']} s")


if __name__ == "__main__":
    main()
