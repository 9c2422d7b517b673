"""Transfer charts and W&B tables summarise instead of hitting a row cap: known answers on a
hand-made transfer table of 100 trials (two configurations over 50 seeds) and a control."""

from __future__ import annotations

import altair as alt
import pandas as pd
import pytest

from advlab.report.charts import transfer_heatmap
from advlab.transfer_summary import MAX_CELLS, MAX_SIDE, in_order, matrices, summary


def table(configs: dict[str, str], n: int = 10) -> pd.DataFrame:
    """Errors by relation: self 10 of 10, same configuration 3, other 7, the control 5."""
    rows = []
    for source in configs:
        for target in [*configs, "knn"]:
            if target == "knn":
                wrong = 5
            elif target == source:
                wrong = n
            else:
                wrong = 3 if configs[source] == configs[target] else 7
            kind = "control" if target == "knn" else "trial"
            rows.append({
                "source_trial": source, "attack": "fgsm", "budget": 0.1, "kind": "adversarial",
                "amplified_to": None, "target": target, "target_kind": kind, "n": n,
                "errors_adv": wrong, "error_adv": wrong / n,
            })  # fmt: skip
    return pd.DataFrame(rows)


SEEDS = {f"t{i:03d}": "fc10" if i % 2 else "fc32-10" for i in range(100)}


def test_a_large_matrix_pools_its_seeds_by_configuration() -> None:
    frame = table(SEEDS)
    labels = {t: f"{c} seed{i}" for i, (t, c) in enumerate(SEEDS.items())}
    (matrix,) = matrices(frame, labels, SEEDS).values()
    assert matrix.note == "by configuration (seeds pooled)"
    assert list(matrix.frame.index) == ["fc32-10", "fc10"]
    assert list(matrix.frame.columns) == ["fc32-10", "fc10", "knn"]
    same = (50 * 10 + 50 * 49 * 3) / (50 * 50 * 10)  # the diagonal pooled with 49 other seeds
    assert matrix.frame.loc["fc10", "fc10"] == pytest.approx(same, rel=1e-15)
    assert matrix.frame.loc["fc10", "fc32-10"] == 0.7 and matrix.frame.loc["fc10", "knn"] == 0.5
    with pytest.raises(alt.MaxRowsError):  # what the 192-trial sweep met: every pair a cell
        transfer_heatmap(
            frame.pivot(index="source_trial", columns="target", values="error_adv"), "t", "r", "c"
        )
    spec = transfer_heatmap(matrix.frame, "t", "r", "c")  # Altair checks its rows here
    assert len(spec["datasets"][next(iter(spec["datasets"]))]) == 2 * 3


def test_many_configurations_show_the_first_in_grid_order() -> None:
    configs = {f"t{i:03d}": f"config{i}" for i in range(60)}
    frame = table(configs)
    (matrix,) = matrices(frame, configs, configs).values()
    assert matrix.frame.shape == (MAX_SIDE, MAX_SIDE + 1)
    assert matrix.frame.size <= MAX_CELLS
    assert (
        matrix.note == f"by configuration (seeds pooled); the first {MAX_SIDE} of 60 in grid order"
    )
    assert matrix.frame.loc["config0", "config0"] == 1.0
    assert matrix.frame.loc["config0", "config1"] == 0.7


def test_a_small_matrix_keeps_every_pair() -> None:
    few = dict(list(SEEDS.items())[:6])
    frame = table(few).drop(columns="errors_adv")  # rows from before the counts: rebuilt
    (matrix,) = matrices(frame, {}, few).values()
    assert matrix.note == "" and matrix.frame.shape == (6, 7)
    assert matrix.frame.loc["t000", "t000"] == 1.0 and matrix.frame.loc["t000", "t002"] == 0.3


def test_the_summary_pools_each_relation() -> None:
    found = summary(table(SEEDS), SEEDS).set_index("relation")
    assert list(found.index) == ["control knn", "other configuration", "same configuration", "self"]
    assert found["pairs"].to_dict() == {
        "control knn": 100, "other configuration": 5000, "same configuration": 4900, "self": 100
    }  # fmt: skip
    assert found["error"].to_dict() == {
        "control knn": 0.5, "other configuration": 0.7, "same configuration": 0.3, "self": 1.0
    }  # fmt: skip
    assert (found["n"] == found["pairs"] * 10).all()


def test_rows_read_from_shards_come_back_in_grid_order_controls_as_listed() -> None:
    few = dict(list(SEEDS.items())[:3])
    frame = table(few).assign(target_kind="trial")
    frame.loc[frame["target"] == "knn", "target_kind"] = "control"
    extra = frame[frame["target"] == "knn"].assign(target="constant")
    shuffled = pd.concat([frame, extra]).sample(frac=1, random_state=0)  # files by hash
    order = ["t002", "t000", "t001"]
    recorded = {"versions": [{"trial_ids": order}], "transfer": {"controls": ["knn", "constant"]}}
    got = in_order(shuffled, recorded)
    pairs = list(dict.fromkeys(zip(got["source_trial"], got["target"], strict=True)))
    assert pairs == [(s, t) for s in order for t in [*order, "knn", "constant"]]
