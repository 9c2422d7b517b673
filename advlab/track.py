"""W&B tracking: one run per trial, grouped by sweep. The only module that imports wandb.

Runs are offline unless an API key is set (or the sweep asks for online); offline runs are kept
under the sweep's storage folder and can be uploaded later with `wandb sync`. What makes runs
compare well in W&B's run table and panels: readable names (the trial's label) and tags (its
grid values), summaries that are plain numbers under stable names (best-epoch variants beside
them as `<name>_min`), trained models and the sweep's parquet as artifacts, and one run folder
per run id however often a trial is rerun.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import wandb


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


def recorded_target(recorded: dict[str, Any], mode: str | None = None) -> dict[str, Any]:
    """Where a sweep's own runs (transfer, results) go: the W&B settings its manifest recorded,
    the mode resolved as for its trials unless given, and the sweep's version."""
    settings = recorded.get("wandb", {})
    if mode is None:
        mode, _ = reachable_mode(resolve_mode(settings.get("mode", "auto")))
    return {"mode": mode, "project": settings.get("project", "advlab"),
            "entity": settings.get("entity"),
            "version": max(1, len(recorded.get("versions", [])))}  # fmt: skip


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
        keep_earlier: bool = False,
    ):
        self.run = None
        self.best: dict[str, float] = {}  # smallest value of each epoch metric so far
        if mode == "disabled":
            return
        Path(directory).mkdir(parents=True, exist_ok=True)
        if not keep_earlier:  # a trial run anew replaces its run; one that only grows keeps it
            drop_earlier_runs(directory, run_id)
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
        # Per-epoch curves plot against the epoch; their summary stays W&B's default, the last
        # value, a plain number (a define_metric summary would turn it into {"min": v}).
        self.run.define_metric("epoch")
        self.run.define_metric("train/*", step_metric="epoch")

    def log_epoch(self, metrics: dict[str, float]) -> None:
        if self.run is None:
            return
        logged = {f"train/{k}": v for k, v in metrics.items() if k != "epoch"}
        self.run.log({"epoch": metrics["epoch"]} | logged)
        for key in BEST_OF_EPOCHS:
            value = logged.get(key)
            if isinstance(value, int | float) and value == value:  # not None, not NaN
                self.best[key] = min(value, self.best.get(key, value))

    def flag(self, measure: str, reason: str) -> None:
        """A measure's flag (e.g. possible gradient masking): a tag to filter runs by
        (`<measure>-flagged`) and the reason in the summary (`<measure>/flag`)."""
        if self.run is None:
            return
        self.run.tags = (*(self.run.tags or ()), f"{measure}-flagged")
        self.run.summary.update({f"{measure}/flag": reason})

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Final metrics as plain summary values (numbers stay numbers, sortable in the run
        table), plus the best epoch's value of each training curve as `<name>_min`."""
        if self.run is None:
            return
        plain = {wandb_key(k): v for k, v in summary.items()}
        plain |= {f"{k}_min": v for k, v in self.best.items()}
        self.run.summary.update(plain)

    def log_attack(
        self, attack: str, runs: list[dict[str, Any]], curves: list[dict[str, Any]]
    ) -> None:
        """One attack's rows of the attacks table (its runs) and of the curves table (robust
        error against budget), as W&B tables named after the attack."""
        self.log_tables({f"attacks/{attack}": runs, f"curves/{attack}": curves})

    def log_measure(self, run: str, record: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """One measure run (`measure` or `measure/attack`): its record and its rows, as W&B
        tables named after the run."""
        self.log_tables({f"measure_runs/{run}": [record], f"measures/{run}": rows})

    def log_tables(self, tables: dict[str, list[dict[str, Any]]]) -> None:
        if self.run is None:
            return
        payload = {wandb_key(name): _table(rows) for name, rows in tables.items() if rows}
        if payload:
            self.run.log(payload)

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

    def log_artifact(
        self, name: str, kind: str, files: list[tuple[str, str]], metadata: dict[str, Any]
    ) -> None:
        """Log files as an artifact: (name in the artifact, local path or URI) pairs.

        Local files are referenced where they lie instead of copied to W&B's staging folder
        (policy immutable): results live on storage every node sees, so `wandb sync` finds them
        from wherever it runs, and nothing is copied twice. A URI (s3://, gs://) is logged as a
        reference. Offline, the artifact waits in the run's log for `wandb sync`.
        """
        if self.run is None or not files:
            return
        artifact = wandb.Artifact(name, type=kind, metadata=metadata)
        for inside, where in files:
            if "://" in where:
                artifact.add_reference(where, name=inside)
            else:
                artifact.add_file(where, name=inside, policy="immutable")
        self.run.log_artifact(artifact)

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
            wandb.teardown()  # stop the service now, not in an atexit hook Ray may cut short


BEST_OF_EPOCHS = ("train/test_error", "train/loss")  # also summarised as their best epoch
_RUN_FOLDER = re.compile(r"^(offline-)?run-\d{8}_\d{6}-(?P<id>.+)$")  # how wandb names them


def drop_earlier_runs(directory: str, run_id: str) -> None:
    """Remove the local folders of earlier runs with this id (a rerun trial, a retried
    worker): W&B starts a new folder per start, so a rerun sweep would otherwise hold two runs
    of one id, and `wandb sync` would upload both into one run."""
    for folder in Path(directory, "wandb").glob("*run-*"):
        found = _RUN_FOLDER.match(folder.name)
        if found and found["id"] == run_id and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def sweep_run(
    *,
    mode: str,
    project: str,
    entity: str | None,
    group: str,
    directory: str,
    job: str,
    version: int = 1,
) -> TrialRun:
    """A run of the whole sweep (its transfer stage, its results), one per version of the sweep
    (`<sweep>-<job>-v<n>`): a sweep that grows gets new runs, and its earlier ones stay."""
    return TrialRun(
        mode=mode, project=project, entity=entity, group=group, run_id=f"{group}-{job}-v{version}",
        name=f"{group}: {job} v{version}", config={"sweep": group, "version": version},
        directory=directory, job_type=job, tags=[job],
    )  # fmt: skip


TABLE_ROWS = wandb.Table.MAX_ROWS  # rows W&B keeps of a logged table (it drops the rest)


def log_transfer_run(
    *,
    rows: list[dict[str, Any]],
    total_rows: int,
    summary: Any,
    matrices: dict[str, Any],
    figures: dict[str, bytes],
    **where: Any,
) -> None:
    """One run per sweep (job type 'transfer'): the pooled summary (a pandas DataFrame: per
    attack, budget, kind and relation of target to source), the transfer table with readable
    labels when W&B keeps all of it (`rows`; else empty, and the run's summary says where the
    whole table is), each matrix as a table (sources as rows, targets as columns) and as a
    labelled heatmap figure.

    matrices: name -> pandas DataFrame (index: source labels, columns: target labels);
    figures: name -> PNG bytes of the same matrix drawn with axis titles and cell values.
    """
    if where["mode"] == "disabled" or not total_rows:
        return
    run = sweep_run(job="transfer", **where)
    assert run.run is not None
    payload: dict[str, Any] = {"transfer_summary": wandb.Table(dataframe=summary)}
    if rows:
        payload["transfer"] = _table(rows)
    for name, frame in matrices.items():
        # a pair not measured (pairs: sample) is an empty cell
        wide = frame.astype(object).where(frame.notna(), None).reset_index(names="examples made on")
        payload[f"transfer_matrix/{name}"] = wandb.Table(dataframe=wide)
    for name, image in figures.items():
        payload[f"transfer_heatmap/{name}"] = wandb.Image(
            _png(image), caption=f"{name}: error of each column's model on each row's examples"
        )
    run.run.log(payload)
    run.run.summary["transfer/rows"] = total_rows
    if not rows:
        run.run.summary["transfer/table"] = (
            f"{total_rows} rows, over the {TABLE_ROWS} W&B keeps of a table: see transfer/ "
            "in the results artifact"
        )
    run.finish()


def log_results_run(
    *, files: list[tuple[str, str]], metadata: dict[str, Any], **where: Any
) -> None:
    """The sweep's parquet tables and sweep.json as one artifact (type 'results') of a run
    of job type 'results', so a dashboard can pull the data behind its panels."""
    if where["mode"] == "disabled" or not files:
        return
    run = sweep_run(job="results", **where)
    run.log_artifact(f"{where['group']}-results", "results", files, metadata)
    run.finish()


def _table(rows: list[dict[str, Any]]) -> wandb.Table:
    columns = list(rows[0])
    return wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])


def _png(data: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(data))


def wandb_key(key: str) -> str:
    """W&B sorts and filters only names made of letters, digits, '_' (and '/' groups), so a
    budget suffix becomes `_at_0_1`: `fgsm/robust_error@0.1` -> `fgsm/robust_error_at_0_1`."""
    return key.replace("@", "_at_").replace(".", "_")
