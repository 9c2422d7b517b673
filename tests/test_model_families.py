"""Model families: a prediction-only family of your own, named by import path, trains in a trial,
gets its clean errors and transfer rows like any net, and a gradient attack on it is refused up
front; the built-in controls are trial models; fitted estimators save without pickle."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_sweep
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

from advlab.cli import main
from advlab.data import load_dataset, select_subset
from advlab.families import FitJob, ModelNameError, ModelRequest, model_for, resolve
from advlab.families.estimators import EstimatorModel, EstimatorSettings
from advlab.spec import SpecError, TrainSpec
from advlab.store import SweepStore
from advlab.sweep import trial_context
from advlab.sweepfile import parse_sweep
from advlab.trial import run_trial

# A prediction-only family as a user would write it beside a sweep file: the nearest class
# centroid in the p-norm, with its one setting validated like any model's.
TOY = """
import numpy as np
from pydantic import Field

from advlab.families import estimator_family
from advlab.strict import Strict


class CentroidSettings(Strict):
    power: float = Field(2.0, gt=0)


class NearestCentroid:
    def __init__(self, power):
        self.power = power

    def fit(self, x, y):
        self.classes_ = np.unique(y)
        self.centroids_ = np.stack([x[y == c].mean(0) for c in self.classes_])
        return self

    def predict(self, x):
        gaps = np.abs(x[:, None, :] - self.centroids_[None]) ** self.power
        return self.classes_[gaps.sum(-1).argmin(1)]


CENTROID = estimator_family(
    "nearest_centroid", lambda s, seed: NearestCentroid(s.power), CentroidSettings,
    "nearest class centroid",
)


def forest(input_shape, num_classes, **args):  # a factory returning an estimator
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=5, random_state=0, **args)
"""


@pytest.fixture
def toy_dir(tmp_path: Path):
    (tmp_path / "toy_family.py").write_text(TOY)
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    sys.modules.pop("toy_family", None)


def centroid_predictions(x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The nearest centroid (squared Euclidean) computed here, by hand."""
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(10)])
    return ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)


def digits_half() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data = load_dataset("digits")
    train = select_subset(data, "fraction:0.5").train_idx
    return (
        data.x_train[train].flatten(1).numpy(), data.y_train[train].numpy(),
        data.x_test.flatten(1).numpy(), data.y_test.numpy(),
    )  # fmt: skip


@pytest.mark.slow
def test_a_prediction_only_family_trains_in_a_sweep_with_clean_errors_and_transfer_rows(
    ray_local, toy_dir: Path
) -> None:
    from advlab import results

    raw = tiny_sweep(
        name="centroid", grid={"model": ["fc10", "toy_family:CENTROID"]},
        attacks=[{"name": "noise", "eps": [0.3]}], transfer={"controls": ["constant"]},
        storage=str(toy_dir / "results"),
    )  # fmt: skip
    path = toy_dir / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 0
    res = results.load(str(toy_dir / "results" / "centroid"))
    trials = res.trials.set_index("model")
    centroid, net = trials.loc["toy_family:CENTROID"], trials.loc["fc10"]
    x_train, y_train, x_test, y_test = digits_half()
    by_hand = centroid_predictions(x_train, y_train, x_test)
    assert centroid["test_error"] == pytest.approx(float((by_hand != y_test).mean()), abs=1e-7)
    assert centroid["status"] == "ok" and res.epochs.query("model == 'toy_family:CENTROID'").empty
    measured = set(res.measures.query("trial_id == @centroid.trial_id")["measure"])
    assert measured == {"masking", "health"}  # the defaults that need predictions only

    transfer = res.transfer
    # As a target: the centroid classifier's error on the net's noisy examples, by hand.
    examples = res.examples(images=True).query("trial_id == @net.trial_id")
    x_noisy = np.stack(examples.sort_values("example")["x_adv"].to_numpy())
    labels = examples.sort_values("example")["label"].to_numpy(int)
    (row,) = transfer.query(
        "source_trial == @net.trial_id and target == @centroid.trial_id and kind == 'adversarial'"
    ).itertuples()
    expected = float((centroid_predictions(x_train, y_train, x_noisy) != labels).mean())
    assert row.error_adv == pytest.approx(expected)
    # As a source: its own attacked examples go to the net and the control.
    as_source = transfer.query("source_trial == @centroid.trial_id and kind == 'adversarial'")
    assert set(as_source["target"]) == {net.trial_id, centroid.trial_id, "constant"}
    # Saved with skops and loaded back, it predicts what it predicted.
    model = model_for(resolve_spec(res, centroid.trial_id), (1, 8, 8), 10)
    model.load_state(SweepStore.from_dir(res.uri).load_model(centroid["training_key"]))
    assert np.array_equal(model.predict(torch.from_numpy(x_test).view(-1, 1, 8, 8)), by_hand)


def resolve_spec(res, trial_id: str):
    from advlab.spec import TrialSpec

    return TrialSpec.from_stored(res.trials.set_index("trial_id").loc[trial_id, "spec"])


def test_validate_refuses_a_gradient_attack_on_a_prediction_only_model(
    toy_dir: Path, capsys
) -> None:
    cases = [
        ({"model": "toy_family:CENTROID"}, "attacks: fgsm needs input gradients, but model "
         "toy_family:CENTROID is prediction-only"),
        ({"model": "toy_family:CENTROID", "attacks": [{"name": "noise"}],
          "measures": [{"name": "unit_analysis"}]},
         "measures: unit_analysis needs a torch model"),
        ({"model": "knn", "attacks": [{"name": "noise"}],
          "train": {"epochs": 1, "adversarial": {"method": "pgd"}}},
         "train.adversarial.method: training on adversarial examples"),
        # A factory's estimator is known only once built: validate's preflight refuses it.
        ({"model": "toy_family:forest", "attacks": [{"name": "pgd"}], "measures": []},
         "attacks: pgd needs input gradients"),
        ({"model": "toy_family:CENTROID", "attacks": [{"name": "noise"}],
          "model_args": {"power": -1}}, "model_args.power:"),
    ]  # fmt: skip
    for number, (overrides, message) in enumerate(cases):
        raw = tiny_sweep(name=f"refused{number}", grid={}, **overrides)
        raw["storage"] = str(toy_dir / "results")
        path = toy_dir / f"refused{number}.yaml"
        path.write_text(yaml.safe_dump(raw))
        assert main(["validate", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("advlab: error: ") and "\n" not in err and message in err, err
    assert not (toy_dir / "results").exists()  # nothing written


def test_a_builtin_control_is_a_trial_model_fitted_like_scikit_learn(tmp_path: Path) -> None:
    raw = tiny_sweep(name="logistic", grid={}, model="logistic", attacks=[{"name": "noise"}])
    spec = parse_sweep(raw)
    result = run_trial(spec.trials[0], trial_context(spec, 0, str(tmp_path), "disabled"))
    x_train, y_train, x_test, y_test = digits_half()
    by_hand = LogisticRegression(max_iter=200).fit(x_train, y_train)
    assert result.row["test_error"] == pytest.approx(1 - by_hand.score(x_test, y_test), abs=1e-7)
    assert result.row["train_error"] == pytest.approx(1 - by_hand.score(x_train, y_train), abs=1e-7)


def test_the_rbf_svm_subsamples_as_the_transfer_controls_always_did() -> None:
    x_train, y_train, x_test, _ = digits_half()
    family = resolve("rbf_svm")
    request = ModelRequest("rbf_svm", (1, 8, 8), 10, args={"max_train": 200}, seed=3)
    model = family.build(request)
    x, y = torch.from_numpy(x_train).view(-1, 1, 8, 8), torch.from_numpy(y_train)
    model.fit(FitJob(x, y, x, y, TrainSpec(), 0.0, 3))
    keep = np.random.default_rng(3).permutation(len(x_train))[:200]
    by_hand = SVC(kernel="rbf", gamma="scale", break_ties=True, random_state=3)
    by_hand.fit(x_train[keep], y_train[keep])
    predicted = model.predict(torch.from_numpy(x_test).view(-1, 1, 8, 8)).numpy()
    assert np.array_equal(predicted, by_hand.predict(x_test))
    with pytest.raises(ModelNameError, match=r"model_args\.C:"):
        family.build(ModelRequest("rbf_svm", (1, 8, 8), 10, args={"C": 0.0}))


class Smuggled:
    """An object of a module advlab does not trust, inside a fitted estimator."""


def test_a_saved_estimator_with_an_untrusted_type_is_refused(tmp_path: Path) -> None:
    import skops.io

    estimator = LogisticRegression().fit(np.eye(4), np.array([0, 1, 0, 1]))
    estimator.extra_ = Smuggled()  # this test module is not sklearn's, numpy's or scipy's
    request = ModelRequest("logistic", (1, 2, 2), 2)
    model = EstimatorModel(LogisticRegression(), request, EstimatorSettings())
    payload = skops.io.dumps(estimator)
    with pytest.raises(ModelNameError, match="holds types advlab does not trust"):
        model.load_state({"estimator": torch.frombuffer(bytearray(payload), dtype=torch.uint8)})
    clean = EstimatorModel(LogisticRegression().fit(np.eye(4), np.array([0, 1, 0, 1])),
                           request, EstimatorSettings())  # fmt: skip
    again = EstimatorModel(LogisticRegression(), request, EstimatorSettings())
    again.load_state(clean.state())
    x = torch.eye(4).view(4, 1, 2, 2)
    assert torch.equal(again.predict(x), clean.predict(x))
    assert again.module(x).argmax(1).tolist() == clean.predict(x).tolist()  # one-hot scores


def test_spec_refuses_a_control_that_is_no_prediction_only_family() -> None:
    with pytest.raises(SpecError, match=r"transfer\.controls: 'fc10' is no prediction-only"):
        parse_sweep(tiny_sweep(transfer={"controls": ["fc10"]}))


def test_every_registered_family_trains_and_predicts_in_a_trial(tmp_path: Path) -> None:
    from advlab.families import names

    _, _, x_test, y_test = digits_half()
    for name in names():
        raw = tiny_sweep(name=f"family-{name}", grid={}, model=name,
                         attacks=[{"name": "noise", "eps": [0.2]}])  # fmt: skip
        spec = parse_sweep(raw)
        result = run_trial(spec.trials[0], trial_context(spec, 0, str(tmp_path), "disabled"))
        assert result.row["status"] == "ok", name
        model = model_for(spec.trials[0], (1, 8, 8), 10)
        model.load_state(SweepStore(str(tmp_path), f"family-{name}").load_model(
            spec.trials[0].training_key()
        ))  # fmt: skip
        predicted = model.predict(torch.from_numpy(x_test).view(-1, 1, 8, 8)).numpy()
        assert result.row["test_error"] == pytest.approx(float((predicted != y_test).mean()))
