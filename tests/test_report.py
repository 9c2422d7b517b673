"""The HTML report over two real sweeps, read back from the page and checked against parquet.

Sweep A ran through Ray Tune (with transfer), sweep B in this process (another activation,
another L-BFGS setup, a toy attack registered by the test, a failed trial); see report_sweeps.
Expected values are computed here from advlab.results' frames with plain pandas and scipy, not
with the report's own code. Chart values are read from the charts Chromium drew.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from browser import CHROMIUM, open_page
from PIL import Image
from report_sweeps import FAILURE, TOY, sweep_a_via_ray, sweep_b_in_process

from advlab import results
from advlab.cli import main
from advlab.data import load_dataset
from advlab.report import build_report
from advlab.stats import RATE_METHOD, estimate
from advlab.store import SweepStore
from advlab.transfer import NOISE_SOURCE

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sweeps(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("report")
    storage = folder / "results"
    return [sweep_a_via_ray(folder, storage), sweep_b_in_process(storage)]


@pytest.fixture(scope="module")
def loaded(sweeps: list[str]) -> list[results.Results]:
    return [results.load(s) for s in sweeps]


@pytest.fixture(scope="module")
def report(sweeps: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_report(sweeps, str(tmp_path_factory.mktemp("out") / "sub" / "report.html"))


@pytest.fixture(scope="module")
def page(report: Path) -> Page:
    return parse(report)


@pytest.fixture(scope="module")
def drawn(report: Path, tmp_path_factory: pytest.TempPathFactory) -> Drawn:
    """The page as Chromium ran it: what it requested and logged, what its charts drew, and
    what the filters do; plus a screenshot of every section."""
    if not CHROMIUM.exists():
        pytest.skip("needs /usr/bin/chromium (apt-get install chromium)")
    shots = tmp_path_factory.mktemp("screenshots")
    with open_page(report) as browser:
        charts = browser.wait_for("document.body.dataset.charts")
        plotted = browser.evaluate(POINTS_JS)
        seeds = browser.evaluate(POINTS_JS.replace("points_marks", "seeds_marks"))
        sections = browser.evaluate("[...document.querySelectorAll('section')].map(s => s.id)")
        screenshots = [browser.screenshot(f"#{s}", shots / f"{s}.png") for s in sections]
        filtered = browser.evaluate(
            FILTER_JS.replace("SETTING", "sweep").replace("VALUE", "tiny-b")
        )
        chipped = browser.evaluate(CHIP_JS)
        layout = browser.evaluate(LAYOUT_JS)
        return Drawn(
            charts, plotted, seeds, sections, screenshots, filtered, chipped, browser.requests(),
            browser.problems(), layout,
        )  # fmt: skip


@dataclass
class Drawn:
    charts: str
    points: dict[str, list[dict[str, Any]]]  # chart id -> the datum of every plotted mean
    seeds: dict[str, list[dict[str, Any]]]  # chart id -> the datum of every seed's own point
    sections: list[str]
    screenshots: list[Path]
    filtered: dict[str, Any]
    chipped: dict[str, Any]
    requests: list[str]
    problems: list[str]
    layout: dict[str, float]  # sizes in px at a 1400 px wide window


# How wide Table 1 is against the room it has, and how tall the transfer section is.
LAYOUT_JS = """(() => {
  const table = document.querySelector('table[data-table=table1]');
  return {table1: table.scrollWidth, room: table.closest('.scroll').clientWidth,
          window: window.innerWidth,
          transfer: document.getElementById('transfer').getBoundingClientRect().height};
})()"""


# Every mean a chart drew: the data behind the marks of its `points` layer, after its filters.
POINTS_JS = """(() => {
  const out = {};
  for (const [id, view] of Object.entries(window.advlab.views)) {
    const found = [];
    const walk = (node) => {
      if (node.marktype && node.name === "points_marks") {
        node.items.forEach(i => found.push(i.datum));
      }
      (node.items || []).forEach(walk);
    };
    walk(view.scenegraph().root);
    out[id] = found;
  }
  return out;
})()"""
SHOWN_JS = """(() => {
  const points = {};
  for (const [id, view] of Object.entries(window.advlab.views)) {
    const found = new Set();
    const walk = (node) => {
      if (node.marktype && node.name === "points_marks") {
        node.items.forEach(i => found.add(i.datum.config));
      }
      (node.items || []).forEach(walk);
    };
    walk(view.scenegraph().root);
    points[id] = [...found];
  }
  const rows = [...document.querySelectorAll('table[data-table=table1] tbody tr')]
    .filter(r => !r.hidden).map(r => r.dataset.config);
  return {points, rows};
})()"""
FILTER_JS = (
    "(async () => { const s = document.querySelector('select[data-filter=SETTING]');"
    " s.value = 'VALUE'; s.dispatchEvent(new Event('change'));"
    " await window.advlab.apply(); const shown = " + SHOWN_JS + ";"
    " s.value = ''; await window.advlab.apply(); return shown; })()"
)
CHIP_JS = (
    "(async () => { const chip = document.querySelector('.chip[data-config]');"
    " chip.click(); await window.advlab.apply(); const shown = " + SHOWN_JS + ";"
    " chip.click(); await window.advlab.apply(); return {...shown, key: chip.dataset.config}; })()"
)


# --------------------------------------------------------------------------- the page, parsed


@dataclass
class Table:
    attrs: dict[str, str]
    header: list[str] = field(default_factory=list)
    rows: list[dict[str, tuple[dict[str, str], str]]] = field(default_factory=list)
    row_attrs: list[dict[str, str]] = field(default_factory=list)

    def values(self, column: str) -> list[float | None]:
        found = [r.get(column, ({}, ""))[0].get("data-value") for r in self.rows]
        return [None if v is None else float(v) for v in found]

    def texts(self, column: str) -> list[str]:
        return [r[column][1] for r in self.rows]


class Page(HTMLParser):
    """Sections, tables (cells by data-col), charts (their Vega-Lite specs) and images."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.tables: list[Table] = []
        self.charts: dict[str, dict[str, Any]] = {}  # id -> figure attrs and "spec"
        self.images: list[dict[str, str]] = []
        self.scripts = 0
        self._table: Table | None = None
        self._cell: dict[str, str] | None = None
        self._row: dict[str, tuple[dict[str, str], str]] | None = None
        self._text: list[str] = []
        self._figure: dict[str, Any] | None = None
        self._spec: list[str] | None = None
        self._card: dict[str, str] = {}
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self.sections.append(a["id"])
        elif tag == "table":
            self._table = Table(a)
            self.tables.append(self._table)
        elif tag in ("thead", "tbody"):
            self._in_body = tag == "tbody"
        elif tag == "tr" and self._in_body and self._table is not None:
            self._row = {}
            self._table.row_attrs.append(a)
        elif tag in ("td", "th") and "data-col" in a:
            self._cell, self._text = a, []
        elif tag == "figure" and "data-chart" in a:
            self._figure = dict(a)
            self.charts[a["data-chart"]] = self._figure
        elif tag == "script":
            self.scripts += 1
            self._spec = [] if "vl-spec" in a.get("class", "") else None
        elif tag == "div" and "trial-examples" in a.get("class", ""):
            self._card = a
        elif tag == "img":
            self.images.append(a | {"trial": self._card.get("data-trial", "")})

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            text = " ".join("".join(self._text).split())
            if tag == "th":
                self._table.header.append(self._cell["data-col"])
            elif self._row is not None:
                self._row[self._cell["data-col"]] = (self._cell, text)
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self._table.rows.append(self._row)
            self._row = None
        elif tag == "script" and self._spec is not None and self._figure is not None:
            self._figure["spec"] = json.loads("".join(self._spec))
            self._spec = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._text.append(data)
        if self._spec is not None:
            self._spec.append(data)

    def table(self, name: str, **attrs: str) -> list[Table]:
        return [
            t
            for t in self.tables
            if t.attrs.get("data-table") == name
            and all(t.attrs.get(f"data-{k}") == v for k, v in attrs.items())
        ]


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


# --------------------------------------------------------------------------- expectations


def ok_trials(run: results.Results) -> pd.DataFrame:
    return run.trials[run.trials["status"] == "ok"]


def repeats(run: results.Results) -> list[list[str]]:
    """The ok trials of each (model, weight decay) in grid order: the fixtures' repeats."""
    trials = ok_trials(run)
    keys = [(m, tuple(w)) for m, w in zip(trials["model"], trials["weight_decay"], strict=True)]
    groups: dict[Any, list[str]] = {}
    for key, trial in zip(keys, trials["trial_id"], strict=True):
        groups.setdefault(key, []).append(trial)
    return list(groups.values())


def configs_in_order(loaded: list[results.Results]) -> list[tuple[int, list[str]]]:
    return [(i, group) for i, run in enumerate(loaded) for group in repeats(run)]


# --------------------------------------------------------------------------- Table 1


def test_table1_has_one_row_per_configuration_with_means_over_seeds(
    page: Page, loaded: list[results.Results]
) -> None:
    (table,) = page.table("table1")
    groups = configs_in_order(loaded)
    assert len(table.rows) == len(groups) == 5  # 2 in A, 3 in B (one with its repeat failed)
    for row, (sweep, group) in zip(table.rows, groups, strict=True):
        trials = loaded[sweep].trials.set_index("trial_id").loc[group]
        attrs, _ = row["test_error"]
        assert float(attrs["data-value"]) == pytest.approx(trials["test_error"].mean())
        assert row["seeds"][1] == str(len(group))
        seeds = list(trials["test_error"])
        # A test error is a share of the n_test test examples: its interval is over seeds and
        # examples (advlab.stats), with one seed too; of one or two seeds it holds their range.
        lo, hi = float(attrs["data-lo"]), float(attrs["data-hi"])
        assert attrs["data-method"] == RATE_METHOD
        expected = estimate(seeds, trials["n_test"])
        assert (lo, hi) == (expected.lo, expected.hi)
        assert 0.0 <= lo <= min(seeds) and max(seeds) <= hi <= 1.0
        assert f"[{100 * lo:.1f}%, {100 * hi:.1f}%]" in row["test_error"][1]
        if len(group) > 1:  # repeats: every seed shown
            assert len(group) == 2
            assert json.loads(attrs["data-values"]) == pytest.approx(seeds)
            shown = ", ".join(f"{100 * v:.1f}%" for v in seeds)
            assert f"seeds: {shown}" in row["test_error"][1]
        else:
            assert "data-values" not in attrs and "seeds:" not in row["test_error"][1]
    assert table.texts("model") == ["fc10", "fc16-10", "fc16-10", "fc10", "fc16-10"]
    assert table.texts("weight_decay") == ["0.0001", "0.0001", "0.001, 0.0001", "0", "0.001"]
    rates = [k for k in table.header if k.endswith("_error") or "success" in k]
    bounds = [float(r[k][0][b]) for r in table.rows for k in rates for b in ("data-lo", "data-hi")
              if b in r.get(k, ({}, ""))[0]]  # fmt: skip
    assert bounds and all(0.0 <= b <= 1.0 for b in bounds)  # every rate's interval in [0, 1]


def test_the_page_names_its_interval_method(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    assert "for rates whose count of examples is stored, the\n95% two-level bootstrap" in text
    assert "for every other value, the 95% percentile bootstrap over seeds" in text


def test_table1_tells_two_lbfgs_setups_apart_and_learns_kinds_and_norms_from_the_data(
    page: Page, loaded: list[results.Results]
) -> None:
    (table,) = page.table("table1")
    a_setup, b_setup = "lbfgs (max_iter=10)", "lbfgs (max_iter=20)"
    assert f"{a_setup}|dist" in table.header and f"{b_setup}|dist" in table.header
    assert "lbfgs|dist" not in table.header  # never one column for two setups
    groups = configs_in_order(loaded)
    for row, (sweep, group) in zip(table.rows, groups, strict=True):
        attacks = loaded[sweep].attacks.set_index("trial_id").loc[group].reset_index()
        lbfgs = attacks[attacks["attack"] == "lbfgs"]
        mine, other = (a_setup, b_setup) if sweep == 0 else (b_setup, a_setup)
        assert float(row[f"{mine}|dist"][0]["data-value"]) == pytest.approx(
            lbfgs["mean_dist_rms"].mean()
        )
        assert row[f"{other}|dist"][1] == ""
        fgsm = attacks[(attacks["attack"] == "fgsm") & (attacks["budget"] == 0.05)]
        assert float(row["fgsm|success@0.05"][0]["data-value"]) == pytest.approx(
            fgsm["success_rate"].mean()
        )
        toy = attacks[attacks["attack"] == TOY]  # the registry said: minimisation, in L2
        if sweep == 1:
            value = float(row[f"{TOY}|dist"][0]["data-value"])
            assert value == pytest.approx(toy["mean_dist_l2"].mean())
    assert f"{TOY}|success@0.05" not in table.header  # a minimisation attack: no budget columns


def test_attack_variants_are_named_by_the_settings_that_differ() -> None:
    from advlab.report.load import with_variants

    setups = [("pgd-small", "pgd", {"steps": 40}), ("pgd-big", "pgd", {"steps": 40}),
              ("lbfgs", "lbfgs", {"max_iter": 10, "loss": "ce"}),
              ("lbfgs", "lbfgs", {"max_iter": 20, "loss": "ce"}),
              ("lbfgs", "lbfgs", {"max_iter": 10, "loss": "ce"})]  # fmt: skip
    attacks = pd.DataFrame(
        [{"attack": a, "method": m, "norm": "linf", "target": "untargeted",
          "settings": json.dumps(s)} for a, m, s in setups]
    )  # fmt: skip
    assert list(with_variants(attacks)["variant"]) == [
        "pgd-small", "pgd-big", "lbfgs (max_iter=10)", "lbfgs (max_iter=20)",
        "lbfgs (max_iter=10)",
    ]  # fmt: skip


def test_header_lists_what_differs_between_the_sweeps(page: Page) -> None:
    (table,) = page.table("differences")
    rows = {r["setting"][1]: (r["tiny-a"][1], r["tiny-b"][1]) for r in table.rows}
    assert rows["activation"] == ("sigmoid", "relu")
    assert rows["train.epochs"] == ("2", "3")  # A's came from `--set train.epochs=2`
    assert rows["attack lbfgs.max_iter"] == ("10", "20")
    assert rows[f"attack {TOY}"][0] == "—"
    assert "steps=8" in rows[f"attack {TOY}"][1] and "norm=l2" in rows[f"attack {TOY}"][1]
    assert rows["seed"] == ("0, 1", "0, 1")
    assert rows["sweep.transfer.noise_stddev"] == ("[0.3]", "[]")
    for same in ("dataset.name", "subset", "attack fgsm.norm", "train.optimizer"):
        assert same not in rows
    varies = {r["setting"][1] for r in table.rows if "varies" in r["tiny-b"][0].get("class", "")}
    assert {"model", "weight_decay", "seed"} <= varies


def test_failed_trials_are_listed_with_their_reason(page: Page, loaded: list[results.Results]):
    (table,) = page.table("failed")
    failed = loaded[1].trials[loaded[1].trials["status"] == "failed"]
    assert table.texts("trial_id") == list(failed["trial_id"])
    assert table.texts("reason") == [f"RuntimeError: {FAILURE}"]
    assert table.texts("trial") == list(failed["label"])


# --------------------------------------------------------------------------- charts


def chart_points(
    drawn: Drawn, page: Page, layer: str = "points", **attrs: str
) -> list[dict[str, Any]]:
    (chart,) = [
        c for c in page.charts.values() if all(c.get(f"data-{k}") == v for k, v in attrs.items())
    ]
    return getattr(drawn, layer)[chart["data-chart"]]


def by_config(points: list[dict[str, Any]], x: str) -> dict[str, dict[float, dict[str, Any]]]:
    out: dict[str, dict[float, dict[str, Any]]] = {}
    for point in points:
        out.setdefault(point["configuration"], {})[point[x]] = point
    return out


def config_names(page: Page) -> list[str]:
    (table,) = page.table("table1")
    return table.texts("configuration")


def test_robust_error_curves_start_at_the_clean_error(
    drawn: Drawn, page: Page, loaded: list[results.Results]
) -> None:
    names = config_names(page)
    for attack, norm in (("fgsm", "linf"), ("lbfgs", "rms"), (TOY, "l2")):
        points = by_config(
            chart_points(drawn, page, shows="robust-error", attack=attack, norm=norm), "budget"
        )
        for name, (sweep, group) in zip(names, configs_in_order(loaded), strict=True):
            run = loaded[sweep]
            if attack not in set(run.curves["attack"]):
                assert name not in points
                continue
            trials = run.trials.set_index("trial_id").loc[group]
            clean = (trials["n_clean_wrong"] / trials["n_scanned"]).astype(float)
            assert points[name][0.0]["mean"] == pytest.approx(clean.mean())
            curves = run.curves[
                run.curves["trial_id"].isin(group) & (run.curves["attack"] == attack)
            ]
            for budget, rows in curves.groupby("budget"):
                assert points[name][budget]["mean"] == pytest.approx(rows["robust_error"].mean())
                assert points[name][budget]["n"] == len(group)
            assert sorted(points[name]) == [0.0, *sorted(curves["budget"].unique())]
        drawn_seeds = chart_points(
            drawn, page, "seeds", shows="robust-error", attack=attack, norm=norm
        )
        for name, (sweep, group) in zip(names, configs_in_order(loaded), strict=True):
            run = loaded[sweep]
            mine_attack = run.curves["attack"] == attack
            curves = run.curves[run.curves["trial_id"].isin(group) & mine_attack]
            for budget, rows in curves.groupby("budget"):  # each seed drawn beside its mean
                mine = [
                    s["seed_value"] for s in drawn_seeds
                    if s["configuration"] == name and s["budget"] == budget
                ]  # fmt: skip
                expected = list(rows["robust_error"]) if len(group) > 1 else []
                assert sorted(mine) == pytest.approx(sorted(expected))
    (fgsm,) = [
        c
        for c in page.charts.values()
        if c.get("data-attack") == "fgsm" and c["data-shows"] == "robust-error"
    ]  # fixed budget
    x_title = fgsm["spec"]["layer"][0]["encoding"]["x"]["title"]
    assert "L∞" in x_title  # from the curves table's norm, not from the attack's name


def test_every_chart_gives_a_configuration_the_same_colour(page: Page) -> None:
    scales = []
    for chart in page.charts.values():
        for layer in chart["spec"]["layer"]:
            if "color" in layer.get("encoding", {}):
                scales.append(json.dumps(layer["encoding"]["color"]["scale"], sort_keys=True))
    # robust 3, decay 2, training 2, metrics against the 2 axes that vary 6
    assert len(page.charts) == 13 and len(set(scales)) == 1
    scale = json.loads(scales[0])
    assert scale["domain"] == config_names(page)
    assert len(set(scale["range"])) == len(scale["domain"])
    (table,) = page.table("table1")
    names = table.texts("configuration")
    assert names[0] == "tiny-a · fc10" and names[-1] == "tiny-b · fc16-10 wd=0.001"


def test_distortion_against_weight_decay(
    drawn: Drawn, page: Page, loaded: list[results.Results]
) -> None:
    points = by_config(
        chart_points(drawn, page, shows="distortion", attack="lbfgs", norm="rms"), "decay"
    )
    names = config_names(page)
    # λ: A's 1e-4, B's per-layer [1e-3, 1e-4] at its largest, B's 0 and 1e-3.
    assert [list(points[n]) for n in names] == [[1e-4], [1e-4], [1e-3], [0.0], [1e-3]]
    (zero,) = points[names[3]].values()
    assert zero["x"] == pytest.approx(1e-5)  # a decade below the smallest positive λ
    for name, (sweep, group) in zip(names, configs_in_order(loaded), strict=True):
        attacks = loaded[sweep].attacks
        mine = attacks[attacks["trial_id"].isin(group) & (attacks["attack"] == "lbfgs")]
        (point,) = points[name].values()
        assert point["mean"] == pytest.approx(mine["mean_dist_rms"].mean())


def test_training_curves_are_means_over_seeds_per_epoch(
    drawn: Drawn, page: Page, loaded: list[results.Results]
) -> None:
    points = by_config(chart_points(drawn, page, shows="training", metric="test_error"), "epoch")
    for name, (sweep, group) in zip(config_names(page), configs_in_order(loaded), strict=True):
        epochs = loaded[sweep].epochs
        mine = epochs[epochs["trial_id"].isin(group)].groupby("epoch")["test_error"].mean()
        assert {e: p["mean"] for e, p in points[name].items()} == pytest.approx(mine.to_dict())


def test_filters_and_legend_chips_hide_configurations_everywhere(drawn: Drawn, page: Page):
    (table,) = page.table("table1")
    keys = [attrs["data-config"] for attrs in table.row_attrs]
    b_keys = [k for k in keys if k.startswith("tiny-b:")]
    assert drawn.filtered["rows"] == b_keys
    for shown in drawn.filtered["points"].values():
        assert set(shown) <= set(b_keys) and shown
    hidden = drawn.chipped["key"]
    assert hidden == keys[0] and drawn.chipped["rows"] == keys[1:]
    assert all(hidden not in shown for shown in drawn.chipped["points"].values())


# --------------------------------------------------------------------------- the rest


def decode(uri: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :]))))


def test_examples_show_original_adversarial_and_magnified_perturbation(
    page: Page, loaded: list[results.Results]
) -> None:
    x_test = load_dataset("digits").x_test.numpy()
    firsts = [group[0] for _, group in configs_in_order(loaded)]
    assert list(dict.fromkeys(img["trial"] for img in page.images)) == firsts
    for trial in firsts:
        run = next(r for r in loaded if trial in set(r.trials["trial_id"]))
        examples = run.examples(images=True)
        mine = examples[(examples["trial_id"] == trial) & (examples["attack"] == "lbfgs")]
        mine = mine.sort_values("example")
        chosen = pd.concat([mine[mine["success"]], mine[~mine["success"]]]).head(3)
        shown = [img for img in page.images if img["trial"] == trial]
        kinds = ["original", "adversarial", "perturbation ×10"]
        assert [img["data-kind"] for img in shown] == kinds * len(chosen)
        for number, row in enumerate(chosen.to_dict("records")):
            original, adversarial, perturbation = (
                decode(img["src"]) for img in shown[3 * number : 3 * number + 3]
            )
            scale = original.shape[0] // 8
            assert original.shape == (8 * scale, 8 * scale) and scale > 1
            clean = x_test[row["dataset_index"], 0]
            adv = np.asarray(row["x_adv"], dtype=np.float32).reshape(8, 8)
            for image, value in (
                (original, clean),
                (adversarial, adv),
                (perturbation, np.clip(0.5 + 10 * (adv - clean), 0, 1)),
            ):
                np.testing.assert_allclose(image[::scale, ::scale] / 255, value, atol=0.6 / 255)


def test_transfer_is_the_papers_table2_with_labels(page: Page, loaded: list[results.Results]):
    run = loaded[0]
    transfer = run.transfer[run.transfer["status"] == "ok"]
    ids = list(run.trials["trial_id"])
    labels = run.labels
    noise = transfer[(transfer["source_trial"] == NOISE_SOURCE) & (transfer["kind"] == "noise")]
    for attack, budget in (("lbfgs", ""), ("fgsm", "0.05"), ("fgsm", "0.1")):
        (table,) = page.table("transfer", sweep="tiny-a", attack=attack, budget=budget,
                              kind="adversarial")  # fmt: skip
        targets = [*ids, "constant", "knn"]
        assert table.header == ["source", *targets, "rms"]
        assert table.texts("source") == [labels[t] for t in ids] + ["Gaussian noise σ = 0.3"]
        wanted = transfer[(transfer["attack"] == attack) & (transfer["kind"] == "adversarial")]
        if budget:
            wanted = wanted[wanted["budget"] == float(budget)]
        for row, source in zip(table.rows, ids, strict=False):
            for target in targets:
                (value,) = wanted.loc[
                    (wanted["source_trial"] == source) & (wanted["target"] == target), "error_adv"
                ]
                assert float(row[target][0]["data-value"]) == pytest.approx(value)
                assert ("diag" in row[target][0]["class"]) == (source == target)
        for target in targets:
            (value,) = noise.loc[noise["target"] == target, "error_adv"]
            assert float(table.rows[-1][target][0]["data-value"]) == pytest.approx(value)
    assert page.table("transfer", sweep="tiny-b") == []  # B has no transfer stage
    kinds = {
        (t.attrs["data-kind"], t.attrs["data-amplified_to"])
        for t in page.table("transfer", sweep="tiny-a")
    }
    assert kinds == {("adversarial", ""), ("noise", ""), ("amplified", "0.1")}


def test_lipschitz_bounds_per_configuration_in_layer_order(
    page: Page, loaded: list[results.Results]
) -> None:
    # The paper's Table 5: a row per configuration, a column per layer (path and kind) in
    # forward order, the network's bound last.
    (table,) = page.table("measure-lipschitz", measure="lipschitz")
    layers = table.header[2:]
    assert table.header[:2] == ["configuration", "n"] and layers[-1] == "network|network|bound"
    assert layers.index("1|linear|bound") < layers.index("3|linear|bound")
    for row, (sweep, group) in zip(table.rows, configs_in_order(loaded), strict=True):
        bounds = loaded[sweep].lipschitz
        mine = bounds[bounds["trial_id"].isin(group) & (bounds["layer"] == "network")]
        assert float(row["network|network|bound"][0]["data-value"]) == pytest.approx(
            mine["bound"].mean()
        )
        assert row["n"][1] == str(len(mine))  # one bound per seed


@needs_chromium
def test_page_runs_offline_without_errors_and_every_section_renders(
    drawn: Drawn, page: Page
) -> None:
    assert drawn.problems == []
    assert [u for u in drawn.requests if not u.startswith(("file://", "data:"))] == []
    assert sum(u.startswith("file://") for u in drawn.requests) == 1  # the page itself
    assert drawn.charts == str(len(page.charts))
    assert drawn.sections == page.sections == [
        "sweeps", "table1", "failed", "axes", "robust", "distortion", "training", "examples",
        "transfer", "measures",
    ]  # fmt: skip
    for shot in drawn.screenshots:
        with Image.open(shot) as image:
            assert image.width > 600 and image.height > 100
            colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
            assert colours is not None and len(colours) > 20, shot.name  # not a blank box


def test_sections_without_data_are_left_out(sweeps: list[str], tmp_path: Path) -> None:
    only_b = parse(build_report([sweeps[1]], str(tmp_path / "b.html")))
    assert "transfer" not in only_b.sections and "examples" in only_b.sections
    assert only_b.table("differences")  # within one sweep: what its trials vary
    # A sweep that has started but finished nothing: only its trials without a result.
    store = SweepStore(str(tmp_path / "results"), "fresh")
    store.write_manifest(
        {
            "name": "fresh",
            "versions": [{"version": 1, "trial_ids": ["abc123"], "axes": [], "definition": {}}],
            "trials": {"abc123": {"version": 1, "index": 0, "model": "fc10", "values": {}}},
        }
    )
    fresh = parse(build_report([store.uri], str(tmp_path / "f.html")))
    assert fresh.sections == ["sweeps", "failed"]
    (table,) = fresh.table("failed")
    assert table.texts("trial_id") == ["abc123"] and table.texts("status") == ["no result"]


def test_a_folder_without_results_is_one_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match="no advlab results here"):
        build_report([str(tmp_path / "nothing")], str(tmp_path / "r.html"))
    assert main(["report", str(tmp_path / "nothing"), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("advlab: error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def test_command_line_writes_the_report(sweeps: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.html"
    assert main(["report", *sweeps, "-o", str(out)]) == 0
    assert f"report written to {out}" in capsys.readouterr().out
    assert parse(out).table("table1")


def _set_flags(folder: Path, raised: dict[tuple[str, str], str]) -> None:
    """Rewrite the `flag` of every measure run's record in a sweep folder: `raised[(trial,
    measure)]`, or none."""
    for path in sorted((folder / "measures").glob("*.parquet")):
        data = pq.read_table(path)
        keys = zip(data["trial_id"].to_pylist(), data["measure"].to_pylist(), strict=True)
        column = data.schema.get_field_index("flag")
        values = pa.array([raised.get(key, "") for key in keys], pa.string())
        pq.write_table(data.set_column(column, data.schema.field("flag"), values), path)


def test_flags_column_only_when_a_measure_can_flag(
    sweeps: list[str], page: Page, tmp_path: Path
) -> None:
    (table,) = page.table("table1")
    # The masking and health checks ran on every trial: each could have raised a flag.
    assert "flags" in table.header and "masking" not in table.header
    copy = tmp_path / "results" / "tiny-b"
    shutil.copytree(sweeps[1], copy)
    first = results.load(str(copy)).trials["trial_id"].iloc[0]  # the first seed of row 1
    # Flags come from the measures table (as W&B and the sweep's summary see them): give the
    # first trial a masking and a health flag, and no other trial any.
    raised = {(first, "masking"): "gradient norm vanishes", (first, "health"): "model at chance"}
    _set_flags(copy, raised)
    flagged = parse(build_report([str(copy)], str(tmp_path / "m.html")))
    (table,) = flagged.table("table1")
    texts = table.texts("flags")
    assert texts == ["⚠ health (1 of 2), masking (1 of 2)", "no", "no"]
    hover = table.rows[0]["flags"][0]["title"]
    assert hover == "health: model at chance | masking: gradient norm vanishes"
    # With no measure there that defines a flag (only Lipschitz bounds), no column at all.
    for measure in ("masking", "health"):
        shutil.rmtree(copy / measure)
        for path in (copy / "measures").glob(f"*.measure.{measure}.parquet"):
            path.unlink()
    bare = parse(build_report([str(copy)], str(tmp_path / "b.html")))
    (table,) = bare.table("table1")
    assert "flags" not in table.header


def test_results_examples_keep_the_true_class_beside_the_trial_label(
    loaded: list[results.Results],
) -> None:
    examples = loaded[0].examples()
    assert examples["label"].dtype.kind in "iu" or str(examples["label"].dtype) == "Int64"
    assert set(examples["trial_label"]) == set(loaded[0].trials["label"])


@needs_chromium
def test_wide_grids_fit_the_window(drawn: Drawn, page: Page) -> None:
    """Table 1 does not scroll sideways at 1400 px; the transfer section shows one matrix per
    attack (other budgets and the noise and amplified rows fold out), so it stays short."""
    assert drawn.layout["window"] == 1400
    assert drawn.layout["table1"] <= drawn.layout["room"], drawn.layout
    # sweep A: two attacks -> two open matrices (4 trials and a noise row under rotated
    # column heads, about 450 px each); with every budget open it drew 3 of them
    assert drawn.layout["transfer"] < 1_200, drawn.layout


@needs_chromium
def test_a_metric_against_each_varying_axis_with_every_seed(
    drawn: Drawn, page: Page, loaded: list[results.Results]
) -> None:
    charts = [c for c in page.charts.values() if c["data-shows"] == "metric-by-axis"]
    axes = {c["data-axis"] for c in charts}
    assert {"model", "weight_decay"} <= axes
    trials = pd.concat([r.trials for r in loaded])
    ok = trials[trials["status"] == "ok"]
    for chart in charts:
        if chart["data-metric"] != "test_error":
            continue
        means = drawn.points[chart["data-chart"]]
        seeds = drawn.seeds[chart["data-chart"]]
        assert sum(p["n"] for p in means) == len(ok)  # every ok trial in one mean
        # each seed of a repeated configuration is its own point, with its own value
        repeated = sorted(v for p in means if p["n"] > 1 for v in p["values"])
        assert sorted(p["seed_value"] for p in seeds) == pytest.approx(repeated)
        for point in means:
            assert point["mean"] == pytest.approx(sum(point["values"]) / point["n"])
