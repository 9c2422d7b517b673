"""Architectures by name, as the paper names them.

Names are parsed, not looked up, so any width works:

- ``fc10``: softmax regression on the pixels (Flatten + Linear(D, 10)).
- ``fc<h1>-<h2>-...-<K>``: fully connected net with sigmoid hidden layers (``activation="relu"``
  or ``"tanh"`` as options) and K outputs, e.g. fc100-100-10, fc200-200-10, fc123-456-10.
- ``ae<h>-<K>``: :class:`AutoencoderClassifier`, a softmax classifier on an h-unit autoencoder code;
  ``dae``, ``cae`` and ``vae`` the denoising, contractive and variational kinds, their settings
  in ``model_args`` (advlab.autoencoders).
- ``cnn``: a small conv net for any input of at least 4x4 pixels.
- ``resnet18``: torchvision's ResNet-18, CIFAR-style: 3x3 stride-1 first conv, no max-pool.

Every model takes (B, C, H, W) pixels in [0, 1] and returns logits (B, K). Models are not seeded
here: the caller seeds torch before :func:`build_model` for reproducible initial weights.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from advlab.autoencoders import ACTIVATIONS, KINDS, AutoencoderClassifier, build_autoencoder
from advlab.autoencoders import activation_layer as _activation
from advlab.model_errors import ModelNameError, validate_model_args
from advlab.model_errors import unloadable as _unloadable
from advlab.strict import NoSettings, Strict
from advlab.text import one_line

__all__ = [
    "ACTIVATIONS",
    "Architecture",
    "AutoencoderClassifier",
    "ModelNameError",
    "Normalized",
    "SmallCNN",
    "build_model",
    "check_decays",
    "count_parameters",
    "decay_weights",
    "parse_architecture",
]


_FORMS = "use fc10, fc<h1>-...-<K>, ae<h>-<K> (or dae, cae, vae), cnn or resnet18"
# Widths are positive and written without leading zeros, so one architecture has one name.
_WIDTH = r"[1-9][0-9]*"
_FC = re.compile(rf"fc({_WIDTH}(?:-{_WIDTH})*)")
_AE = re.compile(rf"({'|'.join(KINDS)})({_WIDTH})-({_WIDTH})")


@dataclass(frozen=True)
class Architecture:
    """A parsed model name; ``classes`` is the trailing number, None for cnn and resnet18."""

    kind: str  # "fc", "ae", "dae", "cae", "vae", "cnn" or "resnet18"
    hidden: tuple[int, ...]
    classes: int | None


def parse_architecture(name: str) -> Architecture:
    """Parse a model name (see module docstring); raise ModelNameError if it names nothing."""
    if not isinstance(name, str):
        raise ModelNameError(f"model: {name!r} is not an architecture; {_FORMS}")
    if name in ("cnn", "resnet18"):
        return Architecture(kind=name, hidden=(), classes=None)
    if match := _FC.fullmatch(name):
        widths = tuple(int(w) for w in match.group(1).split("-"))
        return Architecture(kind="fc", hidden=widths[:-1], classes=widths[-1])
    if match := _AE.fullmatch(name):
        hidden, classes = int(match.group(2)), int(match.group(3))
        return Architecture(kind=match.group(1), hidden=(hidden,), classes=classes)
    raise ModelNameError(f"model: {name!r} is not an architecture; {_FORMS}")


def _mlp(
    input_shape: tuple[int, int, int], hidden: tuple[int, ...], classes: int, act: str
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), _activation(act)]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """conv32-pool-conv64-pool-fc128-fc K, ReLU, 3x3 'same' convs; any input of at least 4x4."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        if h < 4 or w < 4:
            raise ValueError(
                f"model: cnn needs inputs of at least 4x4 pixels, got {h}x{w}; raise "
                "dataset.resolution to 4 or more, or use an fc model"
            )
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * (h // 4) * (w // 4), 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _resnet18(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    import torchvision  # costs ~1.5 s per process: only when a resnet is asked for

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    # ImageNet's 7x7/2 stem and max-pool would shrink a 32x32 image to 8x8 before the first block.
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    activation: str = "sigmoid",
    model_args: dict[str, Any] | None = None,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    weights: str = "load",
) -> nn.Module:
    """Build the model ``name`` for inputs of ``input_shape`` (C, H, W): one lookup for all.

    ``name`` is a built-in architecture (below), ``torchvision:<name>`` (torchvision's model,
    untrained, its first convolution adapted to the data's channels) or ``timm:<name>`` (timm's,
    untrained or from a local weights file, `model_args.pretrained`) or ``robustbench:<name>``
    (RobustBench's zoo, its weights read by RobustBench's loader as ``weights`` says:
    advlab.robustbench_models); your own factories by import path resolve in
    advlab.families, which wraps what they return with :func:`finish`.
    ``activation`` sets the hidden units of fc nets and the autoencoder's encoder; cnn and
    resnet18 always use ReLU and ignore it. ``normalize`` = (mean, std) per channel wraps the
    model so it takes [0, 1] pixels and standardises them itself (:class:`Normalized`).
    """
    input_shape = tuple(int(s) for s in input_shape)
    if name.startswith("torchvision:"):
        model = _torchvision_model(name.partition(":")[2], input_shape, num_classes, model_args)
    elif name.startswith("timm:"):
        model = _timm_model(name.partition(":")[2], input_shape, num_classes, model_args)
    elif name.startswith("robustbench:"):
        from advlab.robustbench_models import robustbench_model

        name = name.partition(":")[2]
        model = robustbench_model(name, input_shape, num_classes, model_args, weights)
    else:
        model = _builtin_model(name, input_shape, num_classes, activation, model_args or {})
    return model if normalize is None else Normalized(model, *normalize)


def model_settings(name: str, model_args: dict[str, Any]) -> Strict | None:
    """A built-in architecture's model_args as its settings model (the autoencoders take
    some, every other built-in none); ModelNameError in one line naming the bad key."""
    arch = parse_architecture(name)
    if arch.kind not in KINDS or KINDS[arch.kind][1] is NoSettings:
        if model_args:
            raise ModelNameError(f"model_args: {name} is built in and takes none; drop them")
        return None
    return validate_model_args(name, KINDS[arch.kind][1], model_args)


def _builtin_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    activation: str,
    model_args: dict[str, Any],
) -> nn.Module:
    arch = parse_architecture(name)
    settings = model_settings(name, model_args)
    _activation(activation)  # reject typos even where the value goes unused (fc10, cnn, resnet18)
    if arch.classes is not None and arch.classes != num_classes:
        fixed = name[: name.rfind(str(arch.classes))] + str(num_classes)
        raise ModelNameError(
            f"model: {name!r} ends in {arch.classes} classes but the dataset has {num_classes}; "
            f"use {fixed}"
        )
    if arch.kind == "fc":
        return _mlp(input_shape, arch.hidden, num_classes, activation)
    if arch.kind in KINDS:  # ae takes no settings (None), the other kinds theirs
        width = arch.hidden[0]
        return build_autoencoder(arch.kind, input_shape, width, num_classes, activation, settings)
    if arch.kind == "cnn":
        return SmallCNN(input_shape, num_classes)
    return _resnet18(input_shape, num_classes)


def _torchvision_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, model_args: dict[str, Any] | None
) -> nn.Module:
    import torchvision  # costs ~1.5 s per process: only when asked for

    try:
        model = torchvision.models.get_model(
            name, weights=None, num_classes=num_classes, **(model_args or {})
        )
    except (ValueError, TypeError) as err:
        raise ModelNameError(
            f"model: torchvision:{name} cannot be built ({err}); "
            "see torchvision.models.list_models()"
        ) from None
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != input_shape[0]:
        _replace_module(model, first, _with_in_channels(first, input_shape[0]))
    return model


def _timm_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, model_args: dict[str, Any] | None
) -> nn.Module:
    """timm's model `name` for this data's channels and classes; `pretrained` is a local file
    of weights, read here (weights_only) and handed to timm, which adapts the first
    convolution to the channels and drops a classifier of another class count."""
    try:
        import timm
    except ImportError:
        raise ModelNameError(f"model: timm:{name} needs timm; pip install 'advlab[timm]'") from None
    args = dict(model_args or {})
    weights = args.pop("pretrained", None)
    if weights is not None and not (isinstance(weights, str) and os.path.isfile(weights)):
        raise ModelNameError(
            f"model_args.pretrained: {weights!r} is no local file; give the path of a weights "
            "file (.pth, .pt or .safetensors): advlab downloads no weights"
        )
    if not timm.is_model(name):
        raise ModelNameError(f"model: timm:{name} is no timm model; see timm.list_models()")
    extra: dict[str, Any] = {}
    if weights is not None:
        extra = {
            "pretrained": True,
            "pretrained_cfg_overlay": {
                "state_dict": read_weights(weights, "model_args.pretrained")
            },
        }
    try:
        return timm.create_model(
            name, num_classes=num_classes, in_chans=input_shape[0], **extra, **args
        )
    except Exception as err:  # timm raises many kinds for arguments or weights that do not fit
        why = one_line(err, 200) or type(err).__name__
        raise ModelNameError(f"model: timm:{name} cannot be built ({why})") from None


def _with_in_channels(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    return nn.Conv2d(
        channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups if conv.groups == 1 else channels, conv.bias is not None,
    )  # fmt: skip


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is old:
                setattr(parent, child_name, new)
                return


class Normalized(nn.Module):
    """A model that takes [0, 1] pixels and standardises them per channel itself, so attacks,
    budgets and distortions stay in pixel space whatever normalisation the model expects."""

    def __init__(self, inner: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.standardize = Standardize(mean, std)
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(self.standardize(x))

    def decay_weights(self) -> list[nn.Parameter]:
        return decay_weights(self.inner)


class Standardize(nn.Module):
    """(x - mean) / std per channel; its Lipschitz constant is max(1 / std)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError("normalize: give one mean and one std > 0 per channel")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def decay_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weight matrices and conv kernels (no biases, no norm scales), input to output.

    These are what per-layer weight-decay lambdas index: fc100-100-10 has 3, fc10 has 1. For
    ae<h>-<K> they are the encoder and the classifier; the decoder is excluded (see
    :class:`AutoencoderClassifier`). A model may define its own ``decay_weights()`` method.
    """
    own = getattr(model, "decay_weights", None)
    if callable(own):
        return list(own())
    # Registration order is forward order for every model built here (torchvision's ResNet
    # included; a block's downsample shortcut comes after its two convs).
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def check_decays(model: nn.Module, weight_decay: float | Sequence[float], name: str = "") -> int:
    """The number of decayed weight layers; ModelNameError unless `weight_decay` is one number
    or one lambda per layer (the one check of per-layer decays: at validation and training)."""
    layers = len(decay_weights(model))
    if isinstance(weight_decay, Real) and not isinstance(weight_decay, bool):
        return layers
    count = len(list(weight_decay))
    if count != layers:
        which = f"for {name}, which has" if name else "but the model has"
        raise ModelNameError(
            f"weight_decay: {count} values {which} {layers} weight layers; give {layers} "
            "values or one number"
        )
    return layers


def decay_terms(
    model: nn.Module, weight_decay: float | Sequence[float]
) -> list[tuple[float, nn.Parameter]]:
    """(lambda_k, W_k) for every decayed weight; one number applies to every layer."""
    weights = decay_weights(model)
    check_decays(model, weight_decay)
    if isinstance(weight_decay, Real) and not isinstance(weight_decay, bool):
        lambdas = [float(weight_decay)] * len(weights)
    else:
        lambdas = [float(v) for v in weight_decay]
    if any(not lam >= 0 for lam in lambdas):  # also catches nan
        raise ValueError(f"weight_decay: {lambdas} must all be >= 0")
    return list(zip(lambdas, weights, strict=True))


def count_parameters(model: nn.Module) -> int:
    """Number of scalars in all of the model's parameters (an autoencoder's decoder included)."""
    return sum(p.numel() for p in model.parameters())


def finish(
    model: nn.Module,
    normalize: tuple[Sequence[float], Sequence[float]] | None,
    init: str | None,
) -> nn.Module:
    """A built model with the trial's normalisation wrapped around it and its `init` weights
    loaded (built-in, torchvision and your own factories' models alike)."""
    model = model if normalize is None else Normalized(model, *normalize)
    if init is not None:
        load_init(model, init)
    return model


def load_init(model: nn.Module, path: str) -> None:
    """Load starting weights (see `read_weights`) into the model; a Normalized model takes
    them into its inner model."""
    state = read_weights(path)
    target = model.inner if isinstance(model, Normalized) else model
    try:
        target.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        why = one_line(err, 200)
        raise ModelNameError(f"init: {path} does not fit the model ({why})") from None
    for name, value in target.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ModelNameError(
                f"init: {path} holds NaN or infinite values in {name}; save finite weights"
            )


# Where checkpoints keep their weights: advlab's own files, RobustBench's and most training
# scripts' ({"state_dict": ...}, {"model_state_dict": ...}).
_WEIGHT_KEYS = ("model", "state_dict", "model_state_dict")


def read_weights(path: str, key: str = "init") -> dict[str, Any]:
    """A state_dict from a weights file: torch.save'd (read weights_only: a file never runs
    code) or .safetensors; a checkpoint holding it under one of _WEIGHT_KEYS is unwrapped, and
    DataParallel's `module.` prefix (RobustBench checkpoints carry it) is dropped."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path)
        else:
            with warnings.catch_warnings():  # torch's warnings about a foreign pickle
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged or foreign file
        raise ModelNameError(
            f"{key}: cannot load {path} ({_unloadable(path, err)}); save it with torch.save"
        ) from None
    while isinstance(state, dict):
        inner = next((state[k] for k in _WEIGHT_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if isinstance(state, dict) and state and all(str(k).startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state
