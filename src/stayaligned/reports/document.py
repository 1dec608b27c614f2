"""A tiny document model (headings, paragraphs, tables, images, code) rendered two ways: to
Markdown that links its images under plots/, and to one self-contained HTML page (inline CSS,
images as base64 data URIs, every text HTML-escaped) that opens offline."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Cell:
    text: str
    strong: bool = False


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[Cell | str, ...], ...]
    note: str | None = None


@dataclass(frozen=True)
class Image:
    name: str  # file name under plots/
    png: bytes
    alt: str


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Items:
    """A bulleted list."""
    items: tuple[str, ...]


Block = Heading | Paragraph | Table | Image | Code | Items


def from_text(text: str, source: str = "notes") -> list[Block]:
    """Blocks from a small Markdown subset written by a person (a study's findings): `#` headings,
    blank-line-separated paragraphs and `- ` bullet lists; everything else is kept as plain text
    (HTML-escaped in report.html). A heading deeper than level 4 is an error naming the line.

    >>> from_text("## Why\\n\\nShallow.\\n\\n- one\\n- two")
    [Heading(text='Why', level=2), Paragraph(text='Shallow.'), Items(items=('one', 'two'))]
    """
    blocks: list[Block] = []
    chunk: list[str] = []

    def flush():
        if not chunk:
            return
        if chunk[0].startswith("- ") and all(line.startswith(("- ", "  ")) for line in chunk):
            items: list[str] = []
            for line in chunk:
                if line.startswith("- "):
                    items.append(line[2:].strip())
                else:  # a continuation line of the previous item
                    items[-1] += " " + line.strip()
            blocks.append(Items(tuple(items)))
        else:
            blocks.append(Paragraph(" ".join(line.strip() for line in chunk)))
        chunk.clear()

    for number, line in enumerate(text.splitlines(), 1):
        heading = re.match(r"^(#+)\s+(.*)$", line)
        if heading:
            flush()
            if len(heading.group(1)) > 4:
                raise ValueError(f"{source}:{number}: heading level {len(heading.group(1))} "
                                 "is deeper than 4")
            blocks.append(Heading(heading.group(2).strip(), len(heading.group(1))))
        elif not line.strip():
            flush()
        else:
            chunk.append(line.rstrip())
    flush()
    return blocks


def _cell(value: Cell | str) -> Cell:
    return value if isinstance(value, Cell) else Cell(str(value))


def slug(text: str) -> str:
    """An HTML id for a heading.

    >>> slug("Results: harm [prefill k=2]")
    'results-harm-prefill-k-2'
    """
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


# ---------------------------------------------------------------- Markdown


def _md_cell(value: Cell | str) -> str:
    cell = _cell(value)
    text = cell.text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return f"**{text}**" if cell.strong and text else text


def _md_table(table: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in table.header) + " |",
             "|" + "|".join("---" for _ in table.header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines)


def _md_code(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def to_markdown(blocks: list[Block], plots_dir: str = "plots") -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + block.text)
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Table):
            parts.append(_md_table(block))
        elif isinstance(block, Image):
            parts.append(f"![{block.alt}]({plots_dir}/{block.name})")
        elif isinstance(block, Code):
            parts.append(_md_code(block.text))
        elif isinstance(block, Items):
            parts.append("\n".join(f"- {item}" for item in block.items))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- HTML

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2329;
       max-width: 1100px; margin: 2em auto; padding: 0 1.2em; background: #fff; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: .3em .7em; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
tr:nth-child(even) td { background: #fafbfc; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: .8em; overflow-x: auto;
      white-space: pre-wrap; word-break: break-word; font-size: 13px; }
img { max-width: 100%; height: auto; border: 1px solid #e5e8eb; }
.note { color: #57606a; font-size: 13px; }
nav ul { columns: 2; }
"""


def _html_cell(value: Cell | str, tag: str) -> str:
    cell = _cell(value)
    text = html.escape(cell.text)
    return f"<{tag}>{'<strong>' + text + '</strong>' if cell.strong else text}</{tag}>"


def _html_table(table: Table) -> str:
    head = "".join(_html_cell(h, "th") for h in table.header)
    body = "".join("<tr>" + "".join(_html_cell(c, "td") for c in row) + "</tr>"
                   for row in table.rows)
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def _html_block(block: Block, ids: dict[int, str]) -> str:
    if isinstance(block, Heading):
        anchor = f' id="{ids[id(block)]}"' if id(block) in ids else ""
        return f"<h{block.level}{anchor}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        alt = html.escape(block.alt)
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                f'<figcaption class="note">{alt}</figcaption></figure>')
    if isinstance(block, Items):
        return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block.items) + "</ul>"
    return f"<pre><code>{html.escape(block.text)}</code></pre>"


def to_html(blocks: list[Block], title: str) -> str:
    """One self-contained page; level-2 headings get ids and a table of contents."""
    sections = [b for b in blocks if isinstance(b, Heading) and b.level == 2]
    ids = {id(b): f"s{i}-{slug(b.text)}" for i, b in enumerate(sections, 1)}
    toc = "".join(f'<li><a href="#{ids[id(b)]}">{html.escape(b.text)}</a></li>' for b in sections)
    body = "\n".join(_html_block(b, ids) for b in blocks)
    if toc:
        first_section = body.find("<h2")
        body = body[:first_section] + f"<nav><ul>{toc}</ul></nav>\n" + body[first_section:]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")
