"""``modalforge data inspect``: what a manifest holds, what is wrong with it, and how it looks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from modalforge.data.errors import DecodeError
from modalforge.data.image import decode_image
from modalforge.data.manifest import Manifest, PathOutsideRoot, is_missing
from modalforge.data.validate import ValidationReport, validate_manifest
from modalforge.files import atomic_path, atomic_write_json
from modalforge.schema import Modality, Schema

FONT_PATHS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",)


@dataclass
class Inspection:
    schema: Schema
    n_rows: int
    label_counts: dict[str, dict[str, int]]  # label column -> class -> rows
    present: dict[str, int]  # column -> rows with a usable value
    report: ValidationReport
    contact_sheet: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_rows": self.n_rows,
            "schema": self.schema.to_dict(),
            "label_counts": self.label_counts,
            "present": self.present,
            "validation": {k: v for k, v in self.report.to_dict().items() if k != "problems"},
            "contact_sheet": str(self.contact_sheet) if self.contact_sheet else None,
        }


def inspect_manifest(
    manifest: Manifest,
    schema: Schema,
    out_dir: Path | None = None,
    samples: int = 24,
    progress: bool = False,
) -> Inspection:
    report = validate_manifest(manifest, schema, progress=progress)
    bad = set(report.bad_rows)
    label_counts = {}
    for column in schema.of(Modality.LABEL):
        values = [
            v
            for i, v in enumerate(manifest.frame[column.name])
            if i not in bad and not is_missing(v)
        ]
        counts: dict[str, int] = {}
        for v in map(str, values):
            counts[v] = counts.get(v, 0) + 1
        label_counts[column.name] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    result = Inspection(schema, len(manifest), label_counts, report.present, report)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        images = schema.of(Modality.IMAGE)
        if images:
            good = [i for i in range(len(manifest)) if i not in bad]
            result.contact_sheet = contact_sheet(
                manifest, schema, good, out_dir / "contact_sheet.png", samples
            )
        atomic_write_json(out_dir / "inspection.json", result.to_dict(), ensure_ascii=False)
        report.write(out_dir / "problems.csv")
    return result


def _font(size: int):
    for path in FONT_PATHS:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], lines[max_lines - 1] + " …"]
    return lines


def contact_sheet(
    manifest: Manifest,
    schema: Schema,
    rows: list[int],
    path: Path,
    samples: int = 24,
    thumb: int = 128,
    columns: int = 6,
) -> Path:
    """A PNG grid of evenly spaced sample rows: image, then text and labels underneath."""
    image_col = schema.of(Modality.IMAGE)[0].name
    text_col = next((c.name for c in schema.of(Modality.TEXT)), None)
    label_cols = [c.name for c in schema.of(Modality.LABEL)]
    step = max(1, len(rows) // max(1, samples))
    picked = rows[::step][:samples]
    font, small = _font(13), _font(11)
    cell_w, cell_h = thumb + 16, thumb + 70
    n_rows = max(1, -(-len(picked) // columns))
    sheet = Image.new("RGB", (cell_w * columns, cell_h * n_rows), "white")
    draw = ImageDraw.Draw(sheet)
    for k, i in enumerate(picked):
        x, y = (k % columns) * cell_w + 8, (k // columns) * cell_h + 6
        record = manifest.frame.iloc[i]
        try:
            img = decode_image(manifest.resolve(record[image_col]))
            img.thumbnail((thumb, thumb), Image.Resampling.BICUBIC)
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        except (DecodeError, PathOutsideRoot):
            draw.rectangle((x, y, x + thumb, y + thumb), outline="red")
        ty = y + thumb + 4
        if text_col and not is_missing(record[text_col]):
            for line in _wrap(draw, str(record[text_col]), font, thumb, 2):
                draw.text((x, ty), line, fill="black", font=font)
                ty += 15
        for col in label_cols[:2]:
            draw.text(
                (x, ty),
                _wrap(draw, str(record[col]), small, thumb, 1)[0],
                fill=(90, 90, 160),
                font=small,
            )
            ty += 13
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
