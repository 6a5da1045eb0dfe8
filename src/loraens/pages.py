"""The one page writer of the reports: a self-contained HTML file and a Markdown twin.

`loraens report` (`report.py`) and the sweep summary (`sweep_report.py`) both build a list of
`Section`s (a title, tables, paragraphs, figures as PNG bytes) and hand it to `write_page`,
which writes::

    <output>.html           one file, figures embedded as base64 data URIs (mails and uploads whole)
    <output>.md             the same text, figures linked from <output>_files/
    <output>_files/figure_<k>.png
"""

from __future__ import annotations

import base64
import html
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Section:
    """One titled block of a page: Markdown text, HTML text, and figures."""

    title: str
    markdown: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, PNG bytes)

    def table(self, header: list[str], rows: list[list[str]],
              bold: AbstractSet[tuple[int, int]] = frozenset()) -> None:
        """A table in both formats; the (row, column) cells in `bold` are set in bold.

        "|" in a Markdown cell is escaped, so a label holding one does not split the cell.
        """
        def md(text: str, strong: bool) -> str:
            text = text.replace("|", "\\|")
            return f"**{text}**" if strong else text

        def cell(text: str, strong: bool) -> str:
            text = html.escape(text)
            return f"<td><strong>{text}</strong></td>" if strong else f"<td>{text}</td>"

        self.markdown += ["| " + " | ".join(md(h, False) for h in header) + " |", "|" + "---|" * len(header)]
        self.markdown += ["| " + " | ".join(md(c, (i, j) in bold) for j, c in enumerate(r)) + " |"
                          for i, r in enumerate(rows)]
        self.markdown.append("")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(cell(c, (i, j) in bold) for j, c in enumerate(r)) + "</tr>"
                       for i, r in enumerate(rows))
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def text(self, line: str) -> None:
        """A paragraph of plain text (escaped in the HTML)."""
        self.markdown += [line, ""]
        self.html.append(f"<p>{html.escape(line)}</p>")


def write_page(sections: list[Section], output: Path, title: str, intro: str, notes: str = "") -> tuple[Path, Path]:
    """Write `<output>.html`, `<output>.md` and `<output>_files/figure_<k>.png`; return (html, md).

    `intro` is a plain-text paragraph under the title; `notes` (Markdown, optional) follows it,
    shown verbatim (pre-wrapped) in the HTML. The folder of `output` must exist.
    """
    md, body = [f"# {title}", "", intro, ""], []
    if notes.strip():
        md += [notes.strip(), ""]
        body.append(f'<div style="white-space: pre-wrap">{html.escape(notes.strip())}</div>')
    fig_dir = output.parent / f"{output.name}_files"
    fig_dir.mkdir(exist_ok=True)
    count = 0
    for sec in sections:
        md += [f"## {sec.title}", "", *sec.markdown]
        body.append(f"<h2>{html.escape(sec.title)}</h2>" + "".join(sec.html))
        for caption, png in sec.figures:
            count += 1
            (fig_dir / f"figure_{count}.png").write_bytes(png)
            md += [f"![{caption}](<{fig_dir.name}/figure_{count}.png>)", ""]
            data = base64.b64encode(png).decode()
            body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    html_path, md_path = output.parent / f"{output.name}.html", output.parent / f"{output.name}.md"
    html_path.write_text(_PAGE.format(title=html.escape(title), intro=html.escape(intro), body="\n".join(body)))
    md_path.write_text("\n".join(md))
    return html_path, md_path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.9em; }}
</style>
<script>
// Records load problems on <body>, so a headless browser test can read them from the DOM.
window.loraensErrors = [];
window.addEventListener("error", e => window.loraensErrors.push(String(e.message || e.type)), true);
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  document.body.dataset.images = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.errors = window.loraensErrors.length;
}});
</script></head>
<body><h1>{title}</h1><p>{intro}</p>
{body}
</body></html>
"""
