"""Classification and regression metrics over arrays of labels and predictions (torchmetrics).

Conventions, each checked against scikit-learn in ``tests/test_evaluate.py``:

* The predicted class is ``argmax(probs)``, the first class on ties.
* ``zero_division=0``: a class that is never predicted has precision 0 (and one absent from
  ``y_true`` recall 0), as sklearn's ``precision_recall_fscore_support(zero_division=0)``.
* Macro precision, recall and F1 average over the classes that occur in ``y_true`` or in the
  predictions (torchmetrics' rule; equal to sklearn without ``labels=``). A class absent from both
  shows 0 in the per-class table but does not pull the macro average down.
* AUROC of a class is undefined (``None``) when ``y_true`` has no positive or no negative sample
  of it. The macro AUROC is the mean over the classes where it is defined (``None`` if there are
  none). sklearn's ``roc_auc_score(multi_class="ovr")`` raises when a class is absent from
  ``y_true`` (or, with ``labels=``, warns and returns NaN); with every class present the two
  agree. Average precision of a class without positives is ``None`` too.
* ECE is top-label, L1, over 15 equal-width confidence bins (``multiclass_calibration_error``).
* Log loss is the mean of ``-log p[y]`` with ``p`` clipped to ``[eps, 1 - eps]`` (float64 eps),
  as sklearn's ``log_loss`` on float64 input; torchmetrics has no multiclass log loss.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_average_precision,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_precision_recall_curve,
    multiclass_recall,
    multiclass_roc,
)
from torchmetrics.functional.regression import mean_absolute_error, mean_squared_error, r2_score

from modalforge.evaluate._convert import (
    ArrayLike,
    as_labels,
    as_probs,
    as_values,
    json_safe,
    opt_float,
    scalar,
)

ECE_BINS = 15


@dataclass(frozen=True)
class ClassMetrics:
    """One row of the per-class table."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int  # samples of this class in y_true
    auroc: float | None  # one-vs-rest; None when undefined


@dataclass(frozen=True)
class Curve:
    """One class's ROC (``x`` = FPR, ``y`` = TPR) or PR (``x`` = recall, ``y`` = precision)
    curve: 1-D float arrays of equal length ``(K,)``, plus its area (AUROC or average precision),
    ``None`` where the curve is undefined for that class and should not be drawn."""

    x: np.ndarray
    y: np.ndarray
    thresholds: np.ndarray
    area: float | None

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {"x": self.x, "y": self.y, "thresholds": self.thresholds, "area": self.area}
        )


@dataclass(frozen=True)
class CalibrationBins:
    """Equal-width confidence bins for a reliability diagram, all arrays ``(B,)``: ``lower`` and
    ``upper`` edges, ``count`` of samples, their mean top-label ``confidence`` and ``accuracy``
    (NaN for an empty bin). A confidence of exactly 1 is counted in the last bin."""

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "lower": self.lower,
                "upper": self.upper,
                "count": self.count,
                "confidence": self.confidence,
                "accuracy": self.accuracy,
            }
        )


@dataclass
class ClassificationMetrics:
    class_names: list[str]
    n: int
    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    precision_micro: float
    recall_micro: float
    f1_micro: float
    auroc_macro: float | None
    ece: float
    log_loss: float
    per_class: list[ClassMetrics]
    confusion: np.ndarray = field(repr=False)  # (C, C) int64, rows = true, columns = predicted
    roc: list[Curve] = field(repr=False)  # one per class
    pr: list[Curve] = field(repr=False)  # one per class
    calibration: CalibrationBins = field(repr=False)

    kind: ClassVar[str] = "classification"

    def headline(self) -> dict[str, float | int | None]:
        """The numbers a summary line shows. Micro P/R/F1 are left out: with one label per sample
        they all equal accuracy."""
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "f1_macro": self.f1_macro,
            "auroc_macro": self.auroc_macro,
            "ece": self.ece,
            "log_loss": self.log_loss,
        }

    def to_dict(self, curves: bool = False) -> dict[str, Any]:
        """Plain JSON values; the ROC and PR curves (up to N + 1 points per class) only with
        ``curves=True``."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "class_names": self.class_names,
            "n": self.n,
            "accuracy": self.accuracy,
            "precision_macro": self.precision_macro,
            "recall_macro": self.recall_macro,
            "f1_macro": self.f1_macro,
            "precision_micro": self.precision_micro,
            "recall_micro": self.recall_micro,
            "f1_micro": self.f1_micro,
            "auroc_macro": self.auroc_macro,
            "ece": self.ece,
            "log_loss": self.log_loss,
            "per_class": [asdict(c) for c in self.per_class],
            "average_precision": [c.area for c in self.pr],
            "confusion_matrix": self.confusion,
            "calibration": self.calibration.to_dict(),
        }
        if curves:
            out["roc"] = [c.to_dict() for c in self.roc]
            out["pr"] = [c.to_dict() for c in self.pr]
        return json_safe(out)


@dataclass
class RegressionMetrics:
    n: int
    mse: float
    rmse: float  # sqrt(mse) over all outputs together
    mae: float
    r2: float | None  # mean over outputs; None when a target column is constant or n < 2
    y_true: np.ndarray = field(repr=False)  # (N,) or (N, T), kept for the report's plots
    y_pred: np.ndarray = field(repr=False)

    kind: ClassVar[str] = "regression"

    def headline(self) -> dict[str, float | int | None]:
        return {"n": self.n, "rmse": self.rmse, "mae": self.mae, "r2": self.r2}

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "kind": self.kind,
                "n": self.n,
                "mse": self.mse,
                "rmse": self.rmse,
                "mae": self.mae,
                "r2": self.r2,
            }
        )


def classification_metrics(
    y_true: ArrayLike, probs: ArrayLike, class_names: list[str]
) -> ClassificationMetrics:
    """``y_true`` ``(N,)`` class indices in ``[0, C)`` and ``probs`` ``(N, C)`` rows of class
    probabilities (rows sum to 1; logits are rejected) -> every metric of the module docstring.
    ``class_names`` has ``C`` entries, in column order."""
    names = [str(c) for c in class_names]
    num_classes = len(names)
    y = as_labels(y_true)
    p = as_probs(probs, len(y), num_classes)
    y = as_labels(y, num_classes)
    pred = p.argmax(dim=1)
    n = len(y)

    def per_class_and(fn: Any) -> tuple[torch.Tensor, float, float]:
        kw = {"num_classes": num_classes, "zero_division": 0}
        return (
            fn(pred, y, average="none", **kw),
            scalar(fn(pred, y, average="macro", **kw)),
            scalar(fn(pred, y, average="micro", **kw)),
        )

    precision, precision_macro, precision_micro = per_class_and(multiclass_precision)
    recall, recall_macro, recall_micro = per_class_and(multiclass_recall)
    f1, f1_macro, f1_micro = per_class_and(multiclass_f1_score)
    support = torch.bincount(y, minlength=num_classes)
    # one-vs-rest needs both a positive and a negative sample of the class
    roc_defined = (support > 0) & (support < n)
    roc = _roc_curves(p, y, num_classes, roc_defined)
    pr = _pr_curves(p, y, num_classes, support > 0)
    per_class = [
        ClassMetrics(
            name=names[k],
            precision=scalar(precision[k]),
            recall=scalar(recall[k]),
            f1=scalar(f1[k]),
            support=int(support[k]),
            auroc=roc[k].area,
        )
        for k in range(num_classes)
    ]
    eps = torch.finfo(torch.float64).eps
    p_true = p[torch.arange(n), y].clamp(eps, 1 - eps)
    return ClassificationMetrics(
        class_names=names,
        n=n,
        accuracy=scalar(multiclass_accuracy(pred, y, num_classes, average="micro")),
        precision_macro=precision_macro,
        recall_macro=recall_macro,
        f1_macro=f1_macro,
        precision_micro=precision_micro,
        recall_micro=recall_micro,
        f1_micro=f1_micro,
        auroc_macro=_mean([c.area for c in roc]),
        ece=scalar(multiclass_calibration_error(p, y, num_classes, n_bins=ECE_BINS, norm="l1")),
        log_loss=scalar(-p_true.log().mean()),
        per_class=per_class,
        confusion=multiclass_confusion_matrix(pred, y, num_classes).numpy().astype(np.int64),
        roc=roc,
        pr=pr,
        calibration=_calibration_bins(p, y),
    )


def accuracy_macro_f1(y_true: ArrayLike, probs: ArrayLike) -> tuple[float, float]:
    """``(N,)`` labels and ``(N, C)`` probs -> ``(accuracy, macro F1)`` with the same rules as
    ``classification_metrics``, without its curves (cheap enough to call once per ablation)."""
    y = as_labels(y_true)
    p = as_probs(probs, len(y))
    y = as_labels(y, p.shape[1])
    pred = p.argmax(dim=1)
    num_classes = p.shape[1]
    accuracy = multiclass_accuracy(pred, y, num_classes, average="micro")
    f1 = multiclass_f1_score(pred, y, num_classes, average="macro", zero_division=0)
    return scalar(accuracy), scalar(f1)


def _calibration_bins(
    probs: torch.Tensor, y: torch.Tensor, n_bins: int = ECE_BINS
) -> CalibrationBins:
    """Top-label reliability bins of ``(N, C)`` probs against ``(N,)`` labels, with the same
    left-closed bin edges as torchmetrics' calibration error."""
    predicted = probs.argmax(dim=1)
    confidence = probs.gather(1, predicted[:, None]).squeeze(1)
    correct = (predicted == y).to(torch.float64)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(
        0, index, torch.ones_like(correct)
    )
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, index, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, index, correct)
    with np.errstate(invalid="ignore", divide="ignore"):
        return CalibrationBins(
            lower=edges[:-1].numpy(),
            upper=edges[1:].numpy(),
            count=count.numpy().astype(np.int64),
            confidence=(conf_sum / count).numpy(),
            accuracy=(acc_sum / count).numpy(),
        )


def regression_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> RegressionMetrics:
    """``y_true`` and ``y_pred`` of the same shape, ``(N,)`` or ``(N, T)`` -> MSE, RMSE, MAE and
    R2. With ``T`` outputs, MSE and MAE average over every value and R2 over the outputs
    (sklearn's ``multioutput="uniform_average"``)."""
    target = as_values(y_true, "y_true")
    preds = as_values(y_pred, "y_pred")
    if target.shape != preds.shape:
        raise ValueError(
            f"y_true and y_pred shapes differ: {tuple(target.shape)} != {tuple(preds.shape)}"
        )
    mse = scalar(mean_squared_error(preds, target))
    columns = target.reshape(len(target), -1)
    # torchmetrics warns and returns 0 or -inf-like values here; undefined is more honest
    constant = bool((columns.max(dim=0).values == columns.min(dim=0).values).any())
    r2 = None if len(target) < 2 or constant else opt_float(r2_score(preds, target))
    return RegressionMetrics(
        n=len(target),
        mse=mse,
        rmse=math.sqrt(mse),
        mae=scalar(mean_absolute_error(preds, target)),
        r2=r2,
        y_true=target.numpy(),
        y_pred=preds.numpy(),
    )


def _roc_curves(
    p: torch.Tensor, y: torch.Tensor, num_classes: int, defined: torch.Tensor
) -> list[Curve]:
    """Per-class ROC curves, with area (AUROC) ``None`` where not ``defined``."""
    with _quiet_degenerate():
        auroc = multiclass_auroc(p, y, num_classes, average="none", thresholds=None)
        fpr, tpr, thresholds = multiclass_roc(p, y, num_classes, thresholds=None)
    return [
        Curve(
            _np(fpr[k]),
            _np(tpr[k]),
            _np(thresholds[k]),
            opt_float(auroc[k]) if defined[k] else None,
        )
        for k in range(num_classes)
    ]


def _pr_curves(
    p: torch.Tensor, y: torch.Tensor, num_classes: int, defined: torch.Tensor
) -> list[Curve]:
    with _quiet_degenerate():
        ap = multiclass_average_precision(p, y, num_classes, average="none", thresholds=None)
        precision, recall, thresholds = multiclass_precision_recall_curve(
            p, y, num_classes, thresholds=None
        )
    return [
        Curve(
            _np(recall[k]),
            _np(precision[k]),
            _np(thresholds[k]),
            opt_float(ap[k]) if defined[k] else None,
        )
        for k in range(num_classes)
    ]


@contextlib.contextmanager
def _quiet_degenerate() -> Iterator[None]:
    """Silence torchmetrics' warnings about classes without positive or negative samples: those
    are marked undefined here instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*No (positive|negative) samples")
        yield


def _mean(values: list[float | None]) -> float | None:
    """Mean of the defined values, ``None`` if there are none."""
    defined = [v for v in values if v is not None]
    return math.fsum(defined) / len(defined) if defined else None


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()
