"""A tiny document model rendered to Markdown and to self-contained HTML, so that the two report
formats always say the same thing. Every piece of text is escaped by the renderers: class names,
example values and extra details come from user data.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       color: #1d1d1f; background: #fafafa; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p.note { color: #555; }
table { border-collapse: collapse; margin: 12px 0; font-size: 0.9em; background: white; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f0f0f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 16px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; background: white; }
figcaption { color: #555; font-size: 0.9em; }
.scroll { overflow-x: auto; }
"""

# "_" only at a word edge: inside a word (class_0) it never starts emphasis
_MD_SPECIAL = re.compile(r"([\\`*\[\]|#]|(?<!\w)_|_(?!\w))")
_NUMERIC = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(e[+-]?\d+)?%?$|^n/a$")


@dataclass(frozen=True)
class Paragraph:
    text: str
    note: bool = False  # rendered smaller and grey in HTML


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    src: str  # a file name relative to the report
    caption: str


Block = Paragraph | Table | Image


@dataclass
class Section:
    heading: str
    blocks: list[Block] = field(default_factory=list)


def md_escape(text: str) -> str:
    """Text safe inside Markdown (also in a table cell): HTML special characters become entities
    (Markdown passes raw HTML through), Markdown syntax characters are backslash-escaped, runs of
    whitespace and line breaks become one space."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", text)


def to_markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {md_escape(title)}", ""]
    for section in sections:
        lines += [f"## {md_escape(section.heading)}", ""]
        for block in section.blocks:
            if isinstance(block, Paragraph):
                lines.append(f"*{md_escape(block.text)}*" if block.note else md_escape(block.text))
            elif isinstance(block, Image):
                lines.append(f"![{md_escape(block.caption)}]({block.src})")
            else:
                lines.append("| " + " | ".join(md_escape(h) for h in block.header) + " |")
                lines.append("|" + "|".join("---" for _ in block.header) + "|")
                lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in block.rows]
            lines.append("")
    return "\n".join(lines)


def to_html(title: str, sections: list[Section]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style></head>",
        "<body><main>",
        f"<h1>{esc(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<section><h2>{esc(section.heading)}</h2>")
        for block in section.blocks:
            if isinstance(block, Paragraph):
                cls = ' class="note"' if block.note else ""
                parts.append(f"<p{cls}>{esc(block.text)}</p>")
            elif isinstance(block, Image):
                parts.append(
                    f'<figure><img src="{esc(block.src)}" alt="{esc(block.caption)}" '
                    f'loading="lazy"><figcaption>{esc(block.caption)}</figcaption></figure>'
                )
            else:
                head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
                body = "".join(
                    "<tr>" + "".join(_td(cell) for cell in row) + "</tr>" for row in block.rows
                )
                parts.append(
                    f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
                    f"<tbody>{body}</tbody></table></div>"
                )
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _td(cell: str) -> str:
    cls = ' class="num"' if _NUMERIC.match(cell) else ""
    return f"<td{cls}>{html.escape(cell)}</td>"
