"""benchmarks/paper_tables.py's Table 1 across families, on hand-made examples tables with known
answers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest


def paper_tables():
    path = Path(__file__).parent.parent / "benchmarks" / "paper_tables.py"
    found = importlib.util.spec_from_file_location("paper_tables", path)
    assert found is not None and found.loader is not None
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module


def example(tid: str, attack: str, index: int, success: bool, rms: float, budget=None) -> dict:
    return {
        "trial_id": tid, "attack": attack, "budget": budget, "dataset_index": index,
        "success": success, "dist_rms": rms, "dist_l2": 28 * rms,
    }  # fmt: skip


def test_family_rows_count_fooled_images_compare_exact_minima_and_noise() -> None:
    module = paper_tables()
    trials = pd.DataFrame([
        {"trial_id": "a", "model": "fc10", "model_args": "{}", "weight_decay": [1e-4],
         "subset": "all", "train_error": 0.1, "test_error": 0.2},
        {"trial_id": "b", "model": "knn", "model_args": '{"n_neighbors": 1}',
         "weight_decay": [0.0], "subset": "all", "train_error": 0.0, "test_error": 0.3},
        {"trial_id": "c", "model": "logistic", "model_args": "{}", "weight_decay": [0.0],
         "subset": "all", "train_error": 0.1, "test_error": 0.1},
    ])  # fmt: skip
    rows = []
    for tid, dists in (("a", [0.01, 0.02, None]), ("b", [0.1, 0.2, 0.3]), ("c", [0.01] * 3)):
        for i, d in enumerate(dists):
            rows.append(example(tid, "hsj", i, d is not None, d or 0.0))
        for i in range(3):  # noise at 0.05 fools image 0 of b only; its rms 0.04 everywhere
            rows.append(example(tid, "noise", i, tid == "b" and i == 0, 0.04, 0.05))
            rows.append(example(tid, "noise", i, i < 2, 0.08, 0.1))
    exact = pd.DataFrame(
        [example("a", "exact", i, True, d) for i, d in enumerate([0.005, 0.01, 0.03])]
    )
    out = module.family_rows(trials, pd.DataFrame(rows), "hsj", exact)
    a, b, c = out
    assert [r["label"] for r in out] == ["fc10(0.0001)", "knn(n_neighbors=1)", "logistic"]
    assert (a["n"], a["fooled"], b["fooled"]) == (3, 2, 3)
    assert a["rms_mean"] == pytest.approx(0.015) and a["l2_median"] == pytest.approx(0.42)
    assert (a["exact_fooled"], a["exact_n"], a["same_images"]) == (3, 3, True)
    assert a["ratio_median"] == pytest.approx(2.0)  # images 0 and 1: 0.01/0.005, 0.02/0.01
    assert a["exact_l2_mean"] == pytest.approx(28 * 0.015)
    assert b["exact_fooled"] is None and b["ratio_median"] is None  # no exact run for b
    assert a["noise"] == {0.05: 0.0, 0.1: pytest.approx(2 / 3)}
    # within the noise's rms (0.04): all three exact minima of a, none of b's examples
    assert a["within"] == 1.0 and b["within"] == 0.0 and b["noise_within"] == pytest.approx(1 / 3)
    assert c["within"] == 1.0 and c["fooled"] == 3  # no exact run: its hsj examples
