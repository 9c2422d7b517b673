"""W&B tracking: one run per trial, grouped by sweep. The only module that imports wandb.

Runs are offline unless an API key is set (or the sweep asks for online); offline runs are kept
under the sweep's storage folder and can be uploaded later with `wandb sync`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import wandb

MASKING_TAG = "possible-gradient-masking"


def resolve_mode(mode: str) -> str:
    """'auto' means online when an API key is available, offline otherwise."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def reachable_mode(mode: str) -> tuple[str, str | None]:
    """Keep 'online' only if W&B accepts the API key; else fall back to offline, with a note.

    Checked once by the driver, so a sweep with no network or a bad key says so once and
    goes on with offline runs instead of every trial failing or hanging on its own.
    """
    if mode != "online":
        return mode, None
    try:
        wandb.Api(timeout=10).viewer  # noqa: B018 - the request is the check
    except Exception as err:
        reason = type(err).__name__
        return "offline", (
            f"W&B is unreachable or refused the API key ({reason}); logging offline runs "
            "instead (upload them later with `wandb sync`)"
        )
    return mode, None


class TrialRun:
    """A trial's W&B run; every call is a no-op when tracking is disabled."""

    def __init__(
        self,
        *,
        mode: str,
        project: str,
        entity: str | None,
        group: str,
        run_id: str,
        name: str,
        config: dict[str, Any],
        directory: str,
        job_type: str = "trial",
        tags: list[str] | None = None,
    ):
        self.run = None
        if mode == "disabled":
            return
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode=mode,  # type: ignore[arg-type]
            project=project,
            entity=entity,
            group=group,
            job_type=job_type,
            id=run_id,
            name=name,
            tags=tags,
            config=config,
            dir=directory,
            reinit="finish_previous",
            resume="allow",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        self.run.define_metric("epoch")
        self.run.define_metric("train/*", step_metric="epoch")
        self.run.define_metric("train/test_error", step_metric="epoch", summary="min")
        self.run.define_metric("train/loss", step_metric="epoch", summary="min")
        self.run.define_metric("train/val_robust_error", step_metric="epoch", summary="min")

    def log_epoch(self, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(
                {"epoch": metrics["epoch"]} | {f"train/{k}": v for k, v in metrics.items()}
            )

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Final metrics, declared so run tables and panels aggregate them the right way."""
        if self.run is None:
            return
        summary = {wandb_key(k): v for k, v in summary.items()}
        numbers = {k: v for k, v in summary.items() if isinstance(v, int | float)}
        for key in numbers:
            goal = summary_goal(key)
            if goal is not None:
                self.run.define_metric(key, summary=goal)
        if numbers:
            self.run.log(numbers)
        self.run.summary.update({k: v for k, v in summary.items() if summary_goal(k) is None})

    def flag_masking(self, reason: str) -> None:
        """Possible gradient masking: a tag to filter runs by, and the reasons in the summary."""
        if self.run is None:
            return
        self.run.tags = (*(self.run.tags or ()), MASKING_TAG)
        self.run.summary.update({"masking_reason": reason})  # the 0/1 flag came with metrics

    def log_curves(self, rows: list[dict[str, Any]]) -> None:
        """The robust-error curves as one table, for plotting error against budget per attack."""
        if self.run is None or not rows:
            return
        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
        self.run.log({"curves": table})

    def log_attacks(self, rows: list[dict[str, Any]]) -> None:
        """The attacks table's rows (one per attack run), for side-by-side panels."""
        if self.run is None or not rows:
            return
        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
        self.run.log({"attacks": table})

    def log_examples(self, attack: str, clean: Any, adversarial: Any, captions: list[str]) -> None:
        """Original, adversarial and the perturbation magnified x10 around gray, as in the
        paper's figures; arrays are (k, C, H, W) in [0, 1]."""
        if self.run is None or len(captions) == 0:
            return
        magnified = np.clip(0.5 + 10 * (adversarial - clean), 0, 1)
        images = []
        for image, kind in ((clean, "original"), (adversarial, "adversarial"), (magnified, "x10")):
            images += [
                wandb.Image(
                    np.moveaxis(img, 0, -1).squeeze(-1)
                    if img.shape[0] == 1
                    else np.moveaxis(img, 0, -1),
                    caption=f"{kind}: {caption}",
                )
                for img, caption in zip(image, captions, strict=True)
            ]
        self.run.log({f"examples/{attack}": images})

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
            wandb.teardown()  # stop the service now, not in an atexit hook Ray may cut short


def log_transfer_run(
    *,
    mode: str,
    project: str,
    entity: str | None,
    group: str,
    directory: str,
    rows: list[dict[str, Any]],
    matrices: dict[str, tuple[list[str], list[str], np.ndarray]],
) -> None:
    """One run per sweep (job type 'transfer') with the transfer table and a heatmap per
    attack: matrices maps a name to (row labels, column labels, errors in [0,1])."""
    if mode == "disabled" or not rows:
        return
    run = TrialRun(
        mode=mode,
        project=project,
        entity=entity,
        group=group,
        run_id=f"{group}-transfer",
        name="transfer",
        config={"sweep": group},
        directory=directory,
        job_type="transfer",
    )
    assert run.run is not None
    columns = list(rows[0])
    payload: dict[str, Any] = {
        "transfer": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
    }
    for name, (row_labels, column_labels, errors) in matrices.items():
        payload[f"transfer_matrix/{name}"] = wandb.Image(
            heatmap(errors),
            caption=f"rows: {', '.join(row_labels)}; columns: {', '.join(column_labels)}",
        )
    run.run.log(payload)
    run.finish()


def heatmap(errors: np.ndarray, cell: int = 24) -> np.ndarray:
    """An RGB image of a matrix in [0,1]: white (0) to red (1), NaN gray, one block per cell."""
    values = np.nan_to_num(errors, nan=-1.0)
    red = np.where(values < 0, 0.8, 1.0)
    other = np.where(values < 0, 0.8, 1.0 - values)
    image = np.stack([red, other, other], axis=-1)
    return np.kron(image, np.ones((cell, cell, 1))).astype(np.float32)


def wandb_key(key: str) -> str:
    """W&B sorts and filters only names made of letters, digits, '_' (and '/' groups), so a
    budget suffix becomes `_at_0_1`: `fgsm/robust_error@0.1` -> `fgsm/robust_error_at_0_1`."""
    return key.replace("@", "_at_").replace(".", "_")


def summary_goal(key: str) -> str | None:
    """How a final metric is summarised across a run: clean errors and distortions by their
    smallest value, attack success and robust error by their largest (the worst case)."""
    if "mean_dist_" in key or key in {"train_error", "test_error", "heldout_error"}:
        return "min"
    if "/robust_error_at_" in key or "/success" in key or key == "gradient_masking":
        return "max"
    return None
