"""Classification and regression over any mix of columns: ``MultimodalPredictor``.

    predictor = MultimodalPredictor(label="category", fusion="attention")
    predictor.fit("data/emoji/manifest.csv")
    predictor.evaluate("data/emoji/manifest.csv", split="test")
    predictor.save("runs/emoji/bundle")
    MultimodalPredictor.load("runs/emoji/bundle").predict([{"image": "x.png", "text": "..."}])

A model is encoders per column -> one fusion -> a head (``models.MultimodalModel``). Bundles say
``classification`` or ``regression``; both are this task. ``ClassifierServing`` answers
``/v1/predict`` with the label, every class's probability and each input's contribution.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from modalforge.data.manifest import Manifest
from modalforge.models import EncoderSpec, ModelConfig, MultimodalModel, build_model
from modalforge.models.multimodal import renamed_fusion_kwargs
from modalforge.schema import Schema
from modalforge.tasks.base import Data, FitConfig, TaskPredictor
from modalforge.tasks.prediction import Prediction, accuracy_by, prediction_table
from modalforge.tasks.serving import ServingAdapter
from modalforge.train.module import MultimodalModule

REGRESSION = "regression"


class MultimodalPredictor(TaskPredictor):
    """``task``: "classification" or "regression" (None: guessed from the label column)."""

    def __init__(
        self,
        label: str,
        task: str | None = None,
        fusion: str = "concat",
        fusion_kwargs: dict[str, Any] | None = None,
        encoders: dict[str, EncoderSpec | str] | None = None,
        columns: list[str] | None = None,
        schema: Schema | None = None,
        fusion_out_dim: int = 256,
        fit_config: FitConfig | None = None,
        cache_dir: str | Path | None = None,
        on_bad_row: str = "skip",
        hidden: int | None = None,
    ) -> None:
        super().__init__(label=label, task=task, encoders=encoders, columns=columns,
                         schema=schema, fit_config=fit_config, cache_dir=cache_dir,
                         on_bad_row=on_bad_row)  # fmt: skip
        if hidden is not None:
            warnings.warn("MultimodalPredictor(hidden=...) is now fusion_out_dim=... (the "
                          "fusion's output width)", DeprecationWarning, stacklevel=2)  # fmt: skip
            fusion_out_dim = hidden
        self.fusion = fusion
        self.fusion_kwargs = renamed_fusion_kwargs(fusion_kwargs or {})
        self.fusion_out_dim = fusion_out_dim

    @property
    def classifies(self) -> bool:
        return self.task != REGRESSION

    @classmethod
    def from_config(cls, config: dict[str, Any], label: str | None, task: str,
                    cache_dir=None) -> MultimodalPredictor:  # fmt: skip
        parsed = ModelConfig.from_dict(config)
        predictor = cls(label=label or "", task=task, fusion=parsed.fusion,
                        fusion_kwargs=parsed.fusion_kwargs, fusion_out_dim=parsed.fusion_out_dim,
                        cache_dir=cache_dir)  # fmt: skip
        predictor.config = parsed
        return predictor

    # -- fit hooks ------------------------------------------------------------------------------
    def _prepare_labels(self, manifest: Manifest) -> None:
        if self.task is None:
            self.task = guess_task(manifest.frame[self.label])
        if self.classifies:
            self.labels = sorted({str(v) for v in manifest.frame[self.label]})

    @property
    def _stratify(self) -> bool:
        return self.classifies

    def _monitor(self) -> str:
        return self.fit_config.monitor if self.classifies else "val_loss"

    def _targets(self, manifest: Manifest) -> list:
        values = manifest.frame[self.label].tolist()
        if not self.classifies:
            return [float(v) for v in values]
        index = {c: i for i, c in enumerate(self.labels)}  # type: ignore[arg-type]
        return [index[str(v)] for v in values]

    def _class_weights(self, train_m: Manifest) -> torch.Tensor | None:
        if not self.classifies or self.fit_config.class_weights != "balanced":
            return None
        n = len(self.labels)  # type: ignore[arg-type]
        counts = np.bincount(self._targets(train_m), minlength=n).astype(np.float64)
        return torch.tensor(counts.sum() / (n * np.maximum(counts, 1)), dtype=torch.float32)

    def _soft_targets(self, teacher, train_m: Manifest, val_m: Manifest, progress: bool):
        if not self.classifies or getattr(teacher, "labels", None) != self.labels:
            return super()._soft_targets(teacher, train_m, val_m, progress)
        return {name: _log_probs(teacher, part, progress)
                for name, part in (("train", train_m), ("val", val_m))}  # fmt: skip

    def _known_rows(self, manifest: Manifest) -> Manifest:
        if not self.classifies:
            return manifest
        known = manifest.frame[self.label].astype(str).isin(self.labels)  # type: ignore[arg-type]
        if not known.all():
            print(f"note: {int((~known).sum())} rows have labels the model never saw; left out")
            manifest = manifest.subset(np.flatnonzero(known.to_numpy()))
        return manifest

    def _build(self, inputs: dict[str, EncoderSpec]) -> None:
        num_outputs = len(self.labels) if self.classifies else 1  # type: ignore[arg-type]
        self.config = ModelConfig(task=self.task, inputs=inputs, num_outputs=num_outputs,  # type: ignore[arg-type]
                                  fusion=self.fusion, fusion_kwargs=self.fusion_kwargs,
                                  fusion_out_dim=self.fusion_out_dim)  # fmt: skip
        self.model = self._new_model()

    def _new_model(self) -> MultimodalModel:
        return build_model(self.config)

    def _module(self, class_weights: torch.Tensor | None):
        return MultimodalModule(self.model, self.classifies, self.fit_config.optim,
                                class_weights)  # fmt: skip

    # -- predict ----------------------------------------------------------------------------
    def predict_proba(
        self,
        data: Data,
        root: str | Path | None = None,
        drop: set[str] = frozenset(),
        progress: bool = False,
        _cached=None,
    ) -> Prediction:
        """Class probabilities (N, C) for every row (regression: values (N, 1)). ``drop`` masks
        columns as missing (modality ablation)."""
        model = self._require_model()
        manifest = self._manifest(data, root)
        cached = _cached if _cached is not None else self._cached_features(manifest, progress)
        loader = self._loader(manifest, cached)
        probs, weights, present = [], [], {c: [] for c in model.columns}
        with torch.no_grad():
            for batch in loader:
                for c in drop:
                    batch["mask"][c] = torch.zeros_like(batch["mask"][c])
                out = model(batch["inputs"], batch["mask"], features=batch["features"])
                probs.append(out.outputs.softmax(-1) if self.classifies else out.outputs)
                if out.weights is not None:
                    weights.append(out.weights)
                for c in model.columns:
                    present[c].append(batch["mask"][c])
        return Prediction(
            probs=torch.cat(probs).numpy(),
            weights=torch.cat(weights).numpy() if weights else None,
            present={c: torch.cat(v).numpy() for c, v in present.items()},
        )

    def contributions(self, manifest: Manifest, base: Prediction, cached) -> dict[str, np.ndarray]:
        """Each column's contribution to each row's predicted class: p(pred | all inputs) -
        p(pred | that column removed). (N,) per column; 0 where the column was missing."""
        pred = base.probs.argmax(1)
        out = {}
        for column in self._require_model().columns:
            without = self.predict_proba(manifest, drop={column}, _cached=cached).probs
            delta = base.probs[np.arange(len(pred)), pred] - without[np.arange(len(pred)), pred]
            out[column] = np.where(base.present[column], delta, 0.0)
        return out

    def predict(self, data: Data, root: str | Path | None = None) -> pd.DataFrame:
        """One row per input: the predicted label, each class's probability and each input
        column's contribution (classification); the predicted value (regression)."""
        manifest = self._manifest(data, root)
        cached = self._cached_features(manifest, progress=False)
        base = self.predict_proba(manifest, _cached=cached)
        table = prediction_table(base.probs, self.labels if self.classifies else None)
        if not self.classifies:
            return table
        for column, values in self.contributions(manifest, base, cached).items():
            table[f"contribution:{column}"] = values
        return table

    # -- evaluate ---------------------------------------------------------------------------
    def evaluate(
        self,
        data: Data,
        split: str | None = None,
        out_dir: str | Path | None = None,
        ablation: bool = True,
        title: str | None = None,
        by: str | None = None,
    ) -> dict[str, Any]:
        """Metrics on ``data`` (only rows whose ``split`` column equals ``split``, if given), a
        modality-ablation table and the fusion's weights; with ``out_dir``, ``report.md`` +
        ``report.html`` + PNG plots. ``by``: a column (a VQA question type) whose groups get
        their own accuracy, beside answering each group's most common label. Returns the
        metrics as a JSON-safe dict."""
        from modalforge.evaluate import (
            classification_metrics,
            modality_ablation,
            regression_metrics,
            summarize_weights,
            write_report,
        )

        model = self._require_model()
        manifest = self.evaluation_rows(data, split)
        cached = self._cached_features(manifest, progress=False)
        warm = manifest.subset(range(min(8, len(manifest))))  # first calls pay one-off costs
        self.predict_proba(
            warm, _cached={c: (f[: len(warm)], p[: len(warm)]) for c, (f, p) in cached.items()}
        )
        t0 = time.perf_counter()
        base = self.predict_proba(manifest, _cached=cached)
        latency_ms = 1000 * (time.perf_counter() - t0) / len(manifest)
        y = np.asarray(self._targets(manifest))
        rows, weights, groups = None, None, None
        if not self.classifies:
            metrics = regression_metrics(y, base.probs[:, 0])
        else:
            metrics = classification_metrics(y, base.probs, self.labels)  # type: ignore[arg-type]
            if ablation and len(model.columns) > 1:
                rows = modality_ablation(
                    lambda drop: self.predict_proba(manifest, drop=drop, _cached=cached).probs,
                    y, list(model.columns),
                )  # fmt: skip
            if base.weights is not None:
                present = np.stack([base.present[c] for c in model.columns], axis=1)
                weights = summarize_weights(base.weights, list(model.columns), present)
            if by is not None:
                groups = accuracy_by(manifest.frame, by, y, base.probs.argmax(1), self.labels)  # type: ignore[arg-type]
        extra = {
            "rows": len(manifest),
            "fusion": self.fusion,
            "encoders": {c: s.name for c, s in self.config.inputs.items()},
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable parameters (fusion + head + trained encoders)": sum(
                p.numel() for p in model.parameters() if p.requires_grad
            ),
            "latency per row, cached features (ms)": round(latency_ms, 4),
        }
        headline = metrics.headline()
        for key, g in (groups or {}).items():
            headline[f"accuracy {by}={key}"] = g["accuracy"]
        result = {
            "metrics": metrics.to_dict(),
            "headline": headline,
            **({"by": {"column": by, "groups": groups}} if groups else {}),
            "ablation": [r.to_dict() for r in rows] if rows else None,
            "weights": weights,
            **extra,
        }
        if out_dir is not None:
            tables = {f"Accuracy by {by}": [
                {by: k, "rows": g["rows"], "accuracy": g["accuracy"],
                 "majority answer": g["majority"], "its accuracy": g["majority_accuracy"]}
                for k, g in groups.items()]} if groups else None  # fmt: skip
            report = write_report(out_dir, title or f"modalforge: {self.label}", metrics,
                                  ablation=rows, weights=weights, extra=extra,
                                  tables=tables)  # fmt: skip
            result["report"] = str(report)
        return result


def _log_probs(teacher, manifest: Manifest, progress: bool) -> torch.Tensor:
    """The teacher's log-probabilities for every row (as logits: softmax gives back its
    probabilities at any temperature)."""
    probs = teacher.predict_proba(manifest, progress=progress).probs
    return torch.from_numpy(np.log(np.clip(probs, 1e-12, None))).float()


def guess_task(values: pd.Series) -> str:
    """Regression for float columns with many distinct values, else classification."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all() and numeric.nunique() > 20 and not (numeric == numeric.round()).all():
        return REGRESSION
    return "classification"


def from_options(options, encoders, fit: FitConfig, schema) -> MultimodalPredictor:
    """``modalforge train``'s options -> a classifier or regressor."""
    if not options.label:
        raise ValueError("a label column is needed (--label), except for --task contrastive "
                         "and caption")  # fmt: skip
    if options.loss is None and options.task == REGRESSION:
        fit.optim.loss = "mse"
    return MultimodalPredictor(label=options.label, task=options.task, fusion=options.fusion,
                               fusion_kwargs=options.fusion_kwargs, encoders=encoders,
                               columns=options.columns, schema=schema,
                               fusion_out_dim=options.fusion_out_dim, fit_config=fit,
                               cache_dir=options.cache_dir,
                               on_bad_row=options.on_bad_row)  # fmt: skip


class ClassifierServing(ServingAdapter):
    """``/v1/predict``: the label (or value), every class's probability, each input's
    contribution and the fusion's weights."""

    def card(self, base, serving):
        return {**super().card(base, serving), "fusion": self.predictor.fusion}

    def outputs(self, samples: list) -> np.ndarray:
        """The head's raw outputs (B, C) with every given input."""
        feats, mask = self.engine.features(samples)
        return self.engine.model({}, mask, features=feats).outputs.float().cpu().numpy()

    def predict(self, samples: list) -> list[dict[str, Any]]:
        """Each encoder once on the rows that have its modality, then the fusion head once on
        ``1 + M`` copies of the batch (all inputs, and each input masked out) for the
        per-modality contributions."""
        feats, mask = self.engine.features(samples)
        columns = [c.name for c in self.engine.inputs]
        n, k = len(samples), 1 + len(columns)
        # copy 0: every input; copy j: input j masked out
        tiled = {c: f.repeat(k, 1) for c, f in feats.items()}
        tiled_mask = {}
        for j, c in enumerate(columns):
            m = mask[c].repeat(k)
            m[(j + 1) * n : (j + 2) * n] = False
            tiled_mask[c] = m
        out = self.engine.model({}, tiled_mask, features=tiled)
        raw = out.outputs.float()
        values = raw.softmax(-1) if self.predictor.classifies else raw
        values = values.cpu().numpy().reshape(k, n, -1)
        weights = None if out.weights is None else out.weights[:n].float().cpu().numpy()
        present = {c: mask[c].cpu().numpy() for c in columns}
        return [self._result(i, values, weights, present, columns) for i in range(n)]

    def _result(self, i: int, values: np.ndarray, weights, present, columns) -> dict[str, Any]:
        used = [c for c in columns if present[c][i]]
        base = values[0, i]
        labels = self.engine.labels
        if self.predictor.classifies:
            pred = int(base.argmax())
            score = lambda v: float(v[pred])  # noqa: E731
            result: dict[str, Any] = {
                "label": labels[pred],
                "confidence": float(base[pred]),
                "probabilities": {name: float(p) for name, p in zip(labels, base, strict=True)},
            }
        else:
            score = lambda v: float(v[0])  # noqa: E731
            result = {"prediction": float(base[0])}
        result["modalities"] = used
        # contribution: the prediction's score with every input minus without this one
        result["contributions"] = {
            c: round(score(base) - score(values[j + 1, i]), 6) if present[c][i] else None
            for j, c in enumerate(columns)
        }
        if weights is not None:
            result["fusion_weights"] = {
                c: round(float(w), 6) for c, w in zip(columns, weights[i], strict=True)
            }
        return result


__all__ = ["ClassifierServing", "MultimodalPredictor", "from_options", "guess_task"]
