"""The HTML report, built from two real (tiny) sweeps run without Ray, parsed and rendered."""

from __future__ import annotations

import base64
import io
import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_sweep
from PIL import Image

import advlab.trial
from advlab.data import load_dataset
from advlab.report import (
    build_report,
    decay_for_plot,
    decay_text,
    decay_values,
    image_shape,
    nice_ticks,
)
from advlab.store import SweepStore
from advlab.sweep import sweep_record  # imports Ray only when a sweep runs
from advlab.sweepfile import parse_sweep
from advlab.transfer import NOISE_SOURCE
from advlab.trial import TrialContext, run_trial

CHROMIUM = Path("/usr/bin/chromium")
FAILURE = "RuntimeError: injected failure for the report test"
# Small on purpose: five trials train and attack in a few seconds in all.
FAST = {
    "train": {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 0.01},
    "attack_examples": 6,
    "attacks": [{"name": "fgsm"}, {"name": "lbfgs", "max_iter": 10, "search_steps": 4}],
}


# --------------------------------------------------------------------------- fixtures


def run_sweep_without_ray(raw: dict[str, Any], storage: Path, fail_last: bool = False) -> str:
    """Run every grid point in this process, as sweep.py would, and record sweep.json too."""
    spec = parse_sweep(raw)
    store = SweepStore(str(storage), spec.name)
    store.write_json("sweep.json", sweep_record(spec))
    for i, trial in enumerate(spec.trials):
        ctx = TrialContext(
            sweep=spec.name,
            storage=str(storage),
            trial_index=i,
            grid_values=spec.grid_values(trial),
            wandb_mode="disabled",
        )
        if fail_last and i == len(spec.trials) - 1:
            with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError):
                patch.setattr(advlab.trial, "train_model", _fail)
                run_trial(trial, ctx)
        else:
            run_trial(trial, ctx)
    return store.uri


def _fail(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError(FAILURE.split(": ", 1)[1])


def add_transfer_and_properties(sweep_dir: str) -> None:
    """The tables later stages write (transfer/, properties/), in their documented layout."""
    store = SweepStore.from_dir(sweep_dir)
    ids = list(store.read("trials")["trial_id"])
    rows = []
    for i, source in enumerate(ids):
        for j, target in enumerate([*ids, "knn"]):
            error = 1.0 if source == target else 0.1 * (i + j + 1)
            rows.append(
                {
                    "source_trial": source,
                    "attack": "lbfgs",
                    "budget": math.nan,
                    "kind": "adversarial",
                    "rms": 0.05,
                    "target": target,
                    "target_kind": "trial" if target in ids else "control",
                    "n": 6,
                    "error_adv": error,
                    "error_clean": 0.0,
                }
            )
    for stddev in (0.1, 0.3):  # the paper's Gaussian-noise control rows
        for target in [*ids, "knn"]:
            rows.append(
                {
                    "source_trial": NOISE_SOURCE,
                    "attack": "gaussian",
                    "budget": stddev,
                    "kind": "noise",
                    "rms": 0.8 * stddev,
                    "target": target,
                    "target_kind": "trial" if target in ids else "control",
                    "n": 6,
                    "error_adv": stddev / 2,
                    "error_clean": 0.0,
                }
            )
    store.write_rows("transfer", "all", rows)
    for tid in ids:
        props = [
            {"trial_id": tid, "analysis": "lipschitz", "layer": name, "metric": "upper_bound"}
            | {"value": value}
            for name, value in (("fc1", 2.75), ("fc2", 4.0), ("network", 11.0))
        ]
        store.write_rows("properties", tid, props)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two sweeps: A (a grid of two models, with transfer and properties tables), B (cases with
    per-layer and zero weight decay, one failed trial, no transfer table)."""
    storage = tmp_path_factory.mktemp("report") / "results"
    a = run_sweep_without_ray(tiny_sweep(name="tiny-a", **FAST), storage)
    b_cases = [
        {"model": "fc16-10", "weight_decay": [1.0e-3, 1.0e-4]},
        {"model": "fc10", "weight_decay": 0.0},
        {"model": "fc16-10", "weight_decay": 1.0e-3},
    ]
    b_raw = tiny_sweep(name="tiny-b", cases=b_cases, grid={"seed": [0]}, **FAST)
    b = run_sweep_without_ray(b_raw, storage, fail_last=True)
    add_transfer_and_properties(a)
    return [a, b]


@pytest.fixture(scope="module")
def report(sweeps: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_report(sweeps, str(tmp_path_factory.mktemp("out") / "sub" / "report.html"))


@pytest.fixture(scope="module")
def page(report: Path) -> Page:
    parsed = Page()
    parsed.feed(report.read_text(encoding="utf-8"))
    return parsed


def read(sweep_dir: str, table: str) -> pd.DataFrame:
    return SweepStore.from_dir(sweep_dir).read(table)


# --------------------------------------------------------------------------- html parsing


@dataclass
class Table:
    attrs: dict[str, str]
    header: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)  # data-col -> text
    row_attrs: list[dict[str, str]] = field(default_factory=list)
    cells: list[list[tuple[dict[str, str], str]]] = field(default_factory=list)


@dataclass
class Figure:
    attrs: dict[str, str]
    series: list[str] = field(default_factory=list)
    points: list[tuple[str, float, float]] = field(default_factory=list)  # series, x, y
    legend: list[str] = field(default_factory=list)


class Page(HTMLParser):
    """Just enough structure for the assertions: sections, tables, figures, images."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.tables: list[Table] = []
        self.figures: list[Figure] = []
        self.images: list[dict[str, str]] = []
        self.text: list[str] = []
        self._table: Table | None = None
        self._cell: dict[str, str] | None = None
        self._buffer: list[str] = []
        self._figure: Figure | None = None
        self._series: str | None = None
        self._legend = False
        self._legend_text = False
        self._in_body = False
        self._examples: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self.sections.append(a["id"])
        elif tag == "table":
            self._table = Table(a)
            self.tables.append(self._table)
        elif tag == "tbody":
            self._in_body = True
        elif tag == "text" and self._legend:
            self._legend_text = True
        elif tag == "tr" and self._table is not None:
            self._table.row_attrs.append(a)
            self._table.cells.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell, self._buffer = a, []
        elif tag == "figure" and "data-figure" in a:
            self._figure = Figure(a)
            self.figures.append(self._figure)
        elif tag == "g" and self._figure is not None:
            if a.get("class") == "series":
                self._series = a["data-label"]
                self._figure.series.append(self._series)
            self._legend = a.get("class") == "legend"
        elif tag == "circle" and self._figure is not None and self._series and "data-x" in a:
            self._figure.points.append((self._series, float(a["data-x"]), float(a["data-y"])))
        elif tag == "div" and "trial-examples" in a.get("class", ""):
            self._examples = a
        elif tag == "img":
            self.images.append(a | {"trial": self._examples.get("data-trial", "")})

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._table is not None and self._cell is not None:
            text = "".join(self._buffer).strip()
            self._table.cells[-1].append((self._cell, text))
            if "data-col" in self._cell and tag == "th":
                self._table.header.append(self._cell["data-col"])
            self._cell = None
        elif tag == "tr" and self._table is not None:
            cells = self._table.cells[-1]
            if self._in_body and all("data-col" in attrs for attrs, _ in cells):
                self._table.rows.append({c["data-col"]: t for c, t in cells})
        elif tag == "table":
            self._table, self._in_body = None, False
        elif tag == "figure":
            self._figure = None
        elif tag == "g":
            self._series = None if not self._legend else self._series
            self._legend = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._buffer.append(data)
        if self._legend_text and self._figure is not None:
            self._figure.legend.append(data)
            self._legend_text = False  # the rest is the <title> tooltip

    def table(self, name: str, **attrs: str) -> list[Table]:
        want = {f"data-{k}": v for k, v in attrs.items()}
        return [
            t
            for t in self.tables
            if t.attrs.get("data-table") == name and want.items() <= t.attrs.items()
        ]

    def figs(self, name: str, **attrs: str) -> list[Figure]:
        want = {f"data-{k}": v for k, v in attrs.items()}
        return [
            f
            for f in self.figures
            if f.attrs["data-figure"] == name and want.items() <= f.attrs.items()
        ]


def pct(value: float) -> str:
    return f"{100 * value:.2f}%"


# --------------------------------------------------------------------------- unit helpers


def test_weight_decay_is_a_float_or_a_json_list_per_layer() -> None:
    assert decay_values(1e-4) == [1e-4]
    assert decay_values("[1e-05, 1e-06]") == [1e-5, 1e-6]
    assert decay_values(None) == [] and decay_values(math.nan) == []
    assert decay_for_plot("[1e-05, 0.001, 1e-06]") == 1e-3  # the largest lambda
    assert decay_text("[1e-05, 1e-06]") == "[1e-05, 1e-06]"
    assert decay_text(0.0001) == "0.0001"


def test_image_shapes_follow_the_vector_length() -> None:
    assert image_shape(64) == (1, 8, 8)
    assert image_shape(784) == (1, 28, 28)
    assert image_shape(3072) == (3, 32, 32)
    with pytest.raises(ValueError):
        image_shape(100 * 3 + 1)


def test_nice_ticks_cover_the_range() -> None:
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = nice_ticks(0.0, 0.23)
    assert ticks[0] == 0.0 and ticks[-1] >= 0.23 and len(ticks) <= 7
    assert nice_ticks(0, 2, integer=True) == [0, 1, 2]
    assert nice_ticks(0, 50, integer=True) == [0, 10, 20, 30, 40, 50]


def test_a_folder_without_results_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no advlab results"):
        build_report([str(tmp_path / "nothing")], str(tmp_path / "r.html"))


# --------------------------------------------------------------------------- the page


def test_every_section_with_data_is_rendered(report: Path, page: Page) -> None:
    assert report.name == "report.html" and report.is_file()
    assert page.sections == [
        "sweeps",
        "table1",
        "robust",
        "distortion",
        "training",
        "examples",
        "transfer",
        "properties",
    ]
    html = report.read_text(encoding="utf-8")
    # Self-contained: nothing fetched from anywhere, no script at all.
    assert "<script" not in html
    assert not re.search(r"""(src|href)=["'](https?:)?//""", html)
    assert "<link" not in html


def test_overview_counts_ok_and_failed_trials(sweeps: list[str], page: Page) -> None:
    (table,) = page.table("sweeps")
    rows = {r["sweep"]: r for r in table.rows}
    assert set(rows) == {"tiny-a", "tiny-b"}
    assert (rows["tiny-a"]["ok"], rows["tiny-a"]["failed"]) == ("2", "0")
    assert (rows["tiny-b"]["ok"], rows["tiny-b"]["failed"]) == ("2", "1")
    assert rows["tiny-b"]["missing"] == "0"


def test_table1_matches_the_trials_parquet(sweeps: list[str], page: Page) -> None:
    (table,) = page.table("table1")
    trials = pd.concat([read(s, "trials") for s in sweeps], ignore_index=True)
    assert len(table.rows) == len(trials) == 5
    assert {"sweep", "model", "weight_decay", "subset", "seed", "status"} <= set(table.header)
    assert {"train_error", "test_error", "heldout_error", "lbfgs/mean_dist_rms"} <= set(
        table.header
    )
    assert {"lbfgs/success_rate", "fgsm/success@0.05", "fgsm/success@0.1"} <= set(table.header)
    by_id = {(r["sweep"], r["trial_id"]): r for r in table.rows}
    for row in trials.to_dict("records"):
        shown = by_id[(row["sweep"], row["trial_id"][:10])]
        assert shown["model"] == row["model"]
        assert shown["status"] == row["status"]
        if row["status"] != "ok":
            assert shown["test_error"] == "–"
            continue
        assert shown["test_error"] == pct(row["test_error"])
        assert shown["train_error"] == pct(row["train_error"])
        assert shown["lbfgs/mean_dist_rms"] == f"{row['lbfgs/mean_dist_rms']:.3g}"
        assert shown["fgsm/success@0.1"] == pct(row["fgsm/success@0.1"])
    decays = sorted(r["weight_decay"] for r in table.rows if r["sweep"] == "tiny-b")
    assert decays == ["0", "0.001", "[0.001, 0.0001]"]


def test_failed_trials_are_listed_with_their_reason(sweeps: list[str], page: Page) -> None:
    (table,) = page.table("failed")
    assert [(r["sweep"], r["reason"]) for r in table.rows] == [("tiny-b", FAILURE)]
    trials = read(sweeps[1], "trials")
    failed = trials.loc[trials["status"] == "failed", "trial_id"].item()
    assert table.rows[0]["trial_id"] == failed[:10]


def test_robust_error_charts_hold_every_curve_point(sweeps: list[str], page: Page) -> None:
    for sweep in sweeps:
        name = sweep.rsplit("/", 1)[1]
        curves = read(sweep, "curves")
        figures = page.figs("robust-error", sweep=name)
        assert sorted(f.attrs["data-attack"] for f in figures) == sorted(set(curves["attack"]))
        for fig in figures:
            rows = curves[curves["attack"] == fig.attrs["data-attack"]]
            assert len(fig.series) == rows["trial_id"].nunique()  # one line per trial
            assert fig.legend == fig.series
            got = sorted((x, y) for _, x, y in fig.points)
            want = sorted(zip(rows["budget"], rows["robust_error"], strict=True))
            np.testing.assert_allclose(got, want)
    fig = page.figs("robust-error", sweep="tiny-a", attack="lbfgs")[0]
    assert "rms distortion" in "".join(page.text)
    assert fig.series == ["fc10", "fc16-10"]


def test_distortion_against_decay_uses_the_largest_per_layer_lambda(
    sweeps: list[str], page: Page
) -> None:
    (fig,) = page.figs("distortion-decay", sweep="tiny-b", attack="lbfgs")
    trials = read(sweeps[1], "trials")
    ok = trials[trials["status"] == "ok"]
    xs = sorted({x for _, x, _ in fig.points})
    # Two ok trials: [1e-3, 1e-4] (plotted at 1e-3) and 0 (drawn a decade below 1e-3).
    assert xs == pytest.approx([1e-4, 1e-3])
    ys = sorted({y for _, _, y in fig.points})
    np.testing.assert_allclose(ys, sorted(ok["lbfgs/mean_dist_rms"]))
    assert "plotted at its largest λ" in "".join(page.text)
    assert len(page.figs("distortion-decay", sweep="tiny-a")) == 1


def test_training_curves_hold_every_epoch(sweeps: list[str], page: Page) -> None:
    for sweep in sweeps:
        epochs = read(sweep, "epochs")
        (fig,) = page.figs("training", sweep=sweep.rsplit("/", 1)[1])
        assert len(fig.series) == epochs["trial_id"].nunique()
        got = sorted((x, y) for _, x, y in fig.points)
        np.testing.assert_allclose(
            got, sorted(zip(epochs["epoch"], epochs["test_error"], strict=True))
        )


def decode(uri: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :]))))


def test_example_grids_show_original_adversarial_and_magnified_perturbation(
    sweeps: list[str], page: Page
) -> None:
    x_test = load_dataset("digits").x_test.numpy()
    examples = pd.concat([read(s, "examples") for s in sweeps], ignore_index=True)
    lbfgs = examples[examples["attack"] == "lbfgs"]
    ok_trials = set(lbfgs["trial_id"])
    assert {img["trial"] for img in page.images} == ok_trials
    assert len(page.images) == len(ok_trials) * 3 * 3  # 3 examples x (clean, adv, perturbation)
    for trial in ok_trials:
        mine = [img for img in page.images if img["trial"] == trial]
        assert [img["data-kind"] for img in mine[:3]] == [
            "original",
            "adversarial",
            "perturbation ×10",
        ]
        first = lbfgs[lbfgs["trial_id"] == trial].sort_values("example")
        first = pd.concat([first[first["success"]], first[~first["success"]]]).iloc[0]
        original, adversarial, perturbation = (decode(img["src"]) for img in mine[:3])
        scale = original.shape[0] // 8
        assert original.shape == (8 * scale, 8 * scale) and scale > 1
        clean = x_test[first["dataset_index"], 0]
        adv = np.asarray(first["x_adv"], dtype=np.float32).reshape(8, 8)
        for shown, value in (
            (original, clean),
            (adversarial, adv),
            (perturbation, np.clip(0.5 + 10 * (adv - clean), 0, 1)),
        ):
            np.testing.assert_allclose(shown[::scale, ::scale] / 255, value, atol=1 / 255 + 1e-6)


def test_transfer_heatmap_shows_error_on_adversarial_as_percentages(
    sweeps: list[str], page: Page
) -> None:
    (table,) = page.table("transfer", sweep="tiny-a", attack="lbfgs")
    transfer = read(sweeps[0], "transfer")
    heat = [(a, t) for row in table.cells for a, t in row if "data-value" in a]
    assert len(heat) == len(transfer) == 2 * 3 + 2 * 3  # 2 trials and 2 noise rows, 3 targets
    for attrs, text in heat:
        value = float(attrs["data-value"])
        assert text == pct(value)
        assert "background:rgb(" in attrs["style"]
    diagonal = [t for a, t in heat if "diag" in a["class"]]
    assert diagonal == ["100.00%", "100.00%"]
    names = [cells[0][1] for cells in table.cells[1:]]
    assert names[2:] == [f"{NOISE_SOURCE} · budget=0.1", f"{NOISE_SOURCE} · budget=0.3"]
    noise = [t for cells in table.cells[3:] for a, t in cells if "data-value" in a]
    assert noise == ["5.00%"] * 3 + ["15.00%"] * 3
    assert page.table("transfer", sweep="tiny-b") == []


def test_lipschitz_bounds_table_per_layer_per_trial(sweeps: list[str], page: Page) -> None:
    (table,) = page.table("properties-lipschitz")
    rows = [r for r in table.rows if r["sweep"] == "tiny-a"]
    assert sorted(r["trial_id"] for r in rows) == sorted(read(sweeps[0], "trials")["trial_id"])
    columns = [c for c in table.header if "|" in c]
    assert columns.index("fc1|upper_bound") < columns.index("fc2|upper_bound")
    assert columns[-1] == "network|upper_bound"  # the whole-network product last
    assert {r["fc1|upper_bound"] for r in rows} == {"2.75"}
    assert {r["network|upper_bound"] for r in rows} == {"11"}


def test_sections_without_data_are_left_out(sweeps: list[str], tmp_path: Path) -> None:
    html = build_report([sweeps[1]], str(tmp_path / "b.html")).read_text(encoding="utf-8")
    assert 'id="table1"' in html and 'id="examples"' in html
    assert 'id="transfer"' not in html
    assert ('id="properties"' in html) == (not read(sweeps[1], "properties").empty)
    # A sweep that has started but finished nothing: only its missing trials.
    store = SweepStore(str(tmp_path / "results"), "fresh")
    store.write_json("sweep.json", {"name": "fresh", "grid": {}, "trial_ids": ["abc123"]})
    page = Page()
    page.feed(build_report([store.uri], str(tmp_path / "f.html")).read_text(encoding="utf-8"))
    assert page.sections == ["sweeps", "table1"]
    assert page.table("failed")[0].rows[0]["trial_id"] == "abc123"


# --------------------------------------------------------------------------- in a browser


def chromium(report: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",  # tests run as root in CI containers
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
        report.resolve().as_uri(),
    ]
    env = os.environ | {"DBUS_SESSION_BUS_ADDRESS": "disabled:"}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
)
def test_page_renders_in_headless_chromium(report: Path, page: Page, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    result = chromium(
        report,
        tmp_path,
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={shot}",
        "--window-size=1400,3000",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    errors = [
        line
        for line in result.stderr.splitlines()
        if "Uncaught" in line or ("CONSOLE" in line and "error" in line.lower())
    ]
    assert errors == []
    image = Image.open(shot)
    assert image.size == (1400, 3000)
    colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50  # text, charts and images, not a blank page
    dom = chromium(report, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == len(page.figures)
    assert dom.stdout.count("<img") == len(page.images)
    assert dom.stdout.count("<section") == len(page.sections)
