"""Input dimension as a sweep axis (dataset.resolution) and the measures of its analysis: the
Gaussian-noise link of Ford et al. and input-gradient norms, against known answers."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_sweep
from torch import Tensor, nn

import advlab
from advlab.cli import main
from advlab.dimension import exponents, slope
from advlab.measures.gaussian_noise import (
    HALF_OR_MORE,
    NO_ERRORS,
    noise_errors,
    noise_row,
    predicted_distance,
)
from advlab.measures.input_gradients import gradient_norm_rows, input_gradients
from advlab.models import build_model
from advlab.report import render_report
from advlab.report.load import load_all
from advlab.sources import attacked_split, load_data_spec
from advlab.spec import DatasetSpec, TrialSpec

PHI = NormalDist()


def _half_space(d: int, seed: int) -> tuple[nn.Module, Tensor, float]:
    """A two-class linear model on d pixels, and its decision function's w and b: class 1 where
    w.x + b > 0, so the distance from x to the boundary is |w.x + b| / ||w||."""
    torch.manual_seed(seed)
    linear = nn.Linear(d, 2)
    model = nn.Sequential(nn.Flatten(), linear).eval()
    with torch.no_grad():
        w = (linear.weight[1] - linear.weight[0]).double()
        b = float(linear.bias[1] - linear.bias[0])
    return model, w, b


def _labels_and_distances(
    model: nn.Module, x: Tensor, w: Tensor, b: float
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        y = model(x).argmax(1)
    return y, (x.flatten(1).double() @ w + b).abs() / w.norm()


def _predict(model: nn.Module):
    def predict(x: Tensor) -> Tensor:
        with torch.no_grad():
            return model(x).argmax(1)

    return predict


def _distance_se(p: np.ndarray, sigma: float, n: int) -> np.ndarray:
    """Standard error of -sigma * Phi^-1(mu_hat) for a binomial rate of n draws (delta method:
    d/dmu Phi^-1(mu) = 1 / phi(Phi^-1(mu)))."""
    density = np.array([PHI.pdf(PHI.inv_cdf(float(q))) for q in p])
    return sigma * np.sqrt(p * (1 - p) / n) / density


def test_ford_relation_per_example_on_a_linear_model_with_gaussian_data() -> None:
    """Each point's error rate in noise is Binomial(draws, Phi(-r/sigma)), r its exact distance
    to the boundary, and -sigma * Phi^-1(mu_i) gives r back within 4 standard errors."""
    model, w, b = _half_space(50, seed=0)
    x = torch.randn(30, 1, 5, 10, generator=torch.Generator().manual_seed(1))
    y, r = _labels_and_distances(model, x, w, b)
    sigma, draws = float(r.median()), 2000
    wrong = noise_errors(_predict(model), x, y, sigma, draws, torch.Generator().manual_seed(2))
    p = np.array([PHI.cdf(-float(ri) / sigma) for ri in r])
    counts = wrong.numpy().astype(float)
    assert np.all(np.abs(counts - draws * p) <= 4 * np.sqrt(draws * p * (1 - p)) + 1)
    usable = (p > 0.01) & (p < 0.45)
    assert usable.sum() >= 10  # the test covers a spread of distances
    predicted = np.array([predicted_distance(c / draws, sigma) for c in counts[usable]])
    se = _distance_se(p[usable], sigma, draws)
    assert np.all(np.abs(predicted - r.numpy()[usable]) <= 4 * se)


def test_ford_relation_pooled_over_gaussian_points_at_one_distance() -> None:
    """Gaussian points moved to distance r from the boundary: the pooled error rate of N * draws
    noisy copies predicts r (the measure's predicted_l2) within 4 standard errors."""
    model, w, b = _half_space(40, seed=3)
    g = torch.randn(40, 40, generator=torch.Generator().manual_seed(4)).double()
    unit = w / w.norm()
    r_true = 0.7
    on_plane = g - ((g @ w + b) / (w @ w))[:, None] * w
    x = (on_plane + r_true * unit).float().view(40, 1, 8, 5)
    y, r = _labels_and_distances(model, x, w, b)
    assert torch.allclose(r, torch.full_like(r, r_true), atol=1e-5) and bool((y == 1).all())
    sigma, draws = 0.5, 500
    wrong = noise_errors(_predict(model), x, y, sigma, draws, torch.Generator().manual_seed(5))
    row = noise_row(wrong, draws, sigma)
    p = PHI.cdf(-r_true / sigma)
    se = float(_distance_se(np.array([p]), sigma, 40 * draws)[0])
    assert row["note"] == "" and row["n"] == 40
    assert abs(row["error_rate"] - p) <= 4 * math.sqrt(p * (1 - p) / (40 * draws))
    assert abs(row["predicted_l2"] - r_true) <= 4 * se


def test_noise_rows_say_why_there_is_no_prediction() -> None:
    none_wrong = noise_row(torch.zeros(5, dtype=torch.int64), 10, 0.1)
    assert none_wrong["predicted_l2"] is None and none_wrong["note"] == NO_ERRORS
    assert none_wrong["median_l2"] is None and none_wrong["n_resolved"] == 0  # all beyond reach
    mostly = noise_row(torch.tensor([10, 6, 5, 1]), 10, 0.2)
    assert mostly["error_rate"] == 22 / 40 and mostly["predicted_l2"] is None
    assert mostly["note"] == HALF_OR_MORE
    # per example: 0, 0, 0 (mu >= 0.5 clamps to 0) and -0.2 * Phi^-1(0.1) for the last
    assert mostly["median_l2"] == 0.0 and mostly["n_resolved"] == 1
    assert mostly["mean_l2"] == pytest.approx(-0.2 * PHI.inv_cdf(0.1), rel=1e-12)
    assert predicted_distance(0.5, 1.0) is None and predicted_distance(0.0, 1.0) is None


def test_input_gradient_norms_match_a_hand_computation_on_a_linear_model() -> None:
    """For logits W x + b the loss gradient is W^T (softmax - onehot(y)), per example."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(7, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2, 2])
    weight, bias = (p.detach().double() for p in model[1].parameters())
    flat = x.flatten(1).double()
    expected = (F.softmax(flat @ weight.T + bias, dim=1) - F.one_hot(y, 3).double()) @ weight
    grads = input_gradients(model, x, y, batch=3)
    assert torch.allclose(grads.double(), expected, rtol=1e-5, atol=1e-7)
    rows = {r["norm"]: r for r in gradient_norm_rows(grads)}
    for norm, p in (("l1", 1), ("l2", 2)):
        values = expected.norm(p=p, dim=1).numpy()
        assert rows[norm]["input_dim"] == 16 and rows[norm]["n"] == 7
        assert rows[norm]["mean"] == pytest.approx(values.mean(), rel=1e-5)
        assert rows[norm]["std"] == pytest.approx(values.std(ddof=1), rel=1e-4)
        assert rows[norm]["median"] == pytest.approx(np.median(values), rel=1e-5)
    one_by_one = input_gradients(model, x, y, batch=1)  # batching changes nothing
    assert torch.allclose(one_by_one, grads, rtol=1e-6, atol=1e-8)


def test_exponents_recover_a_power_law_with_an_interval_over_seeds() -> None:
    dims = np.array([49, 196, 784, 3136])
    rows = []
    for seed, k in enumerate([0.4, 0.5, 0.6]):
        for d in dims:
            rows.append({"group": "g", "seed": seed, "input_dim": d, "quantity": "grad_l1",
                         "attack": None, "value": (seed + 1) * d**k})  # fmt: skip
    found = exponents(pd.DataFrame(rows)).iloc[0]
    assert found["seed_exponents"] == pytest.approx([0.4, 0.5, 0.6], abs=1e-12)
    assert found["exponent"] == pytest.approx(0.5, abs=1e-12)
    assert 0.4 - 1e-12 <= found["lo"] < 0.5 < found["hi"] <= 0.6 + 1e-12 and found["n_seeds"] == 3
    assert found["predicted"] == 0.5 and bool(found["consistent"])
    flat = exponents(pd.DataFrame(rows).assign(quantity="grad_l2")).iloc[0]
    assert flat["predicted"] == 0.0 and not bool(flat["consistent"])  # 0 is outside [0.4, 0.6]
    assert math.isnan(slope(np.array([49.0, 49.0]), np.array([1.0, 2.0])))


def test_resolution_resamples_the_data_and_is_part_of_the_identity() -> None:
    native = load_data_spec(DatasetSpec(name="digits"))
    small = load_data_spec(DatasetSpec(name="digits", resolution=4))
    large = load_data_spec(DatasetSpec(name="digits", resolution=16))
    assert small.input_shape == (1, 4, 4) and large.input_shape == (1, 16, 16)
    # the box filter keeps each image's mean, and 16 -> 8 gives the native images back
    means = native.x_test.mean(dim=(1, 2, 3))
    assert torch.allclose(small.x_test.mean(dim=(1, 2, 3)), means, atol=1e-6)
    assert torch.equal(F.avg_pool2d(large.x_test, 2), native.x_test)
    # readers of attacked images (report, transfer) see the trial's resolution too
    spec = DatasetSpec(name="digits", resolution=4)
    assert torch.equal(attacked_split(spec, "test")[0], small.x_test)
    base = TrialSpec()
    at_4 = TrialSpec(dataset={"name": "digits", "resolution": 4})
    assert at_4.training_key() != base.training_key() and at_4.trial_id() != base.trial_id()
    unset = TrialSpec(dataset={"name": "digits", "resolution": None})
    assert unset.trial_id() == base.trial_id()  # existing sweeps keep their ids


@pytest.mark.parametrize("side", [4, 7, 14, 28, 56])
def test_fc_and_cnn_build_at_any_resolution(side: int) -> None:
    for name in ("fc100-100-10", "cnn"):
        model = build_model(name, (1, side, side), 10, activation="relu")
        assert model(torch.zeros(2, 1, side, side)).shape == (2, 10)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"dataset": {"name": "digits", "resolution": 0}}, "dataset.resolution: give the side"),
        ({"dataset": {"name": "digits", "resolution": 3.5}}, "dataset.resolution: give the side"),
        ({"grid": {"dataset.resolution": [8, 600]}}, "dataset.resolution: give the side"),
        (
            {"dataset": {"name": "digits", "resolution": 3}, "grid": {"model": ["cnn"]}},
            "raise dataset.resolution to 4",
        ),
    ],
)
def test_validate_refuses_a_bad_resolution_in_one_line(
    change: dict, expected: str, write_sweep, capsys
) -> None:
    path = write_sweep({**tiny_sweep(), **change})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.slow
def test_a_sweep_over_two_resolutions(ray_local, write_sweep, tmp_path: Path) -> None:
    """Two resolutions through Ray Tune: each trial trains, attacks and measures at its own d,
    and the stored images, the measures and the dimension analysis agree with each other."""
    raw = tiny_sweep(
        grid={"dataset.resolution": [4, 16]}, model="fc10", subset="fraction:0.3",
        train={"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.01},
        attack_examples=6, eps=[0.5], attacks=[{"name": "ddn", "norm": "l2", "steps": 20}],
        measures=[{"name": "input_gradients", "examples": 20},
                  {"name": "gaussian_noise", "sigmas": [0.3], "draws": 5}],
        transfer={"controls": []},
        wandb={"mode": "disabled"},  # W&B is test_sweep_e2e's
    )  # fmt: skip
    assert main(["sweep", str(write_sweep(raw))]) == 0
    res = advlab.load(str(tmp_path / "results" / "tiny"))
    trials = res.trials.set_index("dataset.resolution")
    assert trials.loc[4, "input_dim"] == 16 and trials.loc[16, "input_dim"] == 256
    assert trials.loc[4, "training_key"] != trials.loc[16, "training_key"]
    examples = res.examples(images=True).merge(res.trials[["trial_id", "dataset.resolution"]])
    for side, group in examples.groupby("dataset.resolution"):
        clean = attacked_split(DatasetSpec(name="digits", resolution=int(side)), "test")[0]
        clean = clean.flatten(1)[group["dataset_index"].to_numpy()]
        adv = torch.tensor(np.stack(group["x_adv"].to_numpy()))
        assert adv.shape[1] == side * side
        stored = torch.tensor(group["dist_l2"].to_numpy())
        assert torch.allclose((adv - clean).double().norm(dim=1), stored, atol=1e-5)
    pairs = res.transfer[res.transfer["target_kind"] == "trial"]  # never across resolutions
    assert len(pairs) > 0 and (pairs["source_trial"] == pairs["target"]).all()
    noise = res.gaussian_noise
    by_attack = noise[noise["source"] == "attack"].merge(res.attacks, on=["trial_id", "attack"])
    assert len(by_attack) == 2 and len(noise[noise["source"] == "noise"]) == 2
    assert np.allclose(by_attack["median_l2"], by_attack["median_dist_l2"], rtol=1e-12)
    gradients = res.input_gradients.merge(res.trials[["trial_id", "input_dim"]], on="trial_id")
    assert (gradients["input_dim_x"] == gradients["input_dim_y"]).all()
    points = res.dimension()
    assert sorted(points["quantity"].unique()) == ["dist_l2", "dist_rms", "grad_l1", "grad_l2"]
    assert sorted(points["input_dim"].unique()) == [16, 256]
    fitted = res.dimension_exponents()
    assert len(fitted) == 4 and (fitted["n_seeds"] == 1).all()  # one seed: no interval
    assert fitted["consistent"].isna().all()
    html = render_report(load_all([str(tmp_path / "results" / "tiny")]))
    assert 'data-table="dimension-exponents"' in html and 'id="dimension"' in html
