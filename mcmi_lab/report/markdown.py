"""The report's Markdown: escaping of every string that comes from data, results or run.json, tables (the n of a
column given once, in its header), and the renderer of that Markdown subset to one self-contained HTML page.

Safety (issue 31): a string from outside never makes a line of its own (line breaks become spaces) and every
character Markdown acts on is escaped, so a class name cannot become an image or a heading; and
:func:`render_html` embeds only PNG files under the run folder's own ``figures/`` (or a seed folder's), refusing
anything else in one line of the page.
"""
from __future__ import annotations

import base64
import html
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

#: Everything str.splitlines() breaks a line at: none of them may reach report.md from a data string.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")
_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x1f\x7f]")
#: The characters Markdown (ours and CommonMark) gives a meaning; each is escaped with a backslash.
_ACTIVE = re.compile(r"([\\`*\[\]#!|<~$]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z]))")  # "_" inside a word is literal


def clean_text(text: str) -> str:
    """`text` writable as UTF-8: a lone surrogate (from a file that was not UTF-8) becomes its escape ``\\udc80``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def md_escape(value: Any) -> str:
    """A string from data, results or run.json as Markdown text that shows it literally: one line, with every
    character Markdown acts on escaped (``\\|``, ``\\#``, ``\\!``, ``\\[``, ...), surrogates escaped, other
    control characters shown as U+FFFD."""
    text = _CONTROL.sub("\ufffd", _LINE_BREAKS.sub(" ", clean_text(str(value))))
    return _ACTIVE.sub(r"\\\1", text)


# ---- tables -----------------------------------------------------------------------------------------------------

def _cell_text(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell_text(v, digits) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{_cell_text(k, digits)}: {_cell_text(v, digits)}" for k, v in value.items())
    if value is None:
        return "—"
    if isinstance(value, Text):
        return str(value)
    return md_escape(value)


class Text(str):
    """Markdown written by the report itself (formatted numbers, `code`, **bold**): a table takes it as it is,
    where a plain str is a value from outside and is escaped."""


_N = re.compile(r" \(n=(\d+)\)$")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3,
                   headers: Sequence[str] | None = None) -> str:
    """Rows of dicts as a Markdown table: `columns` (default: the first row's keys) in order, floats with `digits`.

    Strings are escaped (:func:`md_escape`) unless they are :class:`Text`. A column whose filled cells all end in
    the same " (n=K)" gives it once, in its header, instead of in every cell; when every such column has the same
    n, the first header says it once for the table ("teacher (n=3 each)").
    """
    if not rows:
        return ""
    columns = list(columns if columns is not None else rows[0])
    headers = [_cell_text(h, digits) if not isinstance(h, Text) else h
               for h in (headers if headers is not None else columns)]
    cells = [[_cell_text(r.get(c), digits) for c in columns] for r in rows]
    common = {}  # column -> its one n
    for j in range(len(columns)):
        filled = [row[j] for row in cells if row[j] != "—"]
        counts = {m.group(1) if (m := _N.search(c)) else None for c in filled}
        if filled and len(counts) == 1 and None not in counts:
            common[j] = counts.pop()
            for row in cells:
                row[j] = _N.sub("", row[j])
    if len(set(common.values())) == 1 and len(common) > 1 and 0 not in common:
        headers[0] += f" (n={next(iter(common.values()))} each)"  # one n for the whole table: said once
    else:
        for j, n in common.items():
            headers[j] += f" (n={n})"
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(columns)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


# ---- Markdown -> HTML (the subset the report writes: headings, tables, lists, images, emphasis, code, details) ---

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:62rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
          "table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #ccc;padding:.25rem .6rem;"
          "text-align:left;vertical-align:top}th{background:#f3f3f3}"
          "img{max-width:100%}code{background:#f3f3f3;padding:0 .2rem}figure{margin:1rem 0}"
          "details{margin:1rem 0}summary{cursor:pointer;font-weight:600}"
          ".summary{background:#f6f8fa;border-left:4px solid #4477aa;padding:.4rem 1rem;margin:1rem 0}")
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")  # a backslash before ASCII punctuation: that character, literally


def _inline(text: str) -> str:
    """Escapes, `code`, **strong** and *em* of one line; escaped characters are taken literally."""
    literal: list[str] = []

    def hold(m: re.Match) -> str:
        literal.append(m.group(1))
        return f"\x00{len(literal) - 1}\x00"

    text = html.escape(_ESCAPE.sub(hold, text.replace("\x00", "")), quote=False)  # \x00 marks the held ones
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![\w*])\*([^*]+)\*(?![\w*])", r"<em>\1</em>", text)
    return re.sub("\x00(\\d+)\x00", lambda m: html.escape(literal[int(m.group(1))]), text)


def _unbroken(cell: str) -> str:
    """A table cell whose numbers do not break across lines: "84.2 ± 1.3" and "[-0.50, +2.96]" keep together,
    while words wrap."""
    cell = re.sub(r"(?<=\S) ± (?=\S)", "\u00a0±\u00a0", re.sub(r"(?<=\d) \[(?=[-+]?\d)", "\u00a0[", cell))
    return re.sub(r"\[([-+]?[\d.]+), ([-+]?[\d.]+)\]", "[\\1,\u00a0\\2]", cell)


def figure_file(src: str, base: Path) -> Path | None:
    """The PNG that `src` names, when it lies under `base`'s own ``figures/`` or a ``seed_<n>/figures/`` (after
    resolving links and ``..``); None for anything else."""
    try:
        path = (base / src).resolve(strict=True)
        parts = path.relative_to(base.resolve()).parts
    except (OSError, ValueError, RuntimeError):
        return None
    inside = parts[:1] == ("figures",) or (len(parts) > 1 and re.fullmatch(r"seed_\d+", parts[0])
                                           and parts[1] == "figures")
    return path if inside and path.suffix.lower() == ".png" and path.is_file() else None


def _figure(alt: str, src: str, base: Path | None) -> str:
    """An image embedded as a data URI (a report that travels as one file), or one line saying it was refused."""
    path = figure_file(src, base) if base is not None else None
    if path is None:
        return (f"<p>(image {html.escape(src)!r} not embedded: only PNG files under the run folder's figures/ "
                "are)</p>")
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def render_html(markdown: str, base: str | os.PathLike | None = None, title: str = "report") -> str:
    """Render the Markdown subset that the report writes; PNGs under `base`'s figures/ are embedded."""
    base = Path(base) if base is not None else None
    out, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"^(#{1,6}) (.*)$", line):
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
        elif m := re.match(r"^!\[([^\]]*)\]\(([^)]+)\)$", line):
            out.append(_figure(m.group(1), m.group(2), base))
        elif line in ("<details>", "</details>", '<div class="summary">', "</div>"):
            out.append(line)
        elif m := re.match(r"^<summary>(.*)</summary>$", line):
            out.append(f"<summary>{_inline(m.group(1))}</summary>")
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in re.split(r"(?<!\\)\|", lines[i].strip())[1:-1]])
                i += 1
            head, rows = block[0], [r for r in block[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_unbroken(_inline(c))}</td>" for c in r) + "</tr>"
                                 for r in rows)
                       + "</tbody></table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(clean_text(title))}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")
