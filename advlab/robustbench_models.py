"""RobustBench's model zoo by name: `model: robustbench:<name>`.

The architecture comes from RobustBench's zoo and its weights through RobustBench's own loader
(`robustbench.utils.load_model`), which reads `<model_dir>/<dataset>/<threat_model>/<name>.pt`
and downloads that file first when it is missing. The settings are `model_args`:

    model: robustbench:Ding2020MMA
    model_args: {model_dir: models, dataset: cifar10, threat_model: Linf}

RobustBench's models take [0, 1] pixels and standardise them themselves, so a trial that also
sets `dataset.normalize` is refused (it would standardise twice). Their input is the zoo's:
3x32x32 for CIFAR-10 and CIFAR-100 (10 and 100 classes), 3 channels and 1000 classes for
ImageNet (RobustBench evaluates those at 224x224).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from advlab.model_errors import ModelNameError, validate_model_args
from advlab.model_errors import unloadable as _unloadable
from advlab.strict import Strict
from advlab.text import one_line

PREFIX = "robustbench:"
INSTALL = "pip install 'advlab[robustbench]'"

# The zoo's data sets: (channels, side or None for any, classes).
ZOO_DATA = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "imagenet": (3, None, 1000)}


class RobustBenchSettings(Strict):
    """`model_args` of a robustbench: model."""

    model_dir: str  # RobustBench's folder of checkpoints; relative: from the sweep file's folder
    dataset: Literal["cifar10", "cifar100", "imagenet"] = "cifar10"
    threat_model: Literal["Linf", "L2", "corruptions"] = "Linf"


def import_robustbench() -> Any:
    """robustbench.utils, or ModelNameError saying how to install it.

    robustbench 1.1.1 as published imports `autoattack`, which is on no package index: its
    dependency `pyautoattack` installs the same code as `pyautoattack`. That module stands in
    for `autoattack` here (robustbench uses it only for its own benchmark, never to load).
    """
    if importlib.util.find_spec("autoattack") is None and importlib.util.find_spec("pyautoattack"):
        sys.modules["autoattack"] = importlib.import_module("pyautoattack")
    try:
        return importlib.import_module("robustbench.utils")
    except ImportError as err:  # robustbench, or one of its imports (pkg_resources: setuptools)
        why = one_line(err, 120)
        raise ModelNameError(
            f"model: robustbench: models need robustbench ({why}); {INSTALL}"
        ) from None


def settings_of(name: str, model_args: dict[str, Any] | None) -> RobustBenchSettings:
    settings = validate_model_args(f"{PREFIX}{name}", RobustBenchSettings, dict(model_args or {}))
    assert isinstance(settings, RobustBenchSettings)
    return settings


def zoo_entry(name: str, settings: RobustBenchSettings) -> dict[str, Any]:
    """The zoo's entry for `name` under the settings' data set and threat model; one line
    naming the problem when there is none, or when it is one RobustBench loads from timm's hub
    (those ignore model_dir: use timm:<name> with a local weights file instead)."""
    utils = import_robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    zoo = utils.all_models[BenchmarkDataset(settings.dataset)].get(
        ThreatModel(settings.threat_model), {}
    )
    where = f"{settings.dataset} {settings.threat_model}"
    if name not in zoo:
        hint = ", ".join(sorted(zoo, key=str.lower)[:4])
        known = f"{len(zoo)} models there, e.g. {hint}" if zoo else "RobustBench has none there"
        raise ModelNameError(
            f"model: {PREFIX}{name} is no RobustBench model for {where} ({known}); check the "
            "name or model_args.dataset and model_args.threat_model"
        )
    # RobustBench's own name for a zoo model it takes from timm's hub
    timm_name = f"{name.replace('-', '_')}_{settings.dataset}_{settings.threat_model}".lower()
    if utils.timm.is_model(timm_name):
        raise ModelNameError(
            f"model: {PREFIX}{name} ({where}) is one RobustBench loads from timm's hub, not "
            f"from model_dir; use model: timm:{timm_name} with model_args.pretrained, "
            "a local weights file"
        )
    return zoo[name]


def check_robustbench(
    model: str,
    model_args: dict[str, Any],
    normalize: object,
    data: tuple[tuple[int, ...], int] | None,
) -> None:
    """A trial's robustbench: model before any work: its settings and name, no
    `dataset.normalize` (its normalisation is its own), and `data` = (input shape, classes)
    of its zoo's data set when known before loading (built-in data sets)."""
    name = model.removeprefix(PREFIX)
    settings = settings_of(name, model_args)
    zoo_entry(name, settings)
    if normalize is not None:
        raise ModelNameError(
            f"dataset.normalize: {model} standardises its inputs itself (RobustBench's "
            "models take [0, 1] pixels); drop dataset.normalize"
        )
    if data is not None:
        check_fits(name, settings, *data)


def check_fits(
    name: str, settings: RobustBenchSettings, input_shape: tuple[int, ...], num_classes: int
) -> None:
    """The data's images and classes are the zoo data set's, or ModelNameError."""
    channels, side, classes = ZOO_DATA[settings.dataset]
    sides_ok = side is None or tuple(input_shape[1:]) == (side, side)
    if input_shape[0] != channels or not sides_ok or num_classes != classes:
        want = f"{channels}x{side}x{side}" if side else f"{channels}-channel"
        got = "x".join(map(str, input_shape))
        raise ModelNameError(
            f"model: {PREFIX}{name} is a {settings.dataset} model for {want} images and "
            f"{classes} classes, but the data has {got} images and {num_classes} classes; use "
            f"{settings.dataset}-shaped data or set model_args.dataset"
        )


def checkpoints(name: str, settings: RobustBenchSettings, entry: dict[str, Any]) -> list[Path]:
    """Where RobustBench's loader reads the weights (an ensemble has one file per member)."""
    path = Path(settings.model_dir) / settings.dataset / settings.threat_model / f"{name}.pt"
    ids = entry.get("gdrive_id")
    if isinstance(ids, list):
        return [Path(f"{path}_m{i}.pt") for i in range(len(ids))]
    return [path]


def robustbench_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    model_args: dict[str, Any] | None,
    weights: str = "load",
) -> nn.Module:
    """RobustBench's model `name` for this data. `weights`: "load" reads its checkpoint
    through RobustBench's loader, which downloads a missing one (a trial); "local" reads a
    checkpoint already on disk and builds the bare architecture without one (the checks
    before a sweep: a missing file is no input error); "none" builds the architecture only."""
    settings = settings_of(name, model_args)
    entry = zoo_entry(name, settings)
    check_fits(name, settings, input_shape, num_classes)
    files = checkpoints(name, settings, entry)
    if weights == "none" or (weights == "local" and not all(f.is_file() for f in files)):
        return _architecture(name, entry)
    for path in files:
        if path.is_file():
            _check_weights_only(name, path)
    try:
        utils = import_robustbench()
        return utils.load_model(
            name, settings.model_dir, settings.dataset, settings.threat_model
        ).float()
    except Exception as err:  # a failed download or a file that does not fit, in one line
        why = one_line(f"{type(err).__name__}: {err}", 240)
        if all(f.is_file() for f in files):
            raise RobustBenchLoadError(
                f"model: {PREFIX}{name}: RobustBench's loader failed on {files[0]} ({why})"
            ) from None
        raise RobustBenchLoadError(
            f"model: {PREFIX}{name}: no checkpoint at {files[0]} and its download failed "
            f"({why}); put the file there"
        ) from None


def _check_weights_only(name: str, path: Path) -> None:
    """RobustBench's loader calls torch.load without weights_only: torch 2.6 and later read
    tensors only by default, earlier ones run the file's pickle. A checkpoint is first read
    here weights_only (memory-mapped: little is read), so no version runs a file's code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many kinds for a damaged or foreign file
        raise RobustBenchLoadError(
            f"model: {PREFIX}{name}: cannot load {path} ({_unloadable(str(path), err)})"
        ) from None


class RobustBenchLoadError(ModelNameError):
    """RobustBench's loader failed. Before a sweep (a local file that does not load) an input
    error; in a trial (a failed download) the trial's failure, recorded with this reason."""


def _architecture(name: str, entry: dict[str, Any]) -> nn.Module:
    try:
        return entry["model"]().eval()
    except Exception as err:  # a zoo entry whose constructor needs what is not here
        why = one_line(err, 160) or type(err).__name__
        raise ModelNameError(f"model: {PREFIX}{name} cannot be built ({why})") from None
