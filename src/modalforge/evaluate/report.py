"""Write an evaluation report folder: ``report.md``, ``report.html``, ``metrics.json`` and PNGs.

The HTML is one self-contained file (inline CSS, no scripts, nothing fetched) that shows the PNGs
next to it by relative path, so the folder can be moved, zipped or served as it is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modalforge.evaluate._convert import json_safe
from modalforge.evaluate.ablation import AblationRow
from modalforge.evaluate.document import Image, Paragraph, Section, Table, to_html, to_markdown
from modalforge.evaluate.metrics import ClassificationMetrics, RegressionMetrics
from modalforge.evaluate.plots import (
    MAX_CURVES,
    plot_bars,
    plot_confusion,
    plot_curves,
    plot_reliability,
    plot_residuals,
    plot_scatter,
)
from modalforge.files import atomic_write_text

Metrics = ClassificationMetrics | RegressionMetrics
WeightSummary = dict[str, dict[str, float | int | None]]


def write_report(
    out_dir: str | Path,
    title: str,
    metrics: Metrics,
    ablation: Sequence[AblationRow] | None = None,
    weights: WeightSummary | None = None,
    extra: dict[str, Any] | None = None,
    examples: list[dict[str, Any]] | None = None,
    tables: dict[str, list[dict[str, Any]]] | None = None,
) -> Path:
    """Write the report into ``out_dir`` (created if needed; files of the same name are
    replaced) and return the path of ``report.html``.

    ``metrics`` from ``classification_metrics`` or ``regression_metrics``; ``ablation`` from
    ``modality_ablation``; ``weights`` from ``summarize_weights``; ``extra`` is shown as a
    key/value table (nested values as JSON) and stored in ``metrics.json``; ``examples`` are
    rows of a table (e.g. the worst predictions), columns in order of first appearance, all shown;
    ``tables``: more such tables, each under its title (e.g. the accuracy per question type).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(metrics, ClassificationMetrics):
        sections = _classification(metrics, out)
    elif isinstance(metrics, RegressionMetrics):
        sections = _regression(metrics, out)
    else:
        raise TypeError(f"metrics must be Classification- or RegressionMetrics, not {metrics!r}")
    if ablation:
        sections.append(_ablation(list(ablation), out))
    if weights:
        sections.append(_weights(weights, out))
    for name, records in (tables or {}).items():
        sections.append(Section(name, [_records_table(records)]))
    if examples:
        sections.append(Section("Examples", [_records_table(examples)]))
    if extra:
        rows = [[str(k), _cell(v)] for k, v in extra.items()]
        sections.append(Section("Details", [Table(["key", "value"], rows)]))

    payload = {
        "title": title,
        "headline": metrics.headline(),
        "metrics": metrics.to_dict(),
        "ablation": [row.to_dict() for row in ablation] if ablation else None,
        "fusion_weights": weights,
        "extra": extra,
    }
    text = json.dumps(json_safe(payload), indent=2, ensure_ascii=False, allow_nan=False)
    atomic_write_text(out / "report.md", to_markdown(title, sections))
    html_path = out / "report.html"
    atomic_write_text(html_path, to_html(title, sections))
    # last: metrics.json is what a script reads, and its presence says the report is whole
    atomic_write_text(out / "metrics.json", text + "\n", point="report")
    return html_path


def _classification(m: ClassificationMetrics, out: Path) -> list[Section]:
    summary = Table(
        ["metric", "value"],
        [
            ["samples", str(m.n)],
            ["classes", str(len(m.class_names))],
            ["accuracy", _num(m.accuracy)],
            ["macro precision", _num(m.precision_macro)],
            ["macro recall", _num(m.recall_macro)],
            ["macro F1", _num(m.f1_macro)],
            ["micro precision", _num(m.precision_micro)],
            ["micro recall", _num(m.recall_micro)],
            ["micro F1", _num(m.f1_micro)],
            ["macro AUROC (one-vs-rest)", _num(m.auroc_macro)],
            ["expected calibration error (15 bins)", _num(m.ece)],
            ["log loss", _num(m.log_loss)],
        ],
    )
    names = m.class_names
    support = [c.support for c in m.per_class]
    per_class = Table(
        ["class", "precision", "recall", "F1", "support", "AUROC", "average precision"],
        [
            [c.name, _num(c.precision), _num(c.recall), _num(c.f1), str(c.support),
             _num(c.auroc), _num(pr.area)]
            for c, pr in zip(m.per_class, m.pr, strict=True)
        ],
    )  # fmt: skip
    plot_confusion(m.confusion, names, out / "confusion_matrix.png")
    plot_bars(
        names,
        [c.f1 for c in m.per_class],
        out / "per_class_f1.png",
        title="F1 per class (dashed: macro F1)",
        xlabel="F1",
        reference=m.f1_macro,
        notes=[f"{c.f1:.2f} (n={c.support})" for c in m.per_class],
    )
    plot_curves(m.roc, names, support, out / "roc_curves.png", "roc", macro=m.auroc_macro)
    plot_curves(m.pr, names, support, out / "pr_curves.png", "pr")
    plot_reliability(m.calibration, m.ece, out / "reliability.png")
    undefined = [c.name for c in m.per_class if c.auroc is None]
    curve_note = f"Curves for at most {MAX_CURVES} classes, those with the most samples."
    if undefined:
        curve_note += (
            f" AUROC is undefined for {len(undefined)} class(es) without positive or negative"
            " samples; the macro AUROC averages the others."
        )
    return [
        Section("Summary", [summary]),
        Section(
            "Confusion matrix",
            [Image("confusion_matrix.png", "Confusion matrix, rows = true class, normalized")],
        ),
        Section("Per-class metrics", [per_class, Image("per_class_f1.png", "F1 per class")]),
        Section(
            "ROC and precision-recall curves",
            [
                Paragraph(curve_note, note=True),
                Image("roc_curves.png", "ROC curves, one-vs-rest"),
                Image("pr_curves.png", "Precision-recall curves"),
            ],
        ),
        Section("Calibration", [Image("reliability.png", "Reliability diagram (top label)")]),
    ]


def _regression(m: RegressionMetrics, out: Path) -> list[Section]:
    summary = Table(
        ["metric", "value"],
        [
            ["samples", str(m.n)],
            ["MSE", _num(m.mse)],
            ["RMSE", _num(m.rmse)],
            ["MAE", _num(m.mae)],
            ["R2", _num(m.r2)],
        ],
    )
    plot_scatter(m.y_true, m.y_pred, out / "regression_scatter.png")
    plot_residuals(m.y_true, m.y_pred, out / "residuals.png")
    return [
        Section("Summary", [summary]),
        Section(
            "Predictions",
            [
                Image("regression_scatter.png", "Predicted against true values"),
                Image("residuals.png", "Residuals (predicted - true)"),
            ],
        ),
    ]


def _ablation(rows: list[AblationRow], out: Path) -> Section:
    metric = rows[0].metric
    shown = "accuracy" if metric == "accuracy" else "macro F1"
    table = Table(
        ["setting", "removed", "accuracy", "macro F1", f"change in {shown}"],
        [
            [r.name, ", ".join(r.dropped) or "-", _num(r.accuracy), _num(r.macro_f1),
             f"{r.delta:+.4f}"]
            for r in rows
        ],
    )  # fmt: skip
    base = next((i for i, r in enumerate(rows) if not r.dropped), None)
    plot_bars(
        [r.name for r in rows],
        [r.value for r in rows],
        out / "ablation.png",
        title=f"Modality ablation ({shown}; dashed: all modalities)",
        xlabel=shown,
        reference=rows[base].value if base is not None else None,
        notes=[f"{r.value:.3f} ({r.delta:+.3f})" for r in rows],
        highlight=base,
    )
    note = Paragraph("Each row predicts with the listed modalities masked as missing.", note=True)
    return Section("Modality ablation", [note, table, Image("ablation.png", "Modality ablation")])


def _weights(weights: WeightSummary, out: Path) -> Section:
    names = list(weights)
    means = [float(weights[k]["mean"] or 0.0) for k in names]
    stds = [float(weights[k]["std"] or 0.0) for k in names]
    plot_bars(
        names,
        means,
        out / "fusion_weights.png",
        title="Fusion weight per modality (mean ± std over rows where present)",
        xlabel="weight",
        errors=stds,
        notes=[f"{m:.3f} (n={weights[k]['n']})" for k, m in zip(names, means, strict=True)],
    )
    table = Table(
        ["modality", "mean weight", "std", "rows present"],
        [
            [k, _num(weights[k]["mean"]), _num(weights[k]["std"]), str(weights[k]["n"])]
            for k in names
        ],
    )
    return Section("Fusion weights", [table, Image("fusion_weights.png", "Fusion weights")])


def _records_table(records: list[dict[str, Any]]) -> Table:
    keyed = [{str(k): v for k, v in record.items()} for record in records]
    columns = list(dict.fromkeys(k for record in keyed for k in record))
    return Table(columns, [[_cell(r.get(c)) for c in columns] for r in keyed])


def _num(value: float | int | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _cell(value: Any) -> str:
    """A free-form value as table text: floats to 4 significant digits, containers as JSON."""
    value = json_safe(value)
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
