"""The head of the page: the filter bar, the sweeps compared, and what differs between them."""

from __future__ import annotations

from advlab import manifest
from advlab.report import differ
from advlab.report.html import Cell, Row, esc, section, table, text_cell
from advlab.report.load import Compared
from advlab.results import Results
from advlab.tables import Status

OPEN_CHIPS = 24  # more configurations than this: their chips fold away


def controls(compared: Compared) -> str:
    """A sticky bar: one select per setting that tells configurations apart, and a legend chip
    per configuration (click to hide it everywhere)."""
    selects = []
    for setting, values in filter_options(compared).items():
        options = "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in values)
        selects.append(
            f'<label>{esc(setting)} <select data-filter="{esc(setting)}">'
            f'<option value="">all</option>{options}</select></label>'
        )
    chips = "".join(
        f'<span class="chip" data-config="{esc(c.key)}" title="click to hide or show">'
        f'<span class="swatch" style="background:{esc(c.colour)}"></span>{esc(c.name)}</span>'
        for c in compared.configs
    )
    if len(compared.configs) > OPEN_CHIPS:  # a screenful of chips would hide the page
        chips = (
            f'<details class="chips"><summary>{len(compared.configs)} configurations: click to '
            f'hide or show each</summary><div class="row">{chips}</div></details>'
        )
    return (
        f'<header class="controls"><div class="row">{"".join(selects)}'
        f'<span id="advlab-shown"></span>{chips}</div></header>'
    )


def filter_options(compared: Compared) -> dict[str, list[str]]:
    """Each setting whose value differs between configurations, with its values in order."""
    options: dict[str, list[str]] = {}
    for setting in ["sweep", *compared.axes]:
        values = list(dict.fromkeys(c.values.get(setting, "—") for c in compared.configs))
        if len(values) > 1:
            options[setting] = values
    return options


def render(compared: Compared) -> str:
    rows = [
        _sweep_row(run, name) for run, name in zip(compared.runs, compared.sweep_names, strict=True)
    ]
    columns = [
        ("sweep", "sweep"), ("folder", "folder"), ("dataset", "data set"), ("ok", "ok"),
        ("failed", "failed"), ("stopped", "stopped early"), ("missing", "no result yet"),
        ("versions", "versions"),
    ]  # fmt: skip
    body = table("sweeps", columns, rows)
    changes = [
        f"<li>{esc(name)} {esc(line)}</li>"
        for run, name in zip(compared.runs, compared.sweep_names, strict=True)
        for line in differ.version_changes(run)
    ]
    if changes:
        body += (
            f'<p class="note">Sweeps run again with an edited file:</p><ul>{"".join(changes)}</ul>'
        )
    skipped = [
        f"<li>{esc(name)}: {esc(note)}</li>"
        for run, name in zip(compared.runs, compared.sweep_names, strict=True)
        for note in run.notes
    ]
    if skipped:
        body += f'<p class="note">Left out, could not be read:</p><ul>{"".join(skipped)}</ul>'
    if compared.left_out:
        settings = compared.settings
        body += (
            f'<p class="note" data-left-out="{compared.left_out}">{compared.left_out} '
            f"configurations left out by the report's settings (where: "
            f"{esc(_where_text(settings.where))}; top: {settings.top or 'all'} by "
            f"{esc(settings.rank_by.title)}).</p>"
        )
    body += _differences(compared)
    return section("sweeps", "Sweeps compared", body)


def _where_text(where: dict[str, list[str]]) -> str:
    return "; ".join(f"{a} in {', '.join(v)}" for a, v in where.items()) or "all"


def _sweep_row(run: Results, name: str) -> Row:
    trials = run.trials
    present = set(trials["trial_id"])
    missing = [t for t in manifest.current_ids(run.manifest) if t not in present]
    datasets = sorted({str(d) for d in trials.get("dataset.name", []) if d is not None})
    versions = (run.manifest or {}).get("versions") or []
    return Row(
        {
            "sweep": text_cell(name),
            "folder": text_cell(run.uri),
            "dataset": text_cell(", ".join(datasets)),
            "ok": Cell(str(int((trials["status"] == Status.OK).sum()))),
            "failed": Cell(str(int((trials["status"] == Status.FAILED).sum()))),
            "stopped": Cell(str(int((trials["status"] == Status.STOPPED).sum()))),
            "missing": Cell(str(len(missing))),
            "versions": Cell(str(len(versions))),
        }
    )


def _differences(compared: Compared) -> str:
    found = differ.differences(compared)
    if not found:
        return '<p class="note">All trials share every setting.</p>'
    names = compared.sweep_names
    rows = []
    for difference in found:
        cells = {"setting": text_cell(difference.key)}
        for sweep in names:
            values = difference.values.get(sweep, [differ.ABSENT])
            varies = difference.varies_within(sweep)
            cells[sweep] = Cell(
                ", ".join(values),
                cls="text value varies" if varies else "text value",
                title="takes these values across the sweep's trials" if varies else None,
            )
        rows.append(Row(cells))
    intro = (
        '<h3>What differs</h3><p class="note">Every setting that is not the same for all trials '
        "(specs with defaults filled in, each attack's recorded settings and budgets, sweep-level "
        "settings including --set overrides). <i>Italic</i>: varies within the sweep.</p>"
    )
    columns = [("setting", "setting"), *[(s, s) for s in names]]
    return intro + table("differences", columns, rows, cls="differs")
