"""The attack contract: argument checks, the result record and helpers shared by every attack.

An attack takes a model (float32 inputs in [0,1] of shape (B, C, H, W) -> logits (B, K)), inputs
and labels, and returns an `AttackResult`. It never changes the model: it runs it in eval mode,
restores the previous mode afterwards and leaves no gradients on the parameters.

Every attack's knobs live in one place: a `Settings` model in the attack's module, with their
defaults, bounds and cross-field checks. The attack function takes one (`settings=`) and/or
keyword overrides of its fields, merged and validated by `merged_settings`; the registry and the
sweep files validate the same model.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from advlab.measure import distortions
from advlab.runtime import eval_mode, model_device, predict
from advlab.strict import Strict

# How far outside [0, 1] a pixel may sit and still count as inside: a few float32 roundings of
# values in [0, 1] (one step of float32 at 1.0 is 2**-23, about 1.2e-7) stay under it, while
# any perturbation an image can show (1/255, about 3.9e-3) is thousands of times more.
BOX_TOLERANCE = 1e-6


class AttackError(ValueError):
    """A bad argument to an attack; the message names the argument and the fix in one line."""


# --------------------------------------------------------------------------- settings


class Settings(Strict):
    """Base of every attack's settings (advlab.strict's rules): unknown keys are refused, values
    are immutable; a count must be an int (2.0 is refused, not rounded) and a flag a bool, in
    sweep files and Python calls alike; a float field takes an int."""


SettingsT = TypeVar("SettingsT", bound=Settings)


def validated_settings(cls: type[SettingsT], values: Mapping[str, Any], attack: str) -> SettingsT:
    """`cls` validated from a plain mapping; AttackError naming the key and the fix otherwise."""
    try:
        return cls.model_validate(dict(values))
    except ValidationError as err:
        raise _settings_error(err, cls, attack) from None


def merged_settings(
    cls: type[SettingsT], settings: SettingsT | None, overrides: Mapping[str, Any], attack: str
) -> SettingsT:
    """`settings` (the defaults when None) with `overrides` replacing its fields, validated.

    How every attack function turns `settings=` and its keyword overrides into the one model it
    runs on: `ddn(model, x, y, steps=50)` is `ddn(model, x, y, settings=DDNSettings(steps=50))`.
    """
    if settings is None:
        return validated_settings(cls, overrides, attack)
    if not isinstance(settings, cls):
        raise AttackError(
            f"settings: expected a {cls.__name__}, got {type(settings).__name__}; "
            f"build one with {cls.__name__}(...) or pass its fields as keywords"
        )
    if not overrides:
        return settings
    given = settings.model_dump(exclude_unset=True)
    return validated_settings(type(settings), {**given, **overrides}, attack)


def _settings_error(err: ValidationError, cls: type[Settings], attack: str) -> AttackError:
    """The first problem of a validation error as one line that names the key and the fix."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if not key:  # a check across fields, whose message names them
        return AttackError(first["msg"].removeprefix("Value error, "))
    if first["type"] == "extra_forbidden":
        known = sorted(cls.model_fields)
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            hint = f"did you mean {close[0]!r}?"
        else:
            hint = f"its settings: {', '.join(known)}" if known else "it has no settings"
        return AttackError(f"{key}: not a setting of {attack}; {hint}")
    return AttackError(f"{key}: {first['msg']} (got {first.get('input')!r})")


@dataclass
class AttackResult:
    """What every attack returns, one row per example."""

    x_adv: Tensor  # (B, C, H, W), inside [0, 1]
    success: Tensor  # (B,) bool: targeted -> pred == target, untargeted -> pred != label
    adv_pred: Tensor  # (B,) int64 model prediction on x_adv
    target: Tensor  # (B,) int64 target class, -1 when untargeted
    grad_evals: Tensor  # (B,) int64 gradient evaluations spent on each example


def check_result(result: Any, x: Tensor) -> None:
    """Raise AttackError unless `result` keeps the contract for the batch `x`: an AttackResult,
    finite points of x's shape inside [0, 1], one success, prediction, target and count per
    example. A plug-in attack's NaN or out-of-box points would otherwise be scored (a NaN
    point as a failed attack) and written as if they were adversarial examples."""
    if not isinstance(result, AttackResult):
        raise AttackError(f"returned a {type(result).__name__}, not an AttackResult")
    points = result.x_adv
    if not isinstance(points, Tensor) or points.shape != x.shape:
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise AttackError(f"returned points of shape {shape} for a batch of {tuple(x.shape)}")
    if not torch.isfinite(points).all():
        raise AttackError("returned NaN or infinite points")
    if len(points) and (points.min() < -BOX_TOLERANCE or points.max() > 1 + BOX_TOLERANCE):
        raise AttackError("returned points outside the [0, 1] box; clamp them (see finish)")
    for name in ("success", "adv_pred", "target", "grad_evals"):
        value = getattr(result, name)
        if not isinstance(value, Tensor) or tuple(value.shape) != (len(x),):
            raise AttackError(f"returned {name} not of shape ({len(x)},)")


def check_inputs(x: Tensor, y: Tensor, target: Tensor | None = None) -> None:
    """Raise AttackError unless x is a finite float batch in [0,1] with matching labels/targets."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise AttackError("x: expected a float tensor of shape (B, C, H, W); convert with .float()")
    batch = x.shape[0]
    if not torch.isfinite(x).all():
        raise AttackError("x: contains NaN or inf; attack finite images with pixels in [0, 1]")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise AttackError(
            f"x: pixels must lie in [0, 1], got [{x.min().item():.4g}, {x.max().item():.4g}]; "
            "rescale the inputs (e.g. divide by 255) before attacking"
        )
    _check_labels("y", y, batch)
    if target is None:
        return
    _check_labels("target", target, batch)
    if (target == y.to(target.device)).any():
        raise AttackError("target: equals the label for some examples; pick a different class")


def _check_labels(name: str, labels: Tensor, batch: int) -> None:
    """Labels must be a (B,) integer tensor of non-negative classes."""
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise AttackError(f"{name}: expected an integer tensor of class indices; use .long()")
    if labels.shape != (batch,):
        raise AttackError(
            f"{name}: expected shape ({batch},) to match x, got {tuple(labels.shape)}"
        )
    if labels.numel() and labels.min() < 0:
        raise AttackError(f"{name}: class indices must be >= 0")


def check_num_classes(num_classes: int, *labels: Tensor | None) -> None:
    """Raise AttackError unless every class index is below num_classes (and there are two)."""
    if num_classes < 2:
        raise AttackError(f"num_classes: need at least 2 classes, got {num_classes}")
    for lab in labels:
        if lab is not None and lab.numel() and lab.max() >= num_classes:
            raise AttackError(
                f"labels: class {lab.max().item()} is out of range for {num_classes} classes"
            )


def check_budget(name: str, value: float) -> float:
    """A perturbation budget must be a finite number >= 0."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise AttackError(f"{name}: must be a finite number >= 0, got {value}")
    return value


def random_wrong_targets(y: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """A uniformly random class != y per example, drawn from `generator` (CPU) so runs repeat."""
    check_num_classes(num_classes, y)
    # Drawing an offset in [1, K) and wrapping can never land on y and stays uniform.
    offset = torch.randint(1, num_classes, (y.shape[0],), generator=generator, device="cpu")
    return (y.cpu().long() + offset).remainder(num_classes).to(y.device)


def finish(
    model: nn.Module,
    x_adv: Tensor,
    y: Tensor,
    target: Tensor | None,
    grad_evals: Tensor,
) -> AttackResult:
    """Build the result, recomputing predictions and success from the model on x_adv."""
    x_adv = x_adv.detach().clamp(0.0, 1.0)
    adv_pred = predict(model, x_adv)
    if target is None:
        success = adv_pred != y
        target_out = torch.full_like(y, -1, dtype=torch.int64)
    else:
        success = adv_pred == target
        target_out = target.long()
    return AttackResult(
        x_adv=x_adv,
        success=success,
        adv_pred=adv_pred.long(),
        target=target_out,
        grad_evals=grad_evals.long().to(x_adv.device),
    )


# --------------------------------------------------------------------------- targets and modes

# How an attack picks its goal. A tensor gives one target class per example; "random" draws a
# wrong class per example from the generator; "untargeted" asks for any wrong prediction; "all"
# attacks every wrong class and keeps the closest success (an untargeted result).
TargetMode = Literal["random", "untargeted", "all"]
Target = Tensor | TargetMode | None
TARGET_MODES: tuple[str, ...] = ("random", "untargeted", "all")

NORMS: tuple[str, ...] = ("linf", "l2")


def check_norm(norm: str) -> str:
    """An attack norm must be "linf" or "l2"."""
    if norm not in NORMS:
        raise AttackError(f"norm: unknown norm {norm!r}; use 'linf' or 'l2'")
    return norm


def check_target_mode(target: Target, allowed: tuple[str, ...] = TARGET_MODES) -> None:
    """A target must be a tensor, None or one of the allowed mode names."""
    if target is None or isinstance(target, Tensor):
        return
    if not isinstance(target, str) or target not in allowed:
        raise AttackError(
            f"target: expected a tensor of classes or one of {', '.join(map(repr, allowed))}, "
            f"got {target!r}"
        )


def num_classes_of(model: nn.Module, x: Tensor, num_classes: int | None) -> int:
    """num_classes if given, else the model's output width on the first example."""
    if num_classes is not None:
        return int(num_classes)
    with eval_mode(model), torch.no_grad():
        return int(model(x[:1]).shape[1])


def prepare(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Target,
    *,
    num_classes: int | None,
    generator: torch.Generator | None,
    default: TargetMode,
    allowed: tuple[str, ...] = TARGET_MODES,
) -> tuple[Tensor, Tensor, Tensor | str | None, int]:
    """Check the arguments and move them to the model's device; (x, y, target, num_classes).

    The returned target is a (B,) tensor (given or drawn at random), None for untargeted, or the
    string "all" for the caller to dispatch through `run_targets`.
    """
    check_target_mode(target, allowed)
    check_inputs(x, y, target if isinstance(target, Tensor) else None)
    device = model_device(model)
    x, y = x.to(device), y.to(device).long()
    k = num_classes_of(model, x, num_classes)
    mode = default if target is None else target
    if isinstance(mode, Tensor):
        resolved: Tensor | str | None = mode.to(device).long()
    elif mode == "random":
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        resolved = random_wrong_targets(y, k, gen)
    elif mode == "untargeted":
        resolved = None
    else:
        resolved = "all"
    check_num_classes(k, y, resolved if isinstance(resolved, Tensor) else None)
    return x, y, resolved, k


def linearized_distances(model: nn.Module, x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """(B, K) DeepFool's first-order L2 distance to each class's boundary at x (inf at y).

    |z_k - z_y| / ||grad(z_k - z_y)||, from one backward pass per class.
    """
    xg = x.detach().requires_grad_(True)
    logits = model(xg)
    own = logits.gather(1, y[:, None]).squeeze(1)
    out = torch.full((len(x), num_classes), math.inf, dtype=x.dtype, device=x.device)
    for k in range(num_classes):
        gap = logits[:, k] - own
        (grad,) = torch.autograd.grad(gap.sum(), xg, retain_graph=k < num_classes - 1)
        dist = gap.detach().abs() / grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        out[:, k] = torch.where(y == k, math.inf, dist)
    return out


def closest_over_targets(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    attack: Callable[[Tensor, Tensor, Tensor], AttackResult],
    norm: str = "l2",
    candidates: int | None = None,
) -> AttackResult:
    """Run a targeted attack at every wrong class and keep each example's closest success.

    `attack(x, y, target)` is called once on the batch repeated once per target (target-major),
    so the whole search is one batched run; the result is untargeted (target -1). Grad evals add
    up over the targets. Examples no target was reached for keep the clean input.

    candidates=k attacks only the k wrong classes whose linearised boundary is nearest at x
    (`linearized_distances`, K extra gradient evaluations per example): on the FC nets of the
    benchmark the closest class found by all K-1 runs is among the first 3 for nearly every
    example, at a third of the cost.
    """
    b, k = len(x), num_classes
    extra = torch.zeros(b, dtype=torch.int64, device=x.device)
    if candidates is None or candidates >= k - 1:
        offsets = torch.arange(1, k, device=x.device)
        targets = (y[None, :] + offsets[:, None]).remainder(k)  # (k - 1, b)
    else:
        if candidates < 1:
            raise AttackError(f"candidates: must be an integer >= 1, got {candidates}")
        est = linearized_distances(model, x, y, k)
        targets = est.argsort(dim=1, stable=True)[:, :candidates].T.contiguous()
        extra += k
    n_t = targets.shape[0]
    reps = (n_t, *[1] * (x.ndim - 1))
    rep = attack(x.repeat(reps), y.repeat(n_t), targets.reshape(-1))
    dist = distortions(x.repeat(reps), rep.x_adv)[norm]
    dist = torch.where(rep.success, dist, torch.full_like(dist, math.inf)).view(n_t, b)
    best = dist.argmin(dim=0)
    found = torch.isfinite(dist.gather(0, best[None]).squeeze(0))
    pick = best * b + torch.arange(b, device=x.device)
    x_adv = torch.where(found.view(-1, *[1] * (x.ndim - 1)), rep.x_adv[pick], x)
    evals = rep.grad_evals.view(n_t, b).sum(dim=0) + extra
    with eval_mode(model):
        return finish(model, x_adv, y, None, evals)


def run_targets(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    resolved: Tensor | str | None,
    num_classes: int,
    attack: Callable[[Tensor, Tensor, Tensor | None], AttackResult],
    *,
    norm: str = "l2",
    candidates: int | None = None,
    attack_all: Callable[[Tensor, Tensor, Tensor], AttackResult] | None = None,
) -> AttackResult:
    """Run `attack(x, y, target)` in eval mode for a target `prepare` resolved.

    "all" goes through `closest_over_targets`, calling `attack_all` (default `attack`) on the
    batch repeated once per target, for attacks that use that layout.
    """
    with eval_mode(model):
        if isinstance(resolved, str):  # "all"
            run = attack if attack_all is None else attack_all
            return closest_over_targets(
                model, x, y, num_classes, run, norm=norm, candidates=candidates
            )
        return attack(x, y, resolved)


def adversarial_margin(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """(B,) how far each row is inside the adversarial region, in logits (> 0: adversarial).

    Targeted: target logit minus the best other; untargeted: best wrong logit minus the label's.
    """
    cls = y if target is None else target
    own = logits.gather(1, cls[:, None]).squeeze(1)
    others = logits.scatter(1, cls[:, None], -math.inf).amax(dim=1)
    return others - own if target is None else own - others


def is_adversarial(logits: Tensor, y: Tensor, target: Tensor | None, margin: float = 0.0) -> Tensor:
    """(B,) bool: adversarial by more than `margin` logits (margin 0: the argmax criterion).

    A small positive margin keeps a kept image from flipping back under the float round-off of
    a different batch size.
    """
    return adversarial_margin(logits, y, target) > margin


# --------------------------------------------------------------------------- randomness


def example_generators(
    x: Tensor, generator: torch.Generator | None, keys: Tensor | None = None
) -> list[torch.Generator]:
    """One CPU generator per example, seeded by one draw from `generator` and the example's bytes.

    `keys` (B,) integers, e.g. targets, are mixed in so the same image attacked toward different
    classes draws different noise.

    Why: a random start drawn as one (B, ...) tensor would give example i different noise in a
    different batch. Keying each example's stream on its own pixels makes an example's random
    draws, and so its result, independent of its batch-mates and of its position in the batch.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    base = int(torch.randint(0, 2**62, (1,), generator=gen).item()).to_bytes(8, "little")
    pixels = x.detach().flatten(1).cpu().contiguous().numpy()
    extra = (
        [b""] * len(pixels)
        if keys is None
        else [int(k).to_bytes(8, "little", signed=True) for k in keys.tolist()]
    )
    seeds = [
        int.from_bytes(hashlib.blake2b(base + e + row.tobytes(), digest_size=8).digest(), "little")
        for row, e in zip(pixels, extra, strict=True)
    ]
    return [torch.Generator().manual_seed(seed & (2**63 - 1)) for seed in seeds]


def example_randn(gens: list[torch.Generator], shape: tuple[int, ...], like: Tensor) -> Tensor:
    """(B, *shape) standard normal draws, row i from gens[i], on like's device and dtype."""
    rows = [torch.randn(shape, generator=g, dtype=like.dtype) for g in gens]
    out = torch.stack(rows) if rows else torch.empty((0, *shape), dtype=like.dtype)
    return out.to(like.device)


def example_rand(gens: list[torch.Generator], shape: tuple[int, ...], like: Tensor) -> Tensor:
    """(B, *shape) uniform [0, 1) draws, row i from gens[i], on like's device and dtype."""
    rows = [torch.rand(shape, generator=g, dtype=like.dtype) for g in gens]
    out = torch.stack(rows) if rows else torch.empty((0, *shape), dtype=like.dtype)
    return out.to(like.device)


# --------------------------------------------------------------------------- refinement


@torch.no_grad()
def shrink_toward_input(
    model: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    target: Tensor | None,
    steps: int,
    margin: float = 1e-5,
) -> Tensor:
    """Bisect each successful x + a (x_adv - x), a in (0, 1], for the smallest a still adversarial.

    A convex combination of two points in the box stays in the box. Rows that are not adversarial
    at a = 1 are returned unchanged; the returned point is always adversarial where x_adv was.
    """
    if steps <= 0 or len(x) == 0:
        return x_adv
    ok = is_adversarial(model(x_adv), y, target, margin)
    lo = torch.zeros(len(x), dtype=x.dtype, device=x.device)  # largest a known to fail
    hi = torch.ones_like(lo)  # smallest a known to succeed
    delta = x_adv - x
    view = (-1, *[1] * (x.ndim - 1))
    for _ in range(steps):
        mid = (lo + hi) / 2
        adv = is_adversarial(model(x + mid.view(view) * delta), y, target, margin)
        hi = torch.where(adv, mid, hi)
        lo = torch.where(adv, lo, mid)
    shrunk = (x + hi.view(view) * delta).clamp(0.0, 1.0)
    return torch.where(ok.view(view), shrunk, x_adv)
