"""Evaluation as pure functions over arrays: metrics, modality ablation, and a report folder."""

from modalforge.evaluate.ablation import AblationRow, modality_ablation, summarize_weights
from modalforge.evaluate.metrics import (
    CalibrationBins,
    ClassificationMetrics,
    ClassMetrics,
    Curve,
    RegressionMetrics,
    accuracy_macro_f1,
    classification_metrics,
    regression_metrics,
)
from modalforge.evaluate.report import write_report

__all__ = [
    "AblationRow",
    "CalibrationBins",
    "ClassMetrics",
    "ClassificationMetrics",
    "Curve",
    "RegressionMetrics",
    "accuracy_macro_f1",
    "classification_metrics",
    "modality_ablation",
    "regression_metrics",
    "summarize_weights",
    "write_report",
]
