"""The report at scale, on synthetic results (tests/synthetic_results.py: schema-valid parquet
written in a second, with known means): grouping over seeds, top-k and filters, the transfer
section pooled by configuration, the metric-against-axis charts, and a page whose size grows
linearly with the trials, within its caps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from synthetic_results import BASE, CONTROLS, STEP, write_synthetic

from advlab import results
from advlab.cli import main
from advlab.report import ReportSettings, ReportSettingsError, build_report, render_report
from advlab.report.html import vega_bundle
from advlab.report.load import load_all
from advlab.report.sections import robust, table1, training
from advlab.report.select import select
from advlab.report.settings import Metric, from_command_line
from advlab.stats import METHOD, RATE_METHOD, estimate
from advlab.tables import NOISE_SOURCE

MODELS = ["fc8-10", "fc16-10", "fc24-10"]
DECAYS = [1.0e-4, 2.0e-4, 3.0e-4, 4.0e-4]
SEEDS = 3


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> str:
    """3 models x 4 decays x 3 seeds: 12 configurations, 36 trials."""
    return write_synthetic(tmp_path_factory.mktemp("small"), MODELS, DECAYS, SEEDS)


def expected_error(model: str, decay: float) -> float:
    """A configuration's mean test error by construction (grid order: model, then decay)."""
    return BASE + STEP * (MODELS.index(model) * len(DECAYS) + DECAYS.index(decay))


def cells(html: str, table: str) -> list[dict[str, str]]:
    """Per row of a table: data-col -> data-value (or the cell's text)."""
    body = re.search(rf'<table data-table="{table}"[^>]*>(.*?)</table>', html, re.S)
    assert body is not None, f"no table {table}"
    rows = []
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body.group(1), re.S):
        found = {}
        for attrs, text in re.findall(r"<td([^>]*)>(.*?)</td>", row, re.S):
            col = re.search(r'data-col="([^"]*)"', attrs).group(1)
            value = re.search(r'data-value="([^"]*)"', attrs)
            found[col] = value.group(1) if value else re.sub(r"<[^>]+>", "", text)
        if found:
            rows.append(found)
    return rows


def test_top_k_ranks_configurations_by_their_mean_over_seeds(small: str) -> None:
    compared = load_all([small])
    assert len(compared.configs) == 12 and len(compared.trials) == 36
    by_error = select(compared, ReportSettings(top=3))
    assert [c.values["model"] for c in by_error.configs] == ["fc8-10"] * 3
    assert [c.values["weight_decay"] for c in by_error.configs] == ["0.0001", "0.0002", "0.0003"]
    assert len(by_error.trials) == 9 and by_error.left_out == 9
    # L-BFGS's mean distortion falls along the grid: the last configurations rank first
    lbfgs = Metric(attack="lbfgs", column="mean_dist_rms")
    by_distortion = select(compared, ReportSettings(top=2, rank_by=lbfgs))
    assert [c.key for c in by_distortion.configs] == [c.key for c in compared.configs[::-1][:2]]
    highest = select(compared, ReportSettings(top=2, rank_by=lbfgs, descending=True))
    assert [c.key for c in highest.configs] == [c.key for c in compared.configs[:2]]
    # a filter, then top-k within it
    kept = select(compared, ReportSettings(where={"model": ["fc24-10"]}, top=2))
    assert [c.values["weight_decay"] for c in kept.configs] == ["0.0001", "0.0002"]
    assert set(kept.attacks["config"]) == {c.key for c in kept.configs}
    # the command line's flags: one axis twice keeps either value; `sweep` is an axis too
    flags = from_command_line(["model=fc8-10", "model=fc24-10", "sweep=synthetic"], None,
                              "lbfgs:mean_dist_rms", False, [], [], None)  # fmt: skip
    assert flags.where == {"model": ["fc8-10", "fc24-10"], "sweep": ["synthetic"]}
    assert flags.rank_by == lbfgs
    either = select(compared, flags)
    assert {c.values["model"] for c in either.configs} == {"fc8-10", "fc24-10"}
    assert len(either.configs) == 8


def test_table1_one_row_per_configuration_constant_axes_in_the_caption(small: str) -> None:
    settings = ReportSettings(where={"model": ["fc16-10"], "weight_decay": ["0.0002", "0.0004"]})
    html = render_report(select(load_all([small]), settings))
    rows = cells(html, "table1")
    assert len(rows) == 2  # two configurations, their seeds pooled
    for row, decay in zip(rows, [2.0e-4, 4.0e-4], strict=True):
        assert float(row["test_error"]) == pytest.approx(expected_error("fc16-10", decay))
        assert float(row["seeds"]) == SEEDS
        assert "model" not in row and row["weight_decay"] == f"{decay:g}"
    assert "Every row: model = fc16-10." in html
    assert 'data-left-out="10"' in html


def test_table_rows_are_capped_at_the_best_configurations(small: str) -> None:
    html = render_report(load_all([small], ReportSettings(rows=5)))
    rows = cells(html, "table1")
    errors = sorted(expected_error(m, d) for m in MODELS for d in DECAYS)[:5]
    assert [float(r["test_error"]) for r in rows] == pytest.approx(errors)
    assert "7 more not listed" in html


def test_transfer_is_pooled_by_configuration_past_the_per_trial_limit(small: str) -> None:
    settings = ReportSettings(matrix_trials=12, matrix_configs=4)
    compared = load_all([small], settings)
    html = render_report(compared)
    assert 'data-table="transfer" ' in html and 'data-grouped="config"' in html
    frame = results.load(small).transfer
    config_of = dict(zip(compared.trials["trial_id"], compared.trials["config"], strict=True))
    frame = frame[(frame["source_trial"] != NOISE_SOURCE) & (frame["attack"] == "lbfgs")]
    frame = frame.assign(source=frame["source_trial"].map(config_of))
    # the summary lists every configuration: own model, other seeds, other configurations
    summary = cells(html, "transfer-summary")  # the first: L-BFGS's
    assert len(summary) == 12
    for row, config in zip(summary, compared.configs, strict=True):
        mine = frame[frame["source"] == config.key]
        own = mine[mine["target"] == mine["source_trial"]]
        target = mine["target"].map(config_of)
        same = mine[(target == config.key) & (mine["target"] != mine["source_trial"])]
        other = mine[target.notna() & (target != config.key)]
        assert float(row["own"]) == pytest.approx(own["error_adv"].mean()) == 1.0
        if len(same):
            assert float(row["same"]) == pytest.approx(same["error_adv"].mean())
        assert float(row["other"]) == pytest.approx(other["error_adv"].mean())
        for control in CONTROLS:
            wanted = mine.loc[mine["target"] == control, "error_adv"].mean()
            assert float(row[control]) == pytest.approx(wanted)
    matrices = re.findall(r'<table data-table="transfer" [^>]*data-attack="lbfgs"[^>]*>', html)
    assert matrices and all('data-grouped="config"' in m for m in matrices)


def test_metric_against_any_axis_shows_each_seed(small: str) -> None:
    settings = ReportSettings(chart_axes=["weight_decay"], chart_metrics=[Metric()])
    html = render_report(load_all([small], settings))
    (spec,) = re.findall(
        r'data-shows="metric-by-axis" data-axis="weight_decay".*?<script type="application/json"'
        r' class="vl-spec" data-target="axis-0">(.*?)</script>', html, re.S)  # fmt: skip
    spec = json.loads(spec)
    assert spec["layer"][0]["encoding"]["x"]["field"] == "x"
    rows = spec["data"]["values"]
    assert len(rows) == 12
    trials = results.load(small).trials
    for row in rows:
        model, decay = row["configuration"].split(" wd=")
        assert row["x"] == decay
        assert row["mean"] == pytest.approx(expected_error(model, float(decay)))
        decays = trials["weight_decay"].map(lambda v: v[0])
        seeds = trials[(trials["model"] == model) & (decays == float(decay))]
        assert row["values"] == pytest.approx(list(seeds["test_error"]))  # each seed's value
    # defaults: every axis that varies, against test error and each attack's headline number
    html = render_report(load_all([small]))
    shown = re.findall(r'data-axis="([^"]*)" data-metric="([^"]*)"', html)
    assert shown == [(a, m) for a in ("model", "weight_decay")
                     for m in ("test_error", "mean_dist_rms", "success_rate")]  # fmt: skip


def test_many_trials_page_grows_linearly_within_its_caps(tmp_path: Path) -> None:
    """100 and 500 trials (50 and 250 configurations of two seeds): what the page holds
    beyond its fixed part (scripts, styles) grows at most in proportion to the trials, and
    every capped part stays at its cap."""
    fixed = len(vega_bundle().encode())
    sizes = {}
    for decays in (10, 50):
        storage = tmp_path / f"n{decays}"
        grid = [1.0e-4 * (k + 1) for k in range(decays)]
        uri = write_synthetic(storage, ["fc8-10", "fc16-10", "fc24-10", "fc32-10", "fc40-10"],
                              grid, 2)  # fmt: skip
        page = build_report([uri], str(storage / "report.html"))
        html = page.read_text(encoding="utf-8")
        sizes[decays] = page.stat().st_size - fixed
        configs = 5 * decays
        assert len(cells(html, "table1")) == min(configs, 50)  # rows: at most 50
        assert html.count('class="trial-examples"') <= 16  # example cards: at most 16
        assert html.count('data-grouped="config"') > 0  # no per-trial matrix past 12 sources
        for matrix in re.findall(r'<table data-table="transfer" .*?</table>', html, re.S):
            assert matrix.count("<tr") <= 1 + 12  # header and at most 12 configurations
        # no legend of hundreds of names, and the bar's chips fold away
        assert ('"legend": null' in html) == (configs > 20)
        assert ('<details class="chips">' in html) == (configs > 24)
    per_trial = {d: s / (10 * d) for d, s in sizes.items()}
    assert per_trial[50] <= 1.1 * per_trial[10], sizes
    assert sizes[50] / 500 < 6_000, sizes  # bytes per trial beyond the fixed part


def test_bad_report_settings_are_one_line_and_exit_2(small: str, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "r.html")
    cases = [
        (["--where", "modle=fc8-10"], "no grid axis 'modle'"),
        (["--where", "model=fc9-10"], "model takes none such"),
        (["--rank-by", "pgd:success_rate"], "no attack 'pgd'"),
        (["--rank-by", "lbfgs:mean_distance"], "is not a column of lbfgs's runs"),
        (["--top", "0"], "top:"),
        (["--chart", "depth"], "no grid axis 'depth'"),
    ]
    for flags, said in cases:
        assert main(["report", small, "-o", out, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and len(err.splitlines()) == 1, err
    assert not Path(out).exists()  # nothing written
    with pytest.raises(ReportSettingsError, match="no grid axis 'seedz'"):
        build_report([small], out, settings=ReportSettings(where={"seedz": ["0"]}))


def test_table1_names_each_cells_interval_method(small: str) -> None:
    # The synthetic trials store no n_test (a sweep written before it was recorded): their test
    # error keeps the seeds-only bootstrap; every attack run stores its n (12 examples), so a
    # success rate's interval is over seeds and examples, the same as advlab.stats gives.
    html = table1.render(load_all([small]))
    first = re.search(r"<tr[^>]*data-config[^>]*>(.*?)</tr>", html, re.S)
    assert first is not None
    attrs = dict(re.findall(r'<td data-col="([^"]*)"([^>]*)>', first.group(1)))
    method = {col: re.search(r'data-method="([^"]*)"', a) for col, a in attrs.items()}
    assert method["test_error"].group(1) == METHOD
    fgsm = "fgsm|success@0.05"
    assert method[fgsm].group(1) == RATE_METHOD and method["lbfgs|success"].group(1) == RATE_METHOD
    expected = estimate([0.35] * SEEDS, [12] * SEEDS)  # success 0.3 + ε at every seed
    lo = float(re.search(r'data-lo="([^"]*)"', attrs[fgsm]).group(1))
    hi = float(re.search(r'data-hi="([^"]*)"', attrs[fgsm]).group(1))
    assert (lo, hi) == (expected.lo, expected.hi) and 0.0 < lo < 0.35 < hi < 1.0


def test_each_chart_names_its_interval_method(small: str) -> None:
    # Robust error is a share of each trial's n_scanned (13 here): over seeds and examples.
    # The synthetic epochs' test error has no n_test beside it: the seeds-only bootstrap.
    compared = load_all([small])
    sections = ((robust, RATE_METHOD), (training, METHOD))
    for html, method in ((section.render(compared), method) for section, method in sections):
        subtitles = set(re.findall(r'"subtitle": "interval: ([^"]*)"', html))
        assert subtitles == {method}
