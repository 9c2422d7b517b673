"""HTML report from one or more sweeps' parquet: the paper's tables and plots on one page.

The page is self-contained (inline CSS, inline SVG charts drawn here, images as base64 PNG, no
script) so it can be mailed, archived or opened offline. Every section is rendered only when its
data exists: a sweep still running, or one written before a table existed (transfer/,
properties/), gives a shorter page, never an error. Several sweeps sit side by side, one column
per sweep in the plots and one `sweep` column in the combined tables.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from advlab.store import SweepStore
from advlab.transfer import NOISE_SOURCE

__all__ = ["SweepData", "build_report", "load_sweep_data", "render_report"]

# The grid axes of Table 1, in the paper's order; other grid axes follow them.
CORE_AXES = ("model", "weight_decay", "subset", "seed")
# Config columns whose variation names a trial when a sweep has no sweep.json to list its grid.
CONFIG_HINTS = ("model", "activation", "subset", "weight_decay", "seed", "dataset.name")
MAX_LINES = 8  # more trials than this in one chart: one line per model (mean) instead
EXAMPLES_PER_TRIAL = 3
MAX_EXAMPLE_TRIALS = 16  # keeps the page small for big sweeps
IMAGE_PX = 56  # images are scaled up (nearest neighbour) to at least this many pixels
MAGNIFY = 10.0  # perturbations are shown x10 around gray 0.5, as in the paper's figures
PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
NORM_NAMES = {"rms": "rms distortion", "l2": "L2 norm", "linf": "L∞ norm"}
ANALYSIS_TITLES = {
    "lipschitz": "Lipschitz upper bounds per layer (§4.3, Table 5)",
    "unit_analysis": "Unit analysis (§3)",
    "density": "Adversarial-example density",
}


# --------------------------------------------------------------------------- loading


@dataclass
class SweepData:
    """Every table of one sweep, read whole; absent tables are empty frames."""

    name: str
    uri: str
    trials: pd.DataFrame
    epochs: pd.DataFrame
    examples: pd.DataFrame
    curves: pd.DataFrame
    properties: pd.DataFrame
    transfer: pd.DataFrame
    meta: dict[str, Any] | None = None
    labels: dict[str, str] = field(default_factory=dict)  # trial_id -> short readable name

    @property
    def axes(self) -> list[str]:
        """Case keys and grid axes (from sweep.json), else the config columns that vary."""
        meta = self.meta or {}
        keys = [key for case in meta.get("cases") or [] for key in case]
        keys += list(meta.get("grid") or {})
        if keys:
            return list(dict.fromkeys(keys))
        return [c for c in CONFIG_HINTS if c in self.trials and _varies(self.trials[c])]

    @property
    def missing_ids(self) -> list[str]:
        """Trials sweep.json expects that left no trials row (running, or the worker died)."""
        expected = (self.meta or {}).get("trial_ids") or []
        present = set(self.trials["trial_id"]) if "trial_id" in self.trials else set()
        return [t for t in expected if t not in present]

    def label(self, trial_id: str) -> str:
        return self.labels.get(trial_id, str(trial_id)[:10])


def load_sweep_data(sweep_dir: str) -> SweepData:
    """Read one sweep folder (<storage>/<sweep>, local path or URI)."""
    store = SweepStore.from_dir(sweep_dir)
    meta = store.read_json("sweep.json")
    tables = {name: store.read(name) for name in ("trials", "epochs", "examples", "curves")}
    if tables["trials"].empty and meta is None:
        raise FileNotFoundError(
            f"{sweep_dir}: no advlab results here (no trials/ nor sweep.json); pass a "
            "<storage>/<sweep> folder such as results/quickstart"
        )
    data = SweepData(
        name=store.sweep,
        uri=store.uri,
        meta=meta,
        properties=store.read("properties"),
        transfer=store.read("transfer"),
        **tables,
    )
    if not data.trials.empty and "trial_index" in data.trials:
        data.trials = data.trials.sort_values("trial_index", kind="stable", ignore_index=True)
    data.labels = trial_labels(data.trials, data.axes)
    return data


def _varies(column: pd.Series) -> bool:
    return column.astype(str).nunique() > 1


def trial_labels(trials: pd.DataFrame, axes: Sequence[str]) -> dict[str, str]:
    """A short name per trial: its model and its values on the other grid axes."""
    if trials.empty or "trial_id" not in trials:
        return {}
    # A one-value grid axis names nothing: only what tells this sweep's trials apart.
    shown = [a for a in axes if a in trials and a != "model" and _varies(trials[a])]
    labels: dict[str, str] = {}
    for row in trials.to_dict("records"):
        parts = [str(row.get("model", ""))] + [axis_text(a, row.get(a)) for a in shown]
        labels[row["trial_id"]] = " ".join(p for p in parts if p) or row["trial_id"]
    if len(set(labels.values())) < len(labels):  # grid axes do not tell them apart: add the id
        labels = {t: f"{name} [{t[:6]}]" for t, name in labels.items()}
    return labels


def axis_text(axis: str, value: Any) -> str:
    if axis == "weight_decay":
        return f"λ={decay_text(value)}"
    if axis == "subset":
        return str(value)
    return f"{axis.rsplit('.', 1)[-1]}={_cell_text(value)}"


# --------------------------------------------------------------------------- formatting


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and arrays are values, not missing
        return False


def pct(value: Any) -> str:
    """A rate as a percentage, as the paper prints errors."""
    return "–" if _missing(value) else f"{100 * float(value):.2f}%"


def num(value: Any) -> str:
    """Three significant digits, as the paper prints distortions (0.062) and bounds (2.75)."""
    return "–" if _missing(value) else f"{float(value):.3g}"


def decay_values(value: Any) -> list[float]:
    """Weight decay as a list of lambdas: a float, or a JSON string of one per layer."""
    if _missing(value):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return []
    if isinstance(value, list | tuple | np.ndarray):
        return [float(v) for v in value]
    return [float(value)]


def decay_text(value: Any) -> str:
    lambdas = decay_values(value)
    if not lambdas:
        return "–"
    text = ", ".join(f"{v:g}" for v in lambdas)
    return f"[{text}]" if len(lambdas) > 1 or (isinstance(value, str) and "[" in value) else text


def decay_for_plot(value: Any) -> float:
    """One lambda per trial for an x axis: the largest of a per-layer list."""
    lambdas = decay_values(value)
    return max(lambdas) if lambdas else math.nan


def _cell_text(value: Any) -> str:
    if _missing(value):
        return "–"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# --------------------------------------------------------------------------- html pieces


@dataclass
class Column:
    """One table column: header text, the row key it reads, how to show it."""

    header: str
    key: str
    kind: str = "text"  # text, pct, num, decay, id


def render_table(
    rows: list[dict[str, Any]], columns: list[Column], name: str, caption: str = ""
) -> str:
    head = "".join(f'<th data-col="{esc(c.key)}">{esc(c.header)}</th>' for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c.key)
            css = ' class="n"' if c.kind in ("pct", "num") else ""
            if c.kind == "id":
                css = ' class="id"'
            cells.append(f'<td data-col="{esc(c.key)}"{css}>{esc(_format(value, c.kind))}</td>')
        attrs = f' data-sweep="{esc(row["sweep"])}"' if "sweep" in row else ""
        attrs += f' data-trial="{esc(row["trial_id"])}"' if "trial_id" in row else ""
        body.append(f"<tr{attrs}>{''.join(cells)}</tr>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (
        f'<div class="scroll"><table data-table="{esc(name)}">{cap}<thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _format(value: Any, kind: str) -> str:
    if kind == "pct":
        return pct(value)
    if kind == "num":
        return num(value)
    if kind == "decay":
        return decay_text(value)
    if kind == "id":
        return "–" if _missing(value) else str(value)[:10]
    return _cell_text(value)


def section(anchor: str, title: str, body: str, intro: str = "") -> str:
    lead = f'<p class="intro">{intro}</p>' if intro else ""
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{lead}{body}</section>'


def sweep_columns(parts: list[tuple[SweepData, str]]) -> str:
    """One column per sweep; sweeps without content for this section are left out."""
    cols = [
        f'<div class="col" data-sweep="{esc(s.name)}"><h3>{esc(s.name)}</h3>{body}</div>'
        for s, body in parts
        if body
    ]
    return f'<div class="cols">{"".join(cols)}</div>' if cols else ""


# --------------------------------------------------------------------------- svg charts


@dataclass
class Series:
    """One line (or set of points) of a chart."""

    label: str
    points: list[tuple[float, float]]
    line: bool = True
    style: int | None = None  # palette slot; series that share one read as one (dots + mean)
    legend: bool = True


@dataclass
class Axis:
    label: str
    log: bool = False
    percent: bool = False
    lo: float | None = None  # forced ends of the domain (e.g. 0 for errors)
    hi: float | None = None
    ticks: list[tuple[float, str]] | None = None  # explicit ticks (value, text)
    integer: bool = False


W, LEFT, RIGHT, TOP, PLOT_H, AXIS_H, LEGEND_ROW = 560, 64, 16, 30, 230, 46, 17


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 2.5, 5 x 10^k steps; whole steps if integer)."""
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= step * m:
            step *= m
            break
    if integer:  # epochs: no tick at 1.5
        step = max(1, round(step)) if step != 2.5 else 2
    first = math.floor(lo / step + 1e-9) * step
    last = math.ceil(hi / step - 1e-9) * step
    n = round((last - first) / step)
    return [round(first + i * step, 12) for i in range(n + 1)]


def _tick_text(value: float, axis: Axis) -> str:
    if axis.percent:
        return f"{100 * value:.0f}%"
    if axis.log:
        return f"{10**value:g}"
    return f"{value:g}"


def _domain(values: list[float], axis: Axis) -> tuple[float, float, list[tuple[float, str]]]:
    """The plotted range (in transformed units) and its ticks."""
    lo = min(values) if axis.lo is None else _tx(axis.lo, axis)
    hi = max(values) if axis.hi is None else _tx(axis.hi, axis)
    lo, hi = min(lo, min(values)), max(hi, max(values))
    if axis.ticks is not None:
        ticks = [(_tx(v, axis), t) for v, t in axis.ticks]
        lo, hi = min(lo, *(v for v, _ in ticks)), max(hi, *(v for v, _ in ticks))
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        pad = 0.06 * (hi - lo)  # keep end points off the frame
        return lo - pad, hi + pad, ticks
    if axis.log:
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        decades = list(range(math.floor(lo), math.ceil(hi) + 1))
        return decades[0], decades[-1], [(d, _tick_text(d, axis)) for d in decades]
    values = nice_ticks(lo, hi, integer=axis.integer)
    return values[0], values[-1], [(v, _tick_text(v, axis)) for v in values]


def _tx(value: float, axis: Axis) -> float:
    return math.log10(value) if axis.log else value


def series_style(index: int) -> tuple[str, str]:
    """Colour and dash pattern: dashed lines once the palette wraps around."""
    dash = "" if index < len(PALETTE) else ' stroke-dasharray="6 3"'
    return PALETTE[index % len(PALETTE)], dash


def svg_chart(series: list[Series], title: str, x: Axis, y: Axis, name: str) -> str:
    """A line/scatter chart with axes, ticks and a legend below, as an inline SVG string."""
    clean = [
        Series(
            s.label,
            [(px, py) for px, py in s.points if _plottable(px, x) and _finite(py)],
            s.line,
            i if s.style is None else s.style,
            s.legend,
        )
        for i, s in enumerate(series)
    ]
    clean = [s for s in clean if s.points]
    if not clean:
        return ""
    xs = [_tx(px, x) for s in clean for px, _ in s.points]
    ys = [py for s in clean for _, py in s.points]
    x0, x1, xticks = _domain(xs, x)
    y0, y1, yticks = _domain(ys, y)
    plot_w = W - LEFT - RIGHT
    legend_top = TOP + PLOT_H + AXIS_H
    legend = [s for s in clean if s.legend]
    height = legend_top + math.ceil(len(legend) / 2) * LEGEND_ROW + 6

    def sx(value: float) -> float:
        return LEFT + (_tx(value, x) - x0) / (x1 - x0) * plot_w

    def sy(value: float) -> float:
        return TOP + PLOT_H - (value - y0) / (y1 - y0) * PLOT_H

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {height}" width="{W}" '
        f'height="{height}" role="img" data-chart="{esc(name)}"><title>{esc(title)}</title>',
        f'<text x="{W / 2}" y="18" class="ct">{esc(title)}</text>',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{PLOT_H}" class="frame"/>',
    ]
    for value, text in yticks:
        py = TOP + PLOT_H - (value - y0) / (y1 - y0) * PLOT_H
        out.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py:.1f}" y2="{py:.1f}" class="grid"/>'
        )
        out.append(f'<text x="{LEFT - 6}" y="{py + 4:.1f}" class="yt">{esc(text)}</text>')
    for value, text in xticks:
        px = LEFT + (value - x0) / (x1 - x0) * plot_w
        out.append(
            f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{TOP + PLOT_H}" class="grid"/>'
        )
        out.append(f'<text x="{px:.1f}" y="{TOP + PLOT_H + 16}" class="xt">{esc(text)}</text>')
    out.append(
        f'<text x="{LEFT + plot_w / 2}" y="{TOP + PLOT_H + 36}" class="al">{esc(x.label)}</text>'
    )
    mid = TOP + PLOT_H / 2
    out.append(
        f'<text x="14" y="{mid}" class="al" transform="rotate(-90 14 {mid})">{esc(y.label)}</text>'
    )
    for s in clean:
        color, dash = series_style(s.style or 0)
        pts = sorted(s.points)
        out.append(f'<g class="series" data-label="{esc(s.label)}"><title>{esc(s.label)}</title>')
        if s.line and len(pts) > 1:
            coords = " ".join(f"{sx(px):.1f},{sy(py):.1f}" for px, py in pts)
            out.append(
                f'<polyline points="{coords}" fill="none" stroke="{color}" '
                f'stroke-width="1.8"{dash}/>'
            )
        for px, py in pts:
            shown = _tick_text(py, y) if y.percent else f"{py:.4g}"
            tip = f"{s.label}: {x.label} {px:g}, {y.label} {shown}"
            out.append(
                f'<circle cx="{sx(px):.1f}" cy="{sy(py):.1f}" r="3" fill="{color}" '
                f'data-x="{px!r}" data-y="{py!r}"><title>{esc(tip)}</title></circle>'
            )
        out.append("</g>")
    for i, s in enumerate(legend):
        color, dash = series_style(s.style or 0)
        lx = LEFT + (i % 2) * (plot_w / 2)
        ly = legend_top + (i // 2) * LEGEND_ROW
        text = s.label if len(s.label) <= 40 else s.label[:39] + "…"
        out.append(
            f'<g class="legend"><line x1="{lx:.1f}" x2="{lx + 18:.1f}" y1="{ly:.1f}" y2="{ly:.1f}" '
            f'stroke="{color}" stroke-width="2.5"{dash}/><circle cx="{lx + 9:.1f}" cy="{ly:.1f}" '
            f'r="3" fill="{color}"/><text x="{lx + 24:.1f}" y="{ly + 4:.1f}">{esc(text)}'
            f"<title>{esc(s.label)}</title></text></g>"
        )
    out.append("</svg>")
    return "".join(out)


def _finite(value: Any) -> bool:
    return not _missing(value) and math.isfinite(float(value))


def _plottable(value: Any, axis: Axis) -> bool:
    return _finite(value) and (not axis.log or float(value) > 0)


def figure(svg: str, name: str, sweep: str, caption: str, **attrs: str) -> str:
    if not svg:
        return ""
    extra = "".join(f' data-{k}="{esc(v)}"' for k, v in attrs.items())
    return (
        f'<figure class="chart" data-figure="{esc(name)}" data-sweep="{esc(sweep)}"{extra}>'
        f"{svg}<figcaption>{caption}</figcaption></figure>"
    )


def lines_by_trial_or_model(
    sweep: SweepData, frame: pd.DataFrame, x: str, y: str
) -> tuple[list[Series], bool]:
    """One series per trial, or per model (mean over its trials) when there are too many."""
    ids = list(dict.fromkeys(frame["trial_id"]))
    if len(ids) <= MAX_LINES:
        series = []
        for tid in _in_trial_order(sweep, ids):
            rows = frame[frame["trial_id"] == tid]
            series.append(Series(sweep.label(tid), list(zip(rows[x], rows[y], strict=True))))
        return series, False
    models = sweep.trials.set_index("trial_id")["model"] if "model" in sweep.trials else None
    frame = frame.assign(
        _group=[str(models.get(t, "?")) if models is not None else "?" for t in frame["trial_id"]]
    )
    series = []
    for group, rows in frame.groupby("_group", sort=False):
        mean = rows.groupby(x)[y].mean()
        count = rows["trial_id"].nunique()
        series.append(Series(f"{group} (mean of {count})", list(mean.items())))
    return series, True


def _in_trial_order(sweep: SweepData, ids: Iterable[str]) -> list[str]:
    order = {t: i for i, t in enumerate(sweep.trials.get("trial_id", []))}
    return sorted(ids, key=lambda t: order.get(t, len(order)))


# --------------------------------------------------------------------------- sections


def render_overview(sweeps: list[SweepData]) -> str:
    rows = []
    for s in sweeps:
        status = s.trials["status"] if "status" in s.trials else pd.Series(dtype=str)
        datasets = s.trials["dataset.name"].dropna().unique() if "dataset.name" in s.trials else []
        meta = s.meta or {}
        grid = [f"{k}: {json.dumps(v)}" for k, v in (meta.get("grid") or {}).items()]
        if cases := meta.get("cases"):
            keys = ", ".join(dict.fromkeys(k for case in cases for k in case))
            grid.insert(0, f"{len(cases)} cases of {keys}")
        rows.append(
            {
                "sweep": s.name,
                "path": s.uri,
                "dataset": ", ".join(map(str, datasets)) or "–",
                "grid": "; ".join(grid) or "–",
                "ok": int((status == "ok").sum()),
                "failed": int((status == "failed").sum()),
                "missing": len(s.missing_ids),
            }
        )
    columns = [
        Column("sweep", "sweep"),
        Column("folder", "path"),
        Column("dataset", "dataset"),
        Column("grid", "grid"),
        Column("ok", "ok"),
        Column("failed", "failed"),
        Column("no result", "missing"),
    ]
    return section("sweeps", "Sweeps", render_table(rows, columns, "sweeps"))


def attack_columns(trials: pd.DataFrame) -> tuple[list[str], list[tuple[str, str]]]:
    """Minimisation attacks (with a mean distortion) and (fixed-budget attack, budget) pairs."""
    minimisers, budgets = [], []
    for col in trials.columns:
        if m := re.fullmatch(r"(.+)/mean_dist_rms", col):
            minimisers.append(m.group(1))
    for col in trials.columns:
        if (m := re.fullmatch(r"(.+)/success@(.+)", col)) and m.group(1) not in minimisers:
            budgets.append((m.group(1), m.group(2)))
    return minimisers, budgets


def render_table1(sweeps: list[SweepData]) -> str:
    failures = render_failures(sweeps)
    frames = [s.trials.assign(sweep=s.name) for s in sweeps if "trial_id" in s.trials]
    frames = [f for f in frames if not f.empty]
    if not frames:  # only sweep.json so far: still say which trials are missing
        return failures and section("table1", "Trials", failures)
    trials = pd.concat(frames, ignore_index=True)
    axes = [a for a in CORE_AXES if a in trials]
    for s in sweeps:
        axes += [a for a in s.axes if a in trials and a not in axes]
    columns = [Column("sweep", "sweep"), Column("trial", "trial_id", "id")]
    headers = {
        "model": "model",
        "weight_decay": "weight decay λ",
        "subset": "subset",
        "seed": "seed",
    }
    for a in axes:
        columns.append(Column(headers.get(a, a), a, "decay" if a == "weight_decay" else "text"))
    for key, header in (
        ("train_error", "train err."),
        ("test_error", "test err."),
        ("heldout_error", "held-out err."),
    ):
        if key in trials:
            columns.append(Column(header, key, "pct"))
    minimisers, budgets = attack_columns(trials)
    for a in minimisers:
        columns.append(Column(f"{a} av. min. distortion (rms)", f"{a}/mean_dist_rms", "num"))
        if f"{a}/success_rate" in trials:
            columns.append(Column(f"{a} success", f"{a}/success_rate", "pct"))
    for a, eps in budgets:
        columns.append(Column(f"{a} success @{eps}", f"{a}/success@{eps}", "pct"))
    if "status" in trials:
        columns.append(Column("status", "status"))
    body = render_table(
        trials.to_dict("records"),
        columns,
        "table1",
        "Errors are fractions of the training set used, the test set and the held-out rest of "
        "the training set; distortion is sqrt(mean((x'-x)^2)) over successful examples.",
    )
    body += failures
    return section(
        "table1",
        "Table 1: models, clean errors and minimum distortion",
        body,
        "One row per trial, as the paper's Table 1 (one row per model and weight decay).",
    )


def render_failures(sweeps: list[SweepData]) -> str:
    rows = []
    for s in sweeps:
        if "status" in s.trials:
            failed = s.trials[s.trials["status"] != "ok"]
            for row in failed.to_dict("records"):
                reason = row.get("reason") or row.get("status")
                rows.append({"sweep": s.name, "trial_id": row["trial_id"], "reason": reason})
        for tid in s.missing_ids:
            rows.append(
                {"sweep": s.name, "trial_id": tid, "reason": "no result row (running or died)"}
            )
    for row in rows:
        sweep = next(s for s in sweeps if s.name == row["sweep"])
        row["label"] = sweep.label(row["trial_id"])
    if not rows:
        return ""
    columns = [
        Column("sweep", "sweep"),
        Column("trial", "trial_id", "id"),
        Column("trial config", "label"),
        Column("reason", "reason"),
    ]
    return f"<h3>Failed trials ({len(rows)})</h3>" + render_table(rows, columns, "failed")


def render_robust(sweeps: list[SweepData]) -> str:
    parts = []
    for s in sweeps:
        if s.curves.empty:
            continue
        figures = []
        for attack, rows in s.curves.groupby("attack", sort=False):
            norm = str(rows["norm"].iloc[0]) if "norm" in rows else ""
            series, grouped = lines_by_trial_or_model(s, rows, "budget", "robust_error")
            svg = svg_chart(
                series,
                f"{attack}: robust error against budget",
                Axis(f"budget ε ({NORM_NAMES.get(norm, norm)})", lo=0.0),
                Axis("robust error", percent=True, lo=0.0, hi=1.0),
                "robust-error",
            )
            how = "mean over each model's trials" if grouped else "one line per trial"
            caption = (
                f"{esc(attack)}: test examples misclassified clean or fooled within the budget; "
                f"{how}."
            )
            figures.append(figure(svg, "robust-error", s.name, caption, attack=str(attack)))
        parts.append((s, "".join(figures)))
    body = sweep_columns(parts)
    return body and section("robust", "Robust error against budget", body)


def render_distortion(sweeps: list[SweepData]) -> str:
    parts = []
    any_lists = False
    for s in sweeps:
        trials = s.trials
        if trials.empty or "weight_decay" not in trials:
            continue
        if "status" in trials:
            trials = trials[trials["status"] == "ok"]
        minimisers, _ = attack_columns(trials)
        figures = []
        for attack in minimisers:
            x, decay = decay_axis(pd.Series([decay_for_plot(v) for v in trials["weight_decay"]]))
            frame = trials.assign(_wd=decay.to_numpy(), _dist=trials[f"{attack}/mean_dist_rms"])
            any_lists |= any(len(decay_values(v)) > 1 for v in trials["weight_decay"])
            series = []
            for i, (model, rows) in enumerate(frame.groupby("model", sort=False)):
                points = list(zip(rows["_wd"], rows["_dist"], strict=True))
                mean = rows.groupby("_wd")["_dist"].mean()
                series.append(Series(str(model), list(mean.items()), style=i))
                series.append(Series(f"{model} trial", points, False, style=i, legend=False))
            svg = svg_chart(
                series,
                f"{attack}: minimum distortion against weight decay",
                x,
                Axis("av. min. distortion (rms)", lo=0.0),
                "distortion-decay",
            )
            caption = (
                f"{esc(attack)}: dots are trials (mean rms distortion of their successful "
                "examples); lines join each model's mean at each λ."
            )
            figures.append(figure(svg, "distortion-decay", s.name, caption, attack=attack))
        parts.append((s, "".join(figures)))
    body = sweep_columns(parts)
    note = "A per-layer weight decay is plotted at its largest λ." if any_lists else ""
    return body and section("distortion", "Distortion against weight decay", body, esc(note))


def decay_axis(values: pd.Series) -> tuple[Axis, pd.Series]:
    """Log axis ticked at the sweep's own lambdas, and the values to plot on it.

    A log axis has no 0, so lambda = 0 is drawn a decade below the smallest positive lambda
    and ticked "0".
    """
    distinct = sorted({float(v) for v in values if _finite(v)})
    positive = [v for v in distinct if v > 0]
    if not positive:
        return Axis("weight decay λ", ticks=[(v, f"{v:g}") for v in distinct]), values
    zero_at = positive[0] / 10
    ticks = [(v, f"{v:g}") for v in positive] if len(positive) <= 8 else None
    if 0.0 in distinct:
        values = values.where(values != 0.0, zero_at)
        ticks = [(zero_at, "0"), *(ticks or [])] if ticks is not None else None
    return Axis("weight decay λ (log)", log=True, ticks=ticks), values


def render_training(sweeps: list[SweepData]) -> str:
    parts = []
    for s in sweeps:
        if s.epochs.empty:
            continue
        series, grouped = lines_by_trial_or_model(s, s.epochs, "epoch", "test_error")
        svg = svg_chart(
            series,
            "test error during training",
            Axis("epoch", lo=0.0, integer=True),
            Axis("test error", percent=True, lo=0.0),
            "training",
        )
        how = "mean over each model's trials" if grouped else "one line per trial"
        parts.append((s, figure(svg, "training", s.name, f"Test error after each epoch; {how}.")))
    body = sweep_columns(parts)
    return body and section("training", "Training curves", body)


# --------------------------------------------------------------------------- example images


def image_shape(size: int, channels: int | None = None) -> tuple[int, int, int]:
    """C, H, W of a flattened square image: 64 -> 1x8x8, 784 -> 1x28x28, 3072 -> 3x32x32."""
    for c in (channels,) if channels else (1, 3):
        side = math.isqrt(size // c)
        if size % c == 0 and c * side * side == size:
            return c, side, side
    raise ValueError(f"cannot read a {size}-value vector as a square image")


def png_uri(image: np.ndarray) -> str:
    """A (C, H, W) image in [0, 1] as a data: URI, scaled up without smoothing."""
    pixels = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    c, h, w = pixels.shape
    pil = Image.fromarray(pixels[0], "L") if c == 1 else Image.fromarray(pixels.transpose(1, 2, 0))
    scale = max(1, math.ceil(IMAGE_PX / max(h, w)))
    pil = pil.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class CleanImages:
    """Test-set images by (dataset, root), loaded once; None where the data cannot be had."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str | None], Any] = {}
        self.errors: dict[tuple[str, str | None], str] = {}

    def get(self, name: Any, root: Any) -> Any:
        key = (str(name), root if isinstance(root, str) and root else None)
        if key not in self.cache:
            try:
                from advlab.data import load_dataset  # torch: only when images are drawn

                self.cache[key] = load_dataset(*key).x_test
            except Exception as err:  # a report is still worth having without the clean images
                self.cache[key] = None
                self.errors[key] = f"{type(err).__name__}: {err}"
        return self.cache[key]


def pick_attack(examples: pd.DataFrame) -> tuple[str, float] | None:
    """The minimisation attack (budget NaN) if any, else the largest budget of the first attack."""
    if examples.empty:
        return None
    minimising = examples[examples["budget"].isna()]
    if not minimising.empty:
        return str(minimising["attack"].iloc[0]), math.nan
    first = str(examples["attack"].iloc[0])
    return first, float(examples.loc[examples["attack"] == first, "budget"].max())


def render_examples(sweeps: list[SweepData]) -> str:
    clean = CleanImages()
    parts = []
    for s in sweeps:
        if s.examples.empty:
            continue
        trial_ids = _in_trial_order(s, dict.fromkeys(s.examples["trial_id"]))
        blocks = [trial_examples(s, tid, clean) for tid in trial_ids[:MAX_EXAMPLE_TRIALS]]
        more = len(trial_ids) - MAX_EXAMPLE_TRIALS
        if more > 0:
            blocks.append(f'<p class="note">…and {more} more trials, not shown.</p>')
        parts.append((s, "".join(blocks)))
    body = sweep_columns(parts)
    if not body:
        return ""
    notes = "".join(
        f'<p class="note">Clean images of {esc(name)} unavailable ({esc(why)}).</p>'
        for (name, _), why in clean.errors.items()
    )
    intro = (
        f"Per trial, the first {EXAMPLES_PER_TRIAL} successful examples of the minimisation "
        f"attack: original, adversarial, and the perturbation magnified ×{MAGNIFY:g} around gray "
        "0.5 (as in the paper's figures). Captions: true label → adversarial prediction, rms "
        "distortion."
    )
    return section("examples", "Adversarial examples", notes + body, intro)


def trial_examples(sweep: SweepData, trial_id: str, clean: CleanImages) -> str:
    rows = sweep.examples[sweep.examples["trial_id"] == trial_id]
    chosen = pick_attack(rows)
    if chosen is None:
        return ""
    attack, budget = chosen
    rows = rows[rows["attack"] == attack]
    rows = rows[rows["budget"].isna()] if math.isnan(budget) else rows[rows["budget"] == budget]
    rows = rows.sort_values("example")
    rows = pd.concat([rows[rows["success"]], rows[~rows["success"]]]).head(EXAMPLES_PER_TRIAL)
    x_test = None
    info = (
        sweep.trials[sweep.trials["trial_id"] == trial_id] if "trial_id" in sweep.trials else None
    )
    if info is not None and not info.empty and "dataset.name" in info:
        root = info["dataset.root"].iloc[0] if "dataset.root" in info else None
        x_test = clean.get(info["dataset.name"].iloc[0], root)
    cells = [example_cell(row, x_test) for row in rows.to_dict("records")]
    where = "" if math.isnan(budget) else f" @{budget:g}"
    return (
        f'<div class="trial-examples" data-trial="{esc(trial_id)}" data-attack="{esc(attack)}">'
        f'<h4>{esc(sweep.label(trial_id))} <span class="id">{esc(trial_id)}</span> · '
        f'{esc(attack)}{esc(where)}</h4><div class="examples">{"".join(cells)}</div></div>'
    )


def example_cell(row: dict[str, Any], x_test: Any) -> str:
    adv = np.asarray(row["x_adv"], dtype=np.float32)
    original = None
    if x_test is not None and 0 <= int(row["dataset_index"]) < len(x_test):
        candidate = x_test[int(row["dataset_index"])].numpy()
        if candidate.size == adv.size:
            original = candidate.astype(np.float32)
    shape = original.shape if original is not None else image_shape(adv.size)
    adv = adv.reshape(shape)
    images = []
    if original is not None:
        images.append(("original", original))
    images.append(("adversarial", adv))
    if original is not None:
        images.append((f"perturbation ×{MAGNIFY:g}", 0.5 + MAGNIFY * (adv - original)))
    imgs = "".join(
        f'<img src="{png_uri(image)}" alt="{esc(kind)}" title="{esc(kind)}" data-kind="{kind}">'
        for kind, image in images
    )
    mark = "" if row["success"] else " (attack failed)"
    caption = f"{row['label']} → {row['adv_pred']}, rms {num(row['dist_rms'])}{mark}"
    return f'<figure class="example">{imgs}<figcaption>{esc(caption)}</figcaption></figure>'


# --------------------------------------------------------------------------- transfer, properties


def heat_style(value: float) -> str:
    """White at 0% to red at 100%; white text on the dark end."""
    if not _finite(value):
        return ""
    v = min(max(float(value), 0.0), 1.0)
    r, g, b = (round(255 + (end - 255) * v) for end in (192, 57, 43))
    ink = "#fff" if v > 0.55 else "#111"
    return f' style="background:rgb({r},{g},{b});color:{ink}"'


# Measurements, never part of a row's name (kind and budget are: they split a source's rows).
TRANSFER_KNOWN = {
    "sweep",
    "source_trial",
    "attack",
    "target",
    "target_kind",
    "n",
    "error_adv",
    "error_clean",
    "rms",
}


def render_transfer(sweeps: list[SweepData]) -> str:
    blocks = []
    for s in sweeps:
        if s.transfer.empty or not {"source_trial", "target", "error_adv"} <= set(s.transfer):
            continue
        frame = s.transfer if "attack" in s.transfer else s.transfer.assign(attack="")
        # The fixed-stddev noise rows belong under every attack, as in the paper's tables.
        noise = frame["source_trial"] == NOISE_SOURCE
        for attack, rows in frame[~noise].groupby("attack", sort=False):
            rows = pd.concat([rows, frame[noise]], ignore_index=True)
            blocks.append(transfer_matrix(s, str(attack), rows))
    if not blocks:
        return ""
    intro = (
        "Error of each column's model on the examples made for each row's model (the paper's "
        "Tables 2 and 4); hover a cell for n and the error on the clean originals."
    )
    return section("transfer", "Transfer between models", "".join(blocks), intro)


def row_key_columns(rows: pd.DataFrame) -> list[str]:
    """Extra columns that tell apart rows sharing one (source, target) cell.

    The transfer stage may add rows the paper's Tables 2 and 4 have (Gaussian noise of several
    stddevs, amplified perturbations) with a descriptive column; those become part of the row
    name. Columns that never split a cell (measurements) stay out.
    """
    cell = ["source_trial", "target"]
    shared = rows[rows.duplicated(cell, keep=False)]
    keys = []
    for col in rows.columns:
        if col in TRANSFER_KNOWN or shared.empty:
            continue
        try:
            if shared.groupby(cell)[col].nunique(dropna=False).gt(1).any():
                keys.append(col)
        except TypeError:  # list-valued columns cannot name a row
            continue
    return keys


def transfer_matrix(sweep: SweepData, attack: str, rows: pd.DataFrame) -> str:
    extra = row_key_columns(rows)
    key_cols = ["source_trial", *extra]
    # None for missing: NaN != NaN would give every row of a trial its own key.
    keyed = [
        tuple(None if _missing(v) else v for v in r) for r in rows[key_cols].itertuples(index=False)
    ]
    sources = list(dict.fromkeys(keyed))
    trial_order = {t: i for i, t in enumerate(sweep.trials.get("trial_id", []))}
    targets = sorted(
        dict.fromkeys(rows["target"]), key=lambda t: (t not in trial_order, trial_order.get(t, 0))
    )
    sources.sort(key=lambda k: (k[0] not in trial_order, trial_order.get(k[0], 0)))
    dist_col = f"{attack}/mean_dist_rms"
    dists = (
        sweep.trials.set_index("trial_id")[dist_col] if dist_col in sweep.trials else pd.Series()
    )
    head = "".join(f'<th data-target="{esc(t)}">{esc(sweep.label(t))}</th>' for t in targets)
    body = []
    for key in sources:
        mine = rows[[k == key for k in keyed]]
        name = sweep.label(key[0]) if key[0] in trial_order else str(key[0])
        name += "".join(
            f" · {col}={_cell_text(v)}"
            for col, v in zip(extra, key[1:], strict=True)
            if not _missing(v)
        )
        cells = []
        for t in targets:
            hit = mine[mine["target"] == t]
            if hit.empty:
                cells.append('<td class="n">–</td>')
                continue
            err = float(hit["error_adv"].mean())
            tip = f"n={int(hit['n'].sum())}" if "n" in hit else ""
            if "error_clean" in hit:
                tip += f", clean error {pct(hit['error_clean'].mean())}"
            diag = " diag" if t == key[0] else ""
            cells.append(
                f'<td class="n heat{diag}" data-target="{esc(t)}" data-value="{err!r}" '
                f'title="{esc(tip)}"{heat_style(err)}>{pct(err)}</td>'
            )
        if "rms" in mine and mine["rms"].notna().any():  # the rms each row's inputs moved by
            dist = num(float(mine["rms"].mean()))
        else:
            dist = num(dists.get(key[0])) if key[0] in dists else "–"
        body.append(
            f'<tr data-source="{esc(key[0])}"><th>{esc(name)}</th>{"".join(cells)}'
            f'<td class="n">{dist}</td></tr>'
        )
    return (
        f'<h3>{esc(sweep.name)} · {esc(attack)}</h3><div class="scroll"><table class="heatmap" '
        f'data-table="transfer" data-sweep="{esc(sweep.name)}" data-attack="{esc(attack)}">'
        f"<thead><tr><th>made for \\ fed to</th>{head}<th>av. distortion</th></tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def render_properties(sweeps: list[SweepData]) -> str:
    frames = [s.properties.assign(sweep=s.name) for s in sweeps if not s.properties.empty]
    if not frames:
        return ""
    props = pd.concat(frames, ignore_index=True)
    needed = {"trial_id", "analysis", "layer", "metric", "value"}
    if not needed <= set(props):
        return ""
    by_name = {s.name: s for s in sweeps}
    analyses = list(dict.fromkeys(props["analysis"]))
    analyses.sort(key=lambda a: a != "lipschitz")  # the paper's Table 5 first
    blocks = []
    for analysis in analyses:
        rows_in = props[props["analysis"] == analysis]
        one_metric = rows_in["metric"].nunique() == 1
        keys = list(dict.fromkeys(zip(rows_in["layer"], rows_in["metric"], strict=True)))
        keys.sort(key=lambda k: k[0] == "network")  # the whole-network product last
        columns = [Column("sweep", "sweep"), Column("trial", "trial_id", "id")]
        columns.append(Column("trial config", "label"))
        for layer, metric in keys:
            header = str(layer) if one_metric else f"{layer} ({metric})"
            columns.append(Column(header, f"{layer}|{metric}", "num"))
        rows = []
        for (sweep, tid), group in rows_in.groupby(["sweep", "trial_id"], sort=False):
            row: dict[str, Any] = {"sweep": sweep, "trial_id": tid}
            row["label"] = by_name[sweep].label(tid)
            for r in group.itertuples(index=False):
                row[f"{r.layer}|{r.metric}"] = r.value
            rows.append(row)
        title = ANALYSIS_TITLES.get(str(analysis), str(analysis))
        metric = f" ({rows_in['metric'].iloc[0]})" if one_metric else ""
        blocks.append(f"<h3>{esc(title)}{esc(metric)}</h3>")
        blocks.append(render_table(rows, columns, f"properties-{analysis}"))
    return section("properties", "Properties of the trained networks", "".join(blocks))


# --------------------------------------------------------------------------- page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#111;
background:#fafafa}
header,section,nav,footer{max-width:1500px;margin:0 auto;padding:8px 24px}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;border-bottom:2px solid #ddd;
padding-bottom:4px;margin-top:28px}h3{font-size:15px;margin:14px 0 6px}
h4{font-size:13px;margin:8px 0 4px}
nav a{margin-right:14px}.intro,.note,figcaption,caption{color:#555;font-size:12.5px}
caption{caption-side:bottom;text-align:left;padding-top:4px}
.scroll{overflow-x:auto}table{border-collapse:collapse;background:#fff;font-size:12.5px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;white-space:nowrap}
thead th{white-space:normal;vertical-align:bottom;max-width:110px}
th{background:#f0f0f0;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.id{font-family:ui-monospace,Menlo,monospace;font-size:11.5px;color:#555}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(580px,1fr));gap:18px}
.col{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:4px 12px 10px;min-width:0;
display:flex;flex-wrap:wrap;align-items:flex-start;align-content:flex-start;
column-gap:20px}.col>h3,.col>p{flex-basis:100%}
figure.chart{margin:8px 0;flex:0 1 560px;min-width:0}
figure.chart svg{max-width:100%;height:auto;display:block}
svg text{font:11px system-ui,sans-serif;fill:#333}svg .ct{font-size:13px;font-weight:600;
text-anchor:middle}svg .xt,svg .al{text-anchor:middle}svg .yt{text-anchor:end}
svg .frame{fill:#fff;stroke:#999}svg .grid{stroke:#e8e8e8}
.examples{display:flex;flex-wrap:wrap;gap:10px}figure.example{margin:0;padding:4px;
border:1px solid #eee;background:#fcfcfc}figure.example img{margin-right:3px;
image-rendering:pixelated;border:1px solid #ccc}
table.heatmap td.heat{min-width:56px;text-align:center}table.heatmap td.diag{outline:2px solid #333;
outline-offset:-2px}
"""


def render_report(sweeps: list[SweepData]) -> str:
    """The whole page as one HTML string."""
    sections = [
        render_overview(sweeps),
        render_table1(sweeps),
        render_robust(sweeps),
        render_distortion(sweeps),
        render_training(sweeps),
        render_examples(sweeps),
        render_transfer(sweeps),
        render_properties(sweeps),
    ]
    sections = [s for s in sections if s]
    links = "".join(
        f'<a href="#{m.group(1)}">{m.group(2)}</a>'
        for s in sections
        if (m := re.match(r'<section id="([^"]+)"><h2>([^<]+)</h2>', s))
    )
    names = ", ".join(s.name for s in sweeps)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>advlab report: {esc(names)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>advlab report: {esc(names)}</h1><p class="intro">Reproducing Szegedy et '
        f"al. 2014, <i>Intriguing properties of neural networks</i>. Generated {stamp}.</p>"
        f"</header><nav>{links}</nav>{''.join(sections)}"
        '<footer class="note">advlab · one self-contained page: tables from the parquet '
        "results, charts drawn as inline SVG, images embedded as PNG.</footer></body></html>\n"
    )


def build_report(sweep_dirs: list[str], out: str) -> Path:
    """Write the HTML report of one or more sweep folders to `out`; returns its path."""
    if not sweep_dirs:
        raise ValueError("build_report: give at least one sweep folder")
    sweeps = [load_sweep_data(d) for d in sweep_dirs]
    seen: dict[str, int] = {}
    for s in sweeps:  # two storages may hold sweeps of one name: keep columns apart
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s.name = f"{s.name} ({seen[s.name]})"
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(sweeps), encoding="utf-8")
    return path
