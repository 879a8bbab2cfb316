"""The report of a contrastive run: retrieval and zero-shot tables (``report.md``), the numbers
(``metrics.json``) and example queries with their top hits as a picture grid (``retrieval.png``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from modalforge.data.manifest import resolve_path
from modalforge.files import atomic_path, atomic_write_json, atomic_write_text
from modalforge.schema import Modality

EXAMPLES = 6  # queries shown
TOP = 5  # hits per query


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _grid(path: Path, predictor, manifest, embedded, image: str, other: str) -> Path | None:
    """``other``→``image`` for a few queries spread over the rows: the query, then its top hits
    (a right answer framed green, a wrong one red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    both = np.flatnonzero(embedded[image][1] & embedded[other][1])
    if len(both) < TOP:
        return None
    images, queries = embedded[image][0][both], embedded[other][0][both]
    frame = manifest.frame.iloc[both]
    picks = np.linspace(0, len(both) - 1, EXAMPLES).astype(int)
    text = predictor.schema[other].modality is Modality.TEXT
    fig, axes = plt.subplots(EXAMPLES, TOP + 1, figsize=(1.9 * (TOP + 1), 1.9 * EXAMPLES))
    for r, q in enumerate(picks):
        hits = np.argsort(-(images @ queries[q]))[:TOP]
        query_ax = axes[r, 0]
        query_ax.axis("off")
        label = str(frame[other].iloc[q]) if text else f"{other} of row {both[q]}"
        query_ax.text(0.5, 0.5, "\n".join(_wrap(label, 18)), ha="center", va="center",
                      fontsize=9, transform=query_ax.transAxes)  # fmt: skip
        for k, j in enumerate(hits):
            ax = axes[r, k + 1]
            with Image.open(resolve_path(manifest.root, frame[image].iloc[j])) as im:
                ax.imshow(im.convert("RGBA"))
            right = j == q or (text and str(frame[other].iloc[j]) == str(frame[other].iloc[q]))
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if right else "tab:red")
                spine.set_linewidth(3)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"#{k + 1}", fontsize=8)
    fig.suptitle(f"{other} → {image}: top {TOP} of {len(both)} (green = right)", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line][:4]


def write_retrieval_report(out_dir, predictor, manifest, embedded, result: dict[str, Any],
                           title: str | None = None) -> Path:  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title or 'modalforge: contrastive alignment'}", "",
             f"{result['rows']} held-out rows; pairs {', '.join(result['pairs'])}; learned "
             f"temperature {result['temperature']:.4f}.", "", "## Retrieval", "",
             "| direction | trained pair | queries | R@1 | R@5 | R@10 | median rank |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, m in result["retrieval"].items():
        lines.append(f"| {name} | {'yes' if m.get('trained_pair') else 'no'} | {m['queries']} "
                     f"| {_fmt(m['recall@1'])} | {_fmt(m['recall@5'])} "
                     f"| {_fmt(m['recall@10'])} | {_fmt(m['median_rank'])} |")  # fmt: skip
    if result["zero_shot"]:
        lines += ["", "## Zero-shot classification", "",
                  "| tower → labels | rows | classes | accuracy | macro-F1 | majority class |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, m in result["zero_shot"].items():
            lines.append(f"| {name} | {m['rows']} | {m['classes']} | {_fmt(m['accuracy'])} | "
                         f"{_fmt(m['f1_macro'])} | {_fmt(m['chance'])} |")  # fmt: skip
    images = [c for c in predictor.model.columns
              if predictor.schema[c].modality is Modality.IMAGE]  # fmt: skip
    for a, b in predictor.pairs:
        image, other = (a, b) if a in images else (b, a) if b in images else (None, None)
        if image is None:
            continue
        png = _grid(out / f"retrieval-{other}-{image}.png", predictor, manifest, embedded,
                    image, other)  # fmt: skip
        if png is not None:
            lines += ["", f"![{other} → {image}]({png.name})"]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    atomic_write_json(out / "metrics.json", result, point="report", default=str)
    return path
