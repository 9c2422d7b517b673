"""The page: markup helpers, tables with machine-readable cells, and the self-contained shell.

Everything the page needs is inside it: CSS, the Vega/Vega-Lite/vega-embed bundle that
vl-convert ships (no CDN), each chart's spec with its data, images as data: URIs. A Content
Security Policy forbids any request to anything but the page itself, so a chart or script that
tried to reach the network would fail loudly in the console instead of quietly phoning out.
"""

from __future__ import annotations

import datetime as dt
import functools
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from advlab.stats import METHOD, RATE_METHOD, RATE_WHY, WHY, Estimate

# 'unsafe-eval': Vega compiles its expressions with Function(); nothing else is allowed out.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; "
    "style-src 'unsafe-inline'; img-src data:; font-src data:"
)


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


@functools.cache
def asset(name: str) -> str:
    return resources.files("advlab.report").joinpath("assets", name).read_text(encoding="utf-8")


@functools.cache
def vega_bundle() -> str:
    """Vega, Vega-Lite and vega-embed as one script (window.vegaEmbed), from vl-convert."""
    import vl_convert

    return vl_convert.javascript_bundle().replace("</script", "<\\/script")


def script_json(payload: Any) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(payload, allow_nan=False).replace("</", "<\\/")


# --------------------------------------------------------------------------- cells and tables


@dataclass
class Cell:
    text: str = ""
    value: float | None = None  # the number shown, unrounded (data-value)
    title: str | None = None  # hover text
    cls: str = ""
    raw: str | None = None  # markup instead of text
    attrs: dict[str, str] = field(default_factory=dict)

    def render(self, column: str) -> str:
        attrs = {"data-col": column} | self.attrs
        if self.value is not None and math.isfinite(self.value):
            attrs["data-value"] = repr(float(self.value))
        if self.title:
            attrs["title"] = self.title
        if self.cls:
            attrs["class"] = self.cls
        body = self.raw if self.raw is not None else esc(self.text)
        return f"<td{_attrs(attrs)}>{body}</td>"


@dataclass
class Row:
    cells: dict[str, Cell]
    config: str | None = None  # the configuration key the page's filters match


def _attrs(attrs: dict[str, str]) -> str:
    return "".join(f' {k}="{esc(v)}"' for k, v in attrs.items())


def table(
    name: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Row],
    cls: str = "",
    header_class: dict[str, str] | None = None,
    groups: dict[str, str] | None = None,
    **attrs: str,
) -> str:
    """A table whose cells carry data-col (and data-value for numbers): what tests read back.

    columns: (key, header text); header cells of text columns align left unless header_class
    names their class. groups: key -> a heading spanning that column and its like neighbours.
    """
    classes = header_class or {}
    head = "".join(
        f'<th data-col="{esc(key)}"{_header_class(key, rows, classes)}>{esc(title)}</th>'
        for key, title in columns
    )
    body = []
    for row in rows:
        config = f' data-config="{esc(row.config)}"' if row.config else ""
        cells = "".join(row.cells.get(key, Cell()).render(key) for key, _ in columns)
        body.append(f"<tr{config}>{cells}</tr>")
    table_attrs = _attrs({"data-table": name, **{f"data-{k}": v for k, v in attrs.items()}})
    own = f' class="{esc(cls)}"' if cls else ""
    heading = _group_row(columns, groups) if groups else ""
    return (
        f'<div class="scroll"><table{table_attrs}{own}><thead>{heading}<tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _group_row(columns: Sequence[tuple[str, str]], groups: dict[str, str]) -> str:
    """One heading per run of neighbouring columns in the same group (blank over the rest)."""
    cells: list[list[Any]] = []
    for key, _ in columns:
        group = groups.get(key, "")
        if cells and cells[-1][0] == group:
            cells[-1][1] += 1
        else:
            cells.append([group, 1])
    return (
        "<tr>"
        + "".join(f'<th class="group" colspan="{span}">{esc(group)}</th>' for group, span in cells)
        + "</tr>"
    )


def _header_class(key: str, rows: Sequence[Row], classes: dict[str, str]) -> str:
    if key in classes:
        return f' class="{esc(classes[key])}"'
    cells = [r.cells[key] for r in rows if key in r.cells]
    return ' class="text"' if cells and all("text" in c.cls for c in cells) else ""


def text_cell(value: Any, **kw: Any) -> Cell:
    return Cell(text="" if value is None else str(value), cls="text", **kw)


def percent(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def number(value: float | None, digits: int = 4) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


SHOWN_VALUES = 8  # a cell lists its values (the seeds) when there are at most this many


def estimate_cell(
    found: Estimate, as_percent: bool, unit: str = "seeds", method: str | None = None
) -> Cell:
    """A mean; its 95% interval [lo, hi] where it has one (a rate over known examples has one
    from a single seed) and, with repeats, each value (seed) beside it; the title and
    data-method name the interval's method (found.method unless `method` says better)."""
    method = method or found.method
    if found.n == 0:
        return Cell()
    show = percent if as_percent else number
    cell = Cell(text=show(found.mean), value=found.mean, attrs={"data-n": str(found.n)})
    has_interval = math.isfinite(found.lo) and math.isfinite(found.hi)
    if found.n < 2 and not has_interval:
        return cell
    listed = ""
    if found.n >= 2:
        cell.attrs |= {"data-values": json.dumps(list(found.values))}
        values = [show(v) for v in found.values]
        listed = f"{unit}: {', '.join(values)}" if found.n <= SHOWN_VALUES else ""
    body = esc(cell.text)
    if has_interval:
        cell.attrs |= {"data-lo": repr(found.lo), "data-hi": repr(found.hi)}
        cell.attrs |= {"data-method": method}
        body += f' <span class="ci">[{esc(show(found.lo))}, {esc(show(found.hi))}]</span>'
    if listed:
        body += f'<span class="seeds">{esc(listed)}</span>'
    cell.raw = body
    cell.title = f"mean of {found.n} {unit}; {method}: {show(found.lo)} to {show(found.hi)}"
    cell.title += f"; {listed}" if listed else ""
    return cell


def swatch_cell(name: str, colour: str) -> Cell:
    dot = f'<span class="swatch" style="background:{esc(colour)}"></span>'
    return Cell(text=name, cls="text name", raw=dot + esc(name))


# --------------------------------------------------------------------------- sections, charts


def section(anchor: str, title: str, body: str, intro: str = "") -> str:
    lead = f'<p class="intro">{intro}</p>' if intro else ""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{lead}{body}</section>'


def chart(target: str, spec: dict[str, Any], caption: str = "", **attrs: str) -> str:
    """A chart's slot and its Vega-Lite spec (drawn by page.js once the page has loaded);
    attrs become data- attributes of the figure (what the chart shows, for tests and scripts)."""
    note = f"<figcaption>{caption}</figcaption>" if caption else ""
    data = _attrs({f"data-{k}": v for k, v in attrs.items()})
    return (
        f'<figure class="chart" data-chart="{esc(target)}"{data}><div id="{esc(target)}"></div>'
        f'<script type="application/json" class="vl-spec" data-target="{esc(target)}">'
        f"{script_json(spec)}</script>{note}</figure>"
    )


def chart_row(items: Sequence[str]) -> str:
    return f'<div class="charts">{"".join(items)}</div>'


# --------------------------------------------------------------------------- the page


def page(title: str, controls: str, sections: Sequence[str], configs: list[dict[str, Any]]) -> str:
    stamp = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{asset("page.css")}</style>
<script>{vega_bundle()}</script>
</head><body>
{controls}
<main>
<h1>{esc(title)}</h1>
<p class="meta">advlab report, written {esc(stamp)}. Works offline: every script, chart and
image is inside this file.</p>
<p class="meta" id="method">Intervals: for rates whose count of examples is stored, the
{esc(RATE_METHOD)} ({esc(RATE_WHY)}); for every other value, the {esc(METHOD)} ({esc(WHY)}).
Each cell's and chart's tooltip names the method it used. Every seed is shown beside its mean:
the values under each table cell, small hollow points in the charts.</p>
{"".join(sections)}
</main>
<script type="application/json" id="advlab-configs">{script_json(configs)}</script>
<script>{asset("page.js")}</script>
</body></html>
"""
