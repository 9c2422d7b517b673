"""advlab: hyperparameter sweeps for the science of adversarial examples.

The Python API (docs/python-api.md); everything here is what the command line does too:

    import advlab
    spec = advlab.sweep_from_dict({...})          # or advlab.load_sweep("sweeps/x.yaml")
    outcome = advlab.run(spec)                    # a Ray Tune sweep; results in parquet + W&B
    res = advlab.load("results/<name>")           # typed, labelled pandas frames
    adv = advlab.attack("pgd", model, x, y, eps=0.1, steps=20)   # any registered attack
    advlab.report(["results/<name>"], "report.html")

Imports are deferred to each call, so `import advlab` stays cheap.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

    from advlab.attacks.base import AttackResult
    from advlab.results import Results
    from advlab.sweep import SweepOutcome
    from advlab.sweepfile import SweepSpec

__version__ = version("advlab")  # pyproject.toml's, as installed
__all__ = ["attack", "load", "load_sweep", "report", "run", "sweep_from_dict"]


def load_sweep(path: str | Path, **overrides: Any) -> SweepSpec:
    """A sweep file, validated; overrides are dotted keys, as `--set` takes them:
    `advlab.load_sweep("sweeps/quickstart.yaml", **{"train.epochs": 5})`."""
    from advlab.sweepfile import load_sweep as load_file

    return load_file(path, overrides)


def sweep_from_dict(mapping: dict[str, Any], base_dir: str | Path = ".") -> SweepSpec:
    """A sweep from a mapping shaped like a sweep file; relative paths and `module:function`
    names resolve against `base_dir` (the current folder by default)."""
    from advlab.sweepfile import add_plugin_dirs, parse_sweep

    folder = Path(base_dir).resolve()
    add_plugin_dirs([str(folder)])
    return parse_sweep(mapping, folder)


def run(
    spec: SweepSpec,
    *,
    address: str | None = None,
    max_concurrent: int | None = None,
    wandb: str | None = None,
    fresh: bool = False,
) -> SweepOutcome:
    """Run the sweep with Ray Tune (a private local Ray unless `address`); returns what landed.
    Bad input raises advlab.spec.SpecError before anything runs."""
    from advlab.sweep import run_sweep

    return run_sweep(
        spec, address=address, max_concurrent=max_concurrent, wandb_mode=wandb, fresh=fresh
    )


def load(path: str | Path) -> Results:
    """A sweep folder's results (advlab.results.load)."""
    from advlab.results import load as load_results

    return load_results(str(path))


def attack(name: str, model: nn.Module, x: Tensor, y: Tensor, **kwargs: Any) -> AttackResult:
    """Run a registered attack by name (advlab.attacks.registry.run_attack)."""
    from advlab.attacks.registry import run_attack

    return run_attack(name, model, x, y, **kwargs)


def report(sweep_dirs: list[str | Path], out: str | Path = "report.html") -> Path:
    """One HTML page comparing the sweeps (advlab.report.build_report)."""
    from advlab.report import build_report

    return build_report([str(d) for d in sweep_dirs], str(out))
