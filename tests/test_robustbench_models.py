"""`model: robustbench:<name>`: RobustBench's zoo architecture, its weights read by RobustBench's
own loader from a checkpoint written here in RobustBench's format (downloads fail here, and a
test must not depend on the network either way: the download is replaced by a failing one)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import cifar_like

from advlab.models import ModelNameError, Normalized, build_model
from advlab.robustbench_models import import_robustbench
from advlab.spec import SpecError
from advlab.sweepfile import load_sweep, parse_sweep

try:
    rb_utils = import_robustbench()
except ModelNameError as err:
    pytest.skip(str(err), allow_module_level=True)

# The cheapest CIFAR-10 Linf model of RobustBench 1.1's zoo to run here: a PreActResNet-18
# (11 M parameters; 3x faster on a CPU than the smallest, Ding2020MMA's 5.8 M WRN-28-4), whose
# `mu` and `sigma` buffers standardise its inputs inside the model.
NAME = "Wong2020Fast"
MODEL = f"robustbench:{NAME}"


@pytest.fixture(scope="module")
def model_dir(
    tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None
) -> tuple[Path, torch.nn.Module]:
    """A RobustBench checkpoint of the zoo's architecture with random (seeded) weights, as its
    loader expects it: {'state_dict': {'module.' + key: tensor}} under <dir>/cifar10/Linf/."""
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    zoo = rb_utils.all_models[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    torch.manual_seed(0)
    source = zoo[NAME]["model"]().eval()
    for name, buffer in source.named_buffers():  # batch-norm statistics that are not 0 and 1
        if name.endswith(("running_mean", "running_var")):
            buffer.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp("robustbench")
    folder = root / "models" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 100}, folder / f"{NAME}.pt")
    return root / "models", source


def test_a_robustbench_model_loads_its_checkpoint_through_robustbench(
    model_dir: tuple[Path, torch.nn.Module],
) -> None:
    folder, source = model_dir
    torch.manual_seed(1)  # a fresh build would draw other weights
    model = build_model(MODEL, (3, 32, 32), 10, model_args={"model_dir": str(folder)})
    untouched = build_model(
        MODEL, (3, 32, 32), 10, model_args={"model_dir": str(folder)}, weights="none"
    )
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), source(x))
        assert not torch.allclose(untouched.eval()(x), source(x))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "robustbench:Nobody2030"}, "is no RobustBench model for cifar10 Linf"),
        ({"model_args": {"model_dir": "m", "threat_model": "L3"}}, "model_args.threat_model"),
        ({"model_args": {}}, "model_args.model_dir"),
        (
            {"dataset": {"name": "digits"}},
            "for 3x32x32 images and 10 classes, but the data has 1x8x8",
        ),
        (
            {
                "model": "robustbench:Addepalli2022Efficient_RN18",
                "model_args": {"model_dir": "m", "dataset": "cifar100"},
            },
            "but the data has 3x32x32 images and 10 classes",
        ),
        (
            {"dataset": {"name": "cifar10", "normalize": {"mean": [0.5] * 3, "std": [0.2] * 3}}},
            "standardises its inputs itself",
        ),
        (
            {"model": "robustbench:Debenedetti2022Light_XCiT-S12"},
            "use model: timm:debenedetti2022light_xcit_s12_cifar10_linf",
        ),
    ],
)
def test_a_robustbench_model_that_cannot_fit_is_refused_in_one_line(
    change: dict[str, Any], message: str
) -> None:
    raw: dict[str, Any] = {
        "name": "rb",
        "dataset": {"name": "cifar10"},
        "model": MODEL,
        "model_args": {"model_dir": "m"},
        "train": {"epochs": 0},
    } | change
    with pytest.raises(SpecError, match=message) as err:
        parse_sweep(raw)
    assert "\n" not in str(err.value)


def test_without_robustbench_the_line_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "robustbench.utils", None)
    with pytest.raises(ModelNameError, match=r"pip install 'advlab\[robustbench\]'"):
        import_robustbench()


def test_a_checkpoint_holding_python_objects_is_refused_unrun(tmp_path: Path) -> None:
    """Whatever torch's default for RobustBench's own torch.load, a file's pickle never runs."""
    folder = tmp_path / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, folder / f"{NAME}.pt")
    with pytest.raises(ModelNameError, match="holds Python objects besides tensors") as err:
        build_model(MODEL, (3, 32, 32), 10, model_args={"model_dir": str(tmp_path)})
    assert "\n" not in str(err.value)


def _sweep(tmp_path: Path, model_dir: str, test_labels: list[int] | None = None) -> Path:
    """A sweep beside 14 CIFAR-shaped images (one per class to train on, 4 to test), its
    model_dir relative to the sweep's folder."""
    x, _ = cifar_like().images(14, np.random.default_rng(0))
    np.savez(
        tmp_path / "data.npz", x_train=x[:10], y_train=np.arange(10), x_test=x[10:],
        y_test=np.array(test_labels or [0, 1, 2, 3]),
    )  # fmt: skip
    raw = {
        "name": "rb",
        "dataset": {"name": "npz", "path": "data.npz"},
        "model": MODEL,
        "model_args": {"model_dir": model_dir},
        "train": {"epochs": 0},
        "eps": [0.03],
        "attack_examples": 4,
        "attacks": [{"name": "fgsm"}],
        "measures": [],
        "storage": str(tmp_path / "results"),
        "wandb": {"mode": "disabled"},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_trial_attacks_the_checkpoints_weights_untrained(
    model_dir: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    """train.epochs: 0 evaluates the loaded weights, with no normalisation wrapped around
    them: the test labels are the checkpoint's own predictions but for one, so its test error
    is 1/4 and its other 3 test images are the attacked ones."""
    from advlab.families import model_for
    from advlab.sources import load_data_spec
    from advlab.sweep import trial_context
    from advlab.trial import run_trial

    folder, source = model_dir
    (tmp_path / "models").symlink_to(folder)
    spec = load_sweep(_sweep(tmp_path, "models"))
    with torch.no_grad():
        predicted = source(load_data_spec(spec.trials[0].dataset).x_test).argmax(1).tolist()
    labels = [*predicted[:3], (predicted[3] + 1) % 10]
    spec = load_sweep(_sweep(tmp_path, "models", labels))
    trial = spec.trials[0]
    assert trial.model_args["model_dir"] == str(folder.resolve())
    assert not isinstance(model_for(trial, (3, 32, 32), 10).module, Normalized)
    row = run_trial(trial, trial_context(spec, 0, str(tmp_path / "results"), "disabled")).row
    assert row["status"] == "ok"
    assert row["test_error"] == 0.25
    assert row["n_attacked"] == 3


def test_a_failed_download_fails_the_trial_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread: None
) -> None:
    """No checkpoint: the checks before a sweep build the bare architecture (a missing file is
    no input error), and the trial's download fails as it does offline, recorded as such."""
    import gdown
    import requests

    from advlab.preflight import check_model
    from advlab.sources import load_data_spec
    from advlab.store import SweepStore
    from advlab.sweep import trial_context
    from advlab.trial import run_trial

    calls: list[str] = []

    def offline(*args: Any, **kwargs: Any) -> None:
        calls.append(kwargs.get("id", ""))
        raise requests.exceptions.ConnectionError("Failed to resolve 'drive.google.com'")

    monkeypatch.setattr(gdown, "download", offline)
    spec = load_sweep(_sweep(tmp_path, "empty"))
    check_model(spec.trials[0], load_data_spec(spec.trials[0].dataset))
    assert calls == []
    with pytest.raises(ModelNameError, match="download failed"):
        run_trial(spec.trials[0], trial_context(spec, 0, str(tmp_path / "results"), "disabled"))
    assert len(calls) == 1
    row = SweepStore(str(tmp_path / "results"), "rb").read("trials").iloc[0]
    assert row["status"] == "failed"
    expected = f"no checkpoint at {tmp_path / 'empty' / 'cifar10' / 'Linf' / NAME}.pt"
    assert expected in row["reason"] and "ConnectionError" in row["reason"]
