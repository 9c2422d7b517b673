"""The HTML report: one or more sweeps compared on one self-contained, interactive page.

    advlab report results/sweep-a results/sweep-b -o report.html
    advlab.report.build_report(["results/sweep-a", "results/sweep-b"], "report.html")

Modules: load (sweeps read with advlab.results, tagged with configurations and attack
variants), differ (what differs between sweeps and
trials), charts (Vega-Lite through altair), html (the page and its tables), images (example
PNGs) and one module per section under sections/. Every mean and interval comes from
advlab.stats.
"""

from __future__ import annotations

from pathlib import Path

from advlab.report.html import page
from advlab.report.load import Compared, load_all
from advlab.report.sections import (
    axes,
    bracket,
    dimension,
    distortion,
    examples,
    failures,
    measures,
    overview,
    pareto,
    robust,
    table1,
    training,
    transfer,
)
from advlab.report.select import select
from advlab.report.settings import ReportSettings, ReportSettingsError

__all__ = ["SECTIONS", "ReportSettings", "ReportSettingsError", "build_report", "render_report"]

# In page order; each renders "" when its data is absent.
SECTIONS = (
    overview, table1, failures, pareto, axes, robust, distortion, dimension, bracket, training,
    examples, transfer, measures,
)  # fmt: skip


def render_report(compared: Compared) -> str:
    names = ", ".join(compared.sweep_names)
    configs = [{"key": c.key, "name": c.name, "values": c.values} for c in compared.configs]
    sections = [s for s in (module.render(compared) for module in SECTIONS) if s]
    return page(f"advlab: {names}", overview.controls(compared), sections, configs)


def build_report(
    sweep_dirs: list[str],
    out: str,
    notes: list[str] | None = None,
    settings: ReportSettings | None = None,
) -> Path:
    """Write the report for these sweep folders (<storage>/<sweep>) to `out`; returns its path.
    FileNotFoundError when a folder holds no advlab results; ReportSettingsError when the
    settings name an axis, value or attack the sweeps lack. What could not be read is left
    out, said on the page and added to `notes` ("<sweep>: <what and why>")."""
    if not sweep_dirs:
        raise FileNotFoundError("no sweep folders given; pass one or more <storage>/<sweep>")
    settings = settings or ReportSettings()
    compared = select(load_all(list(sweep_dirs), settings), settings)
    if notes is not None:
        for run, name in zip(compared.runs, compared.sweep_names, strict=True):
            notes += [f"{name}: {note}" for note in run.notes]
    html = render_report(compared)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
