"""Two small real sweeps to compare in a report, and a toy attack the report has never heard of.

Sweep A runs through Ray Tune from the command line (with a --set override, repeats over two
seeds, and the transfer stage); sweep B runs its trials in this process (ReLU instead of
sigmoid, L-BFGS set up differently, the toy attack, zero and per-layer weight decay, one trial
made to fail). Together they take about half a minute on two cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_sweep
from pydantic import Field
from torch import Tensor, nn

import advlab.families.torch_modules
from advlab import manifest
from advlab.attacks.base import finish
from advlab.attacks.registry import AttackDef, Settings, names, register
from advlab.cli import main
from advlab.store import SweepStore
from advlab.sweepfile import parse_sweep
from advlab.trial import TrialContext, run_trial

FAILURE = "injected failure for the report test"
FAST_TRAIN = {"epochs": 3, "batch_size": 64, "optimizer": "adam", "lr": 0.01}


class TowardGraySettings(Settings):
    steps: int = Field(16, ge=1)


def toward_gray(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: Any, norm: str, target: Any, generator: Any,
    steps: int,
) -> Any:  # fmt: skip
    """A minimisation attack no part of advlab knows: the first point on the segment from x to
    the gray image that the model misclassifies (x itself when none is)."""
    best = x.clone()
    found = torch.zeros(len(x), dtype=torch.bool)
    with torch.no_grad():
        for step in range(1, steps + 1):
            point = x + step / steps * (0.5 - x)
            fooled = (model(point).argmax(1) != y) & ~found
            best[fooled] = point[fooled]
            found |= fooled
    return finish(model, best, y, None, torch.zeros(len(x), dtype=torch.int64))


TOY = "toward_gray"
if TOY not in names():
    register(
        AttackDef(TOY, "minimization", ("l2",), ("untargeted",), TowardGraySettings, toward_gray)
    )


def sweep_a_via_ray(folder: Path, storage: Path) -> str:
    """Two models x two seeds through `advlab sweep`, epochs set from the command line."""
    raw = tiny_sweep(name="tiny-a", storage=str(storage), weight_decay=1.0e-4)
    raw |= {
        "grid": {"model": ["fc10", "fc16-10"], "seed": [0, 1]},
        "train": FAST_TRAIN | {"epochs": 5},
        "attack_examples": 8,
        "attacks": [{"name": "fgsm"}, {"name": "lbfgs", "max_iter": 10, "search_steps": 4}],
        "transfer": {"controls": ["constant", "knn"], "noise_stddev": [0.3]},
    }
    path = folder / "tiny-a.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["sweep", str(path), "--set", "train.epochs=2"]) == 0
    return SweepStore(str(storage), "tiny-a").uri


def sweep_b_in_process(storage: Path) -> str:
    """ReLU nets, three (model, decay) cases x two seeds; the last trial fails in training."""
    raw = tiny_sweep(name="tiny-b", storage=str(storage), activation="relu")
    raw |= {
        "grid": {"seed": [0, 1]},
        "cases": [
            {"model": "fc16-10", "weight_decay": [1.0e-3, 1.0e-4]},
            {"model": "fc10", "weight_decay": 0.0},
            {"model": "fc16-10", "weight_decay": 1.0e-3},
        ],
        "train": FAST_TRAIN,
        "attack_examples": 8,
        "attacks": [
            {"name": "fgsm"},
            {"name": "lbfgs", "max_iter": 20, "search_steps": 4},
            {"name": TOY, "steps": 8},
        ],
        "wandb": {"mode": "disabled"},
    }
    spec = parse_sweep(raw)
    store = SweepStore(str(storage), spec.name)
    recorded = manifest.record_version(None, spec)
    store.write_manifest(recorded)
    labels = manifest.labels(recorded)
    for index, trial in enumerate(spec.trials):
        ctx = TrialContext(
            sweep=spec.name, storage=store.uri.rsplit("/", 1)[0], trial_index=index,
            label=labels[spec.ids[index]], grid_values=spec.grid_values(trial),
        )  # fmt: skip
        if index < len(spec.trials) - 1:
            run_trial(trial, ctx)
            continue
        with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError):
            patch.setattr(advlab.families.torch_modules, "train_model", _fail)
            run_trial(trial, ctx)
    return store.uri


def _fail(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError(FAILURE)
