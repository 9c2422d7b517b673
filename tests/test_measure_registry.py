"""The measure registry: a measure of your own, named by import path in a sweep file, added to
a finished sweep runs alone (no training, every earlier file untouched) and its table reads
back everywhere; bad definitions and settings are one line; a broken measure costs itself."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
import torch
import yaml
from conftest import tiny_sweep
from test_report import parse

from advlab import results
from advlab.cli import main
from advlab.families import model_for
from advlab.measures import registry
from advlab.measures.builtin import BUILTIN
from advlab.measures.registry import MeasureDef, MeasureError
from advlab.report import build_report
from advlab.sources import load_data_spec
from advlab.spec import TrialSpec
from advlab.store import SweepStore
from advlab.sweep import trial_context
from advlab.sweepfile import parse_sweep
from advlab.trial import run_trial

# A per-example measure as a user would write it beside a sweep file: the clean logit margin
# of each attacked example (true-class logit minus the largest other), with a setting.
TOY = """
import pyarrow as pa
import torch
from pydantic import Field

from advlab.measures import MeasureDef
from advlab.strict import Strict


class MarginSettings(Strict):
    scale: float = Field(1.0, gt=0)


def margins(ctx, settings):
    with torch.no_grad():
        logits = ctx.model.module(ctx.attacked.x)
    true = logits.gather(1, ctx.attacked.y[:, None]).squeeze(1)
    others = logits.scatter(1, ctx.attacked.y[:, None], float("-inf")).amax(1)
    margin = (settings.scale * (true - others)).tolist()
    return [{"example": i, "margin": m} for i, m in enumerate(margin)]


MARGIN = MeasureDef(
    name="clean_margin",
    scope="example",
    schema=pa.schema([("trial_id", pa.string()), ("example", pa.int64()),
                      ("margin", pa.float64())]),
    run=margins,
    settings=MarginSettings,
    summary="Clean logit margin of each attacked example",
    metrics=lambda rows: {"clean_margin/mean": sum(r["margin"] for r in rows) / len(rows)},
)
"""


def sweep_files(folder: Path) -> dict[Path, bytes]:
    """Every file a sweep wrote: parquet, models (in its storage root's store), W&B runs (not
    Tune's own state, the manifest it grows, the lock naming its holder, or W&B's links to its
    latest run)."""
    models = {p: p.read_bytes() for p in (folder.parent / ".models").glob("*.pt")}
    return models | {
        p: p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and p.name not in ("sweep.json", ".sweep.lock")
        and "ray" not in p.relative_to(folder).parts
    }  # fmt: skip


@pytest.mark.slow
def test_a_measure_added_to_a_finished_sweep_runs_alone_and_reads_back_everywhere(
    ray_local, tmp_path: Path
) -> None:
    (tmp_path / "toy_measures.py").write_text(TOY)
    raw = tiny_sweep(name="grow-measure", attacks=[{"name": "fgsm"}])
    raw |= {"storage": str(tmp_path / "results"), "transfer": {"enabled": False}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 0
    folder = tmp_path / "results" / "grow-measure"
    before = sweep_files(folder)
    assert any(p.suffix == ".pt" for p in before) and any(p.suffix == ".wandb" for p in before)

    raw["measures"] = [{"name": "lipschitz"}, {"name": "masking"},
                       {"name": "toy_measures:MARGIN", "scale": 2.0}]  # fmt: skip
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 0
    after = sweep_files(folder)
    assert {p: after[p] for p in before} == before  # no training, nothing rewritten
    res = results.load(str(folder))
    ids = list(res.trials["trial_id"])
    new = {str(p.relative_to(folder)) for p in after if p not in before and p.suffix == ".parquet"}
    tables = ("clean_margin", "measures")  # its rows, and the record of each run
    assert new == {f"{table}/{t}.measure.clean_margin.parquet" for t in ids for table in tables}
    assert res.trials["trained_here"].tolist() == [True, True]  # the rows of the first run

    # The values are what the stored model gives, times the setting.
    table = res.clean_margin
    for trial_id, spec_json in zip(res.trials["trial_id"], res.trials["spec"], strict=True):
        spec = TrialSpec.from_stored(spec_json)
        data = load_data_spec(spec.dataset)
        model = model_for(spec, data.input_shape, data.num_classes)
        model.load_state(SweepStore.from_dir(str(folder)).load_model(spec.training_key()))
        examples = res.examples().query("trial_id == @trial_id and attack == 'fgsm'")
        first = examples[examples["budget"] == examples["budget"].min()].sort_values("example")
        x = data.x_test[first["dataset_index"].to_numpy(int)]
        logits = model.module(x).detach().double()
        y = torch.as_tensor(first["label"].to_numpy(int))
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        mine = table[table["trial_id"] == trial_id].sort_values("example")
        np.testing.assert_allclose(mine["margin"], 2 * (true - others).numpy(), rtol=1e-6)

    # Its table is plain parquet: pandas, polars and DuckDB read the folder as it is.
    path_glob = f"{folder}/clean_margin/*.parquet"
    with_pandas = pd.read_parquet(folder / "clean_margin")
    assert list(with_pandas.columns) == ["trial_id", "example", "margin"]
    assert len(with_pandas) == len(pl.read_parquet(path_glob)) == len(table) == 2 * 12
    ((total,),) = duckdb.sql(f"SELECT sum(margin) FROM '{path_glob}'").fetchall()
    assert total == pytest.approx(table["margin"].sum())
    # And the report shows it, a row per configuration with the mean over its examples.
    page = parse(build_report([str(folder)], str(tmp_path / "report.html")))
    (shown,) = page.table("measure-clean_margin", measure="clean_margin")
    means = table.groupby("trial_id", sort=False)["margin"].mean()
    assert shown.values("margin") == pytest.approx(list(means[res.trials["trial_id"]]))


def test_definitions_that_cannot_work_are_refused_in_one_line() -> None:
    schema = pa.schema([("trial_id", pa.string()), ("value", pa.float64())])

    def run(ctx, settings):
        return []

    with pytest.raises(MeasureError, match=r"needs an? example column \(int64\) for scope example"):
        registry.register(MeasureDef("no_example", "example", schema, run))
    with pytest.raises(MeasureError, match=r"needs an? attack column \(string\) for scope attack"):
        registry.register(MeasureDef("no_attack", "attack", schema, run))
    for bad in ("a/b", "", "trials", "x" * 65, ".hidden"):
        with pytest.raises(MeasureError, match="rename it"):
            registry.register(MeasureDef(bad, "trial", schema, run))
    with pytest.raises(MeasureError, match="settings must be a subclass"):
        registry.register(MeasureDef("plain", "trial", schema, run, settings=dict))  # type: ignore[arg-type]
    taken = MeasureDef("lipschitz", "trial", schema, run)
    with pytest.raises(MeasureError, match="belongs to another measure"):
        registry.register(taken)
    assert "lipschitz" in registry.names() and registry.get("lipschitz") is not taken


@pytest.mark.parametrize(
    ("measure", "message"),
    [
        ({"name": "nope"}, "measures.0.name: unknown measure 'nope'"),
        ({"name": "density", "kk": 5}, "measures.0.kk: not a setting of density; did you mean 'k'"),
        ({"name": "density", "k": 0}, "measures.0.k:"),
        ({"name": "no_module_here:X"}, "cannot import measure 'no_module_here:X'"),
        ({"name": "unit_analysis", "top_k": 1}, "measures.0.top_k:"),
    ],
)
def test_bad_measures_in_a_sweep_file_are_one_line(measure: dict, message: str) -> None:
    from advlab.spec import SpecError

    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        parse_sweep(tiny_sweep(measures=[measure]))


def test_a_broken_measure_costs_that_run_only(tmp_path: Path) -> None:
    module = tmp_path / "broken_measures.py"
    module.write_text(
        textwrap.dedent("""
        import pyarrow as pa
        from advlab.measures import MeasureDef

        SCHEMA = pa.schema([("trial_id", pa.string()), ("example", pa.int64()),
                            ("value", pa.float64())])

        def explode(ctx, settings):
            raise RuntimeError("disk quota exceeded")

        def no_example(ctx, settings):
            return [{"value": 1.0}]

        def foreign(ctx, settings):
            return [{"example": 0, "colour": "red"}]

        EXPLODE = MeasureDef("explode", "trial", SCHEMA, explode)
        NO_EXAMPLE = MeasureDef("no_example_rows", "example", SCHEMA, no_example)
        FOREIGN = MeasureDef("foreign_rows", "example", SCHEMA, foreign)
    """)
    )
    sys.path.insert(0, str(tmp_path))
    try:
        names = ["broken_measures:EXPLODE", "broken_measures:NO_EXAMPLE", "broken_measures:FOREIGN"]
        measures = [{"name": "lipschitz"}, *({"name": n} for n in names)]
        spec = parse_sweep(tiny_sweep(name="broken", grid={"seed": [0]}, measures=measures))
        result = run_trial(spec.trials[0], trial_context(spec, 0, str(tmp_path), "disabled"))
    finally:
        sys.path.remove(str(tmp_path))
    assert result.row["status"] == "ok"
    store = SweepStore(str(tmp_path), "broken")
    records = store.read("measures").set_index("measure")
    assert records.loc["lipschitz", "status"] == "ok" and records.loc["lipschitz", "rows"] > 0
    assert records.loc["explode", "reason"] == "RuntimeError: disk quota exceeded"
    assert "every row needs its `example`" in records.loc["no_example_rows", "reason"]
    assert "['colour'] are not in the declared schema" in records.loc["foreign_rows", "reason"]
    assert set(records.loc[["explode", "no_example_rows", "foreign_rows"], "status"]) == {"failed"}
    # A failed run keeps no rows: its table has no file of this trial.
    assert not {"explode", "no_example_rows", "foreign_rows"} & set(store.tables())


def test_an_attack_scope_measure_runs_once_per_attack_run_and_grows_with_the_attacks(
    tmp_path: Path,
) -> None:
    measures = [{"name": "density", "k": 3}]
    first = parse_sweep(tiny_sweep(name="dens", grid={"seed": [0]}, measures=measures,
                                   attacks=[{"name": "fgsm"}]))  # fmt: skip
    run_trial(first.trials[0], trial_context(first, 0, str(tmp_path), "disabled"))
    store = SweepStore(str(tmp_path), "dens")
    rows = store.read("density")
    # fgsm at both budgets: a clean row, then adversarial and matched noise per budget.
    runs = [
        (r.attack, None if pd.isna(r.budget) else r.budget, r.inputs) for r in rows.itertuples()
    ]
    assert runs == [
        ("fgsm", None, "clean"), ("fgsm", 0.05, "adversarial"), ("fgsm", 0.05, "noise"),
        ("fgsm", 0.1, "adversarial"), ("fgsm", 0.1, "noise"),
    ]  # fmt: skip
    before = {p: p.read_bytes() for p in (tmp_path / "dens").rglob("*.parquet")}
    attacks = [{"name": "fgsm"}, {"name": "pgd", "steps": 3}]
    second = parse_sweep(tiny_sweep(name="dens", grid={"seed": [0]}, measures=measures,
                                    attacks=attacks))  # fmt: skip
    run_trial(second.trials[0], trial_context(second, 0, str(tmp_path), "disabled"))
    assert {p: p.read_bytes() for p in before} == before  # fgsm's density is not redone
    records = store.read("measures")
    assert sorted(records["attack"]) == ["fgsm", "pgd"]
    grown = store.read("density")
    assert set(grown["attack"]) == {"fgsm", "pgd"}
    clean = grown[grown["inputs"] == "clean"]["knn_distance"]
    assert clean.nunique() == 1  # the same clean examples, measured alike in each run


# Small settings for every built-in measure: a measure registered later without an entry here
# fails the test below until it gets one (and so runs in a trial at least once).
EVERY_MEASURE = {
    "lipschitz": {},
    "unit_analysis": {"units": 3, "top_k": 4},
    "density": {"k": 2, "pca": 3},
    "masking": {"strong_attacks": "always"},
    "health": {},
    "bounds": {"norms": ["linf"], "methods": ["ibp", "crown"], "examples": 4},
    "input_gradients": {"examples": 10},
    "gaussian_noise": {"sigmas": [0.2], "draws": 3},
    "jacobian": {"examples": 5},
    "likelihood": {"latent": 2, "hidden": 0, "epochs": 1, "samples": 2, "max_train": 50},
}


def test_every_registered_measure_runs_in_a_trial(tmp_path: Path) -> None:
    assert set(EVERY_MEASURE) == {defn.name for defn in BUILTIN} <= set(registry.names())
    measures = [{"name": name, **settings} for name, settings in EVERY_MEASURE.items()]
    spec = parse_sweep(tiny_sweep(name="every", grid={"seed": [0]}, measures=measures))
    result = run_trial(spec.trials[0], trial_context(spec, 0, str(tmp_path), "disabled"))
    store = SweepStore(str(tmp_path), "every")
    records = store.read("measures")
    assert set(records["status"]) == {"ok"}, records["reason"].tolist()
    assert set(records["measure"]) == set(EVERY_MEASURE)
    for name in EVERY_MEASURE:
        rows = store.read(name)
        assert len(rows) == records.loc[records["measure"] == name, "rows"].sum() > 0, name
        assert list(rows.columns) == registry.get(name).schema.names
    # Their scalars reach the trial's metrics under the names each measure gives them.
    assert result.metrics["lipschitz/upper_bound"] > 0
    assert 0 <= result.metrics["unit_analysis/purity_natural"] <= 1
    assert result.metrics["gradient_masking"] in (0.0, 1.0)
    assert result.metrics["jacobian/logits"] > 0
    assert 0 < result.metrics["likelihood/bits_per_dim_clean"] < 64
    assert result.metrics["health/failed_checks"] in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
    assert (
        0
        < result.metrics["bounds/linf/ibp/mean_lower"]
        <= result.metrics["bounds/linf/crown/mean_lower"] * (1 + 1e-9)
    )
    png = tmp_path / "every" / "files" / "unit_analysis" / spec.ids[0] / "unit_analysis_natural.png"
    assert png.is_file()
