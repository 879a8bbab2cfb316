"""Ensembles of multimodal models: ``modalforge ensemble --members N``.

    result = train_ensemble(RunOptions(manifest="data/emoji/manifest.csv", label="category"),
                            members=5, out="runs/ensemble", by="seed")
    EnsemblePredictor.load("runs/ensemble").predict_proba("data/emoji/manifest.csv")

Every member sees the same test rows: the manifest's ``split`` column, or the predictor's seeded
split for ``options.seed``, pinned before any member trains. ``by="seed"``: member i trains on
the same train / val rows with seed ``options.seed + i``. ``by="fold"``: the train + val rows are
dealt into N stratified (grouped) folds and member i validates on fold i and trains on the others.

Each member is a bundle ``OUT/member-i/bundle`` with its own report; the ensemble, the mean of
the members' class probabilities (or values, for regression), is evaluated on the test split as
one model in ``OUT/report/``; ``OUT/ensemble.json`` lists the bundles and every metric, and
``OUT/predictions.csv`` holds the ensemble's test predictions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from modalforge.data.manifest import Manifest
from modalforge.experiments.crossval import assign_folds
from modalforge.experiments.run import RunOptions, train_run
from modalforge.experiments.sweep import ROW, pinned_split, split_counts
from modalforge.files import atomic_path, atomic_write_json
from modalforge.tasks.classification import MultimodalPredictor
from modalforge.tasks.prediction import Prediction, prediction_table


class EnsemblePredictor:
    """The mean of several predictors' probabilities, used like one ``MultimodalPredictor``."""

    def __init__(self, predictors: Sequence[MultimodalPredictor]) -> None:
        members = list(predictors)
        if not members:
            raise ValueError("an ensemble needs at least one member")
        first = members[0]
        for i, m in enumerate(members, start=1):
            if m.model is None:
                raise ValueError(f"member {i} has no model: fit or load it first")
            same = (m.task, m.label, m.labels) == (first.task, first.label, first.labels)
            if not same:
                raise ValueError(
                    f"member {i} predicts {m.task} of {m.label!r} over {m.labels}, member 1 "
                    f"{first.task} of {first.label!r} over {first.labels}"
                )
        self.members = members
        self.task = first.task
        self.classifies = first.classifies
        self.label = first.label
        self.labels = first.labels
        self.schema = first.schema

    @classmethod
    def load(
        cls, paths: str | Path | Sequence[str | Path], cache_dir: str | Path | None = None
    ) -> EnsemblePredictor:
        """From bundle folders, or from an ensemble folder (one with ``ensemble.json``)."""
        if isinstance(paths, str | Path):
            folder = Path(paths)
            index = folder / "ensemble.json"
            if not index.is_file():
                raise FileNotFoundError(f"{index}: not an ensemble folder (give bundle paths)")
            paths = [folder / b for b in json.loads(index.read_text())["bundles"]]
        return cls([MultimodalPredictor.load(p, cache_dir=cache_dir) for p in paths])

    def __len__(self) -> int:
        return len(self.members)

    def _member_probs(self, manifest: Manifest, drop=frozenset(), cached=None) -> list[Prediction]:
        cached = cached or [None] * len(self.members)
        return [
            m.predict_proba(manifest, drop=drop, _cached=c)
            for m, c in zip(self.members, cached, strict=True)
        ]

    def predict_proba(
        self,
        data: str | Path | Manifest | pd.DataFrame | list[dict],
        root: str | Path | None = None,
        drop: set[str] = frozenset(),
    ) -> Prediction:
        """Mean class probabilities (N, C) of the members (regression: mean values (N, 1));
        ``present`` from the first member, no fusion weights."""
        manifest = self.members[0]._manifest(data, root)
        preds = self._member_probs(manifest, drop)
        return Prediction(
            probs=average([p.probs for p in preds]), weights=None, present=preds[0].present
        )

    def predict(
        self,
        data: str | Path | Manifest | pd.DataFrame | list[dict],
        root: str | Path | None = None,
    ) -> pd.DataFrame:
        """Per row: the predicted label, its probability and every class's (classification);
        the predicted value (regression)."""
        labels = self.labels if self.classifies else None
        return prediction_table(self.predict_proba(data, root).probs, labels)

    def evaluate(
        self,
        data: str | Path | Manifest | pd.DataFrame,
        split: str | None = None,
        out_dir: str | Path | None = None,
        ablation: bool = True,
        title: str | None = None,
    ) -> dict[str, Any]:
        """Metrics of the averaged probabilities on ``data`` (rows whose ``split`` column equals
        ``split``, if given) and of each member alone; with ``out_dir`` a report folder like
        ``MultimodalPredictor.evaluate``'s. Also returns ``probs`` (N, C) and ``y`` (N,)."""
        from modalforge.evaluate import (
            classification_metrics,
            modality_ablation,
            regression_metrics,
            write_report,
        )

        first = self.members[0]
        manifest = first.evaluation_rows(data, split)
        cached = [m._cached_features(manifest, progress=False) for m in self.members]
        t0 = time.perf_counter()
        member_probs = [p.probs for p in self._member_probs(manifest, cached=cached)]
        probs = average(member_probs)
        latency_ms = 1000 * (time.perf_counter() - t0) / len(manifest)
        y = np.asarray(first._targets(manifest))
        columns = list(first.model.columns)  # type: ignore[union-attr]
        rows = None
        if self.classifies:
            metrics = classification_metrics(y, probs, self.labels)  # type: ignore[arg-type]
            members = [classification_metrics(y, p, self.labels).headline() for p in member_probs]  # type: ignore[arg-type]
            if ablation and len(columns) > 1:
                rows = modality_ablation(
                    lambda drop: average(
                        [p.probs for p in self._member_probs(manifest, drop, cached)]
                    ),
                    y,
                    columns,
                )
        else:
            metrics = regression_metrics(y, probs[:, 0])
            members = [regression_metrics(y, p[:, 0]).headline() for p in member_probs]
        extra = {
            "rows": len(manifest),
            "members": len(self.members),
            "fusions": [m.fusion for m in self.members],
            "parameters": sum(
                p.numel()
                for m in self.members
                for p in m.model.parameters()  # type: ignore[union-attr]
            ),
            "latency per row, cached features (ms)": round(latency_ms, 4),
            "member metrics": members,
        }
        result: dict[str, Any] = {
            "metrics": metrics.to_dict(),
            "headline": metrics.headline(),
            "ablation": [r.to_dict() for r in rows] if rows else None,
            **extra,
        }
        if out_dir is not None:
            title = title or f"modalforge ensemble of {len(self.members)}: {self.label}"
            report = write_report(out_dir, title, metrics, ablation=rows, extra=extra)
            result["report"] = str(report)
        result["probs"] = probs
        result["y"] = y
        result["manifest"] = manifest
        return result


def average(probs: Sequence[np.ndarray]) -> np.ndarray:
    """The members' probabilities averaged, row by row: ``mean`` over the member axis."""
    return np.mean(np.stack(probs), axis=0)


def train_ensemble(
    options: RunOptions,
    members: int = 5,
    out: str | Path | None = None,
    by: Literal["seed", "fold"] = "seed",
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``members`` models (see the module docstring for ``by``), save each as a bundle,
    evaluate the ensemble and each member on the test split. ``out`` defaults to
    ``options.out``. Returns what ``OUT/ensemble.json`` holds plus the ``predictor``
    (an ``EnsemblePredictor``)."""
    if by not in ("seed", "fold"):
        raise ValueError(f"by must be 'seed' or 'fold', got {by!r}")
    if members < 1 or (by == "fold" and members < 2):
        raise ValueError(f"need at least {2 if by == 'fold' else 1} members, got {members}")
    out = Path(out if out is not None else options.out)
    prepared, split = pinned_split(options, out, progress, "evaluate the ensemble on")
    fold = None
    if by == "fold":
        pool = np.flatnonzero((split == "train") | (split == "val"))
        fold = np.full(len(split), -1, dtype=np.int64)
        fold[pool] = assign_folds(
            [prepared.strata[i] for i in pool],
            members,
            options.seed,
            [prepared.groups[i] for i in pool] if prepared.groups is not None else None,
        )

    summaries = []
    for i in range(members):
        member_split = split.copy()
        if fold is not None:
            pool = fold >= 0
            member_split[pool] = np.where(fold[pool] == i, "val", "train")
        run_options = replace(
            options,
            out=str(out / f"member-{i + 1}"),
            seed=options.seed + i if by == "seed" else options.seed,
            save_bundle=True,
            resume=False,
        )
        print(f"ensemble: member {i + 1} of {members} (by {by}) -> {run_options.out}")
        summaries.append(train_run(run_options, progress, prepared.with_split(member_split)))

    ensemble = EnsemblePredictor([s["predictor"] for s in summaries])
    test = prepared.with_split(split)
    test = test.subset(np.flatnonzero(split == "test"))
    evaluation = ensemble.evaluate(test, out_dir=out / "report")
    _write_predictions(ensemble, evaluation, out / "predictions.csv")

    result: dict[str, Any] = {
        "by": by,
        "members": len(summaries),
        "task": prepared.task,
        "seed": options.seed,
        "rows": split_counts(split),
        "bundles": [f"member-{i + 1}/bundle" for i in range(len(summaries))],
        "member_runs": [
            {
                "member": i + 1,
                "bundle": s["bundle"],
                "seed": options.seed + i if by == "seed" else options.seed,
                "rows": s["history"]["rows"],
                "epochs": s["history"]["epochs_run"],
                "metrics": s.get("headline"),
            }
            for i, s in enumerate(summaries)
        ],
        "ensemble": evaluation["headline"],
        "latency per row, cached features (ms)": evaluation[
            "latency per row, cached features (ms)"
        ],
        "report": evaluation.get("report"),
        "predictions": str(out / "predictions.csv"),
        "split": str(out / "split.csv"),
    }
    atomic_write_json(out / "ensemble.json", result, default=str)
    result["predictor"] = ensemble
    return result


def _write_predictions(ensemble: EnsemblePredictor, evaluation: dict[str, Any], path: Path) -> Path:
    """The ensemble's test predictions: manifest row, true value, prediction, probabilities."""
    manifest: Manifest = evaluation["manifest"]
    probs, y = evaluation["probs"], evaluation["y"]
    table = pd.DataFrame({"row": manifest.frame[ROW].to_numpy()})
    if ensemble.classifies:
        labels = ensemble.labels or []
        table["label"] = [labels[i] for i in y]
        table["prediction"] = [labels[i] for i in probs.argmax(1)]
        for i, name in enumerate(labels):
            table[f"p:{name}"] = probs[:, i]
    else:
        table["value"] = y
        table["prediction"] = probs[:, 0]
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path
