"""Shared fixtures: small sweep files and one local Ray instance for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# Nothing in the tests may reach W&B's servers or a stale Ray cluster.
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("RAY_ADDRESS", None)
os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


def tiny_sweep(**overrides: Any) -> dict[str, Any]:
    """A sweep on the embedded digits that trains and attacks in about a second per trial."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "dataset": {"name": "digits"},
        "grid": {"model": ["fc10", "fc16-10"], "weight_decay": [1.0e-4]},
        "subset": "fraction:0.5",
        "seed": 0,
        "train": {"epochs": 3, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
        "eps": [0.05, 0.1],
        "attack_examples": 12,
        "attacks": [{"name": "fgsm"}, {"name": "lbfgs", "max_iter": 20, "search_steps": 6}],
        "resources": {"cpu": 1},
        "wandb": {"mode": "offline", "project": "advlab-tests"},
        "transfer": {"controls": ["constant", "knn"]},
    }
    raw.update(overrides)
    return raw


@pytest.fixture
def write_sweep(tmp_path: Path):
    """Write a sweep dict to a YAML file under tmp_path, storage inside tmp_path too."""

    def write(raw: dict[str, Any], name: str = "sweep.yaml") -> Path:
        raw = {"storage": str(tmp_path / "results"), **raw}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models: a second OpenMP thread only adds contention on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        configure_logging=False,
        log_to_driver=False,
    )
    yield
    ray.shutdown()
