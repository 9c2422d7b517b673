"""What a report shows when a sweep is too big to show whole: filters, top-k and the charts of a
metric against a grid axis (`advlab report --where --top --rank-by --chart --chart-metric`, or
`build_report(..., settings=ReportSettings(...))`).

Every limit here bounds how much one configuration or one section can add to the page, so the
page grows at most linearly with trials: tables list at most `rows` configurations, transfer
matrices are drawn per trial up to `matrix_trials` sources, per configuration (seeds pooled) up
to `matrix_configs`, and beyond that for the top `matrix_configs` with a one-row-per-
configuration summary of the rest.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from advlab.strict import Strict


class ReportSettingsError(ValueError):
    """A report setting that is wrong, or names what the sweeps lack; one line, with the fix."""


TRIAL_METRICS = ("test_error", "train_error", "heldout_error", "val_robust_error")
ATTACK_METRICS = (
    "success_rate", "mean_dist_rms", "median_dist_rms", "mean_dist_l2", "median_dist_l2",
    "mean_dist_linf", "median_dist_linf", "grad_evals", "seconds",
)  # fmt: skip


class Metric(Strict):
    """One number per trial: a trials column, or (with `attack`) a column of that attack's
    runs; a fixed-budget attack is read at `budget` (default: its largest)."""

    column: str = "test_error"
    attack: str | None = None  # an attack label of the sweep (the attacks table's `attack`)
    budget: float | None = None

    @model_validator(mode="after")
    def _known_column(self) -> Metric:
        allowed = TRIAL_METRICS if self.attack is None else ATTACK_METRICS
        if self.column not in allowed:
            where = (
                "a trials column" if self.attack is None else f"a column of {self.attack}'s runs"
            )
            raise ValueError(
                f"metric {self.column!r} is not {where}; use one of {', '.join(allowed)}"
            )
        if self.budget is not None and self.attack is None:
            raise ValueError(f"metric {self.column!r}: a budget needs an attack")
        return self

    @property
    def title(self) -> str:
        if self.attack is None:
            return self.column.replace("_", " ")
        at = "" if self.budget is None else f" at ε = {self.budget:g}"
        return f"{self.attack}{at}: {self.column.replace('_', ' ')}"

    @property
    def is_rate(self) -> bool:
        return self.column.endswith(("error", "rate"))


class ReportSettings(Strict):
    # Configurations kept: every axis named must take one of its listed values (as the page
    # writes them, e.g. {"model": ["fc10"], "weight_decay": ["0.0001"]}).
    where: dict[str, list[str]] = Field(default_factory=dict)
    top: int | None = Field(None, ge=1)  # keep only the best `top` configurations by rank_by
    rank_by: Metric = Metric()  # what "best" means: the mean over seeds, lowest first
    descending: bool = False  # highest first instead
    # Charts of each metric against each grid axis; None: the axes that vary (at most
    # DEFAULT_AXES) and the default metrics (test error, each attack's headline number).
    chart_axes: list[str] | None = None
    chart_metrics: list[Metric] | None = None
    rows: int = Field(50, ge=1)  # table rows (configurations) at most; the best by rank_by
    matrix_trials: int = Field(12, ge=1)  # transfer matrices per trial up to this many sources
    matrix_configs: int = Field(12, ge=1)  # per configuration up to this many, then top ones


def metric_from_text(text: str) -> Metric:
    """A command line's metric: `test_error`, or `ATTACK:COLUMN` with an optional `@BUDGET`
    (`lbfgs:mean_dist_rms`, `fgsm:success_rate@0.1`)."""
    attack, _, rest = text.rpartition(":")
    column, _, budget = rest.partition("@")
    try:
        at = float(budget) if budget else None
    except ValueError:
        raise ReportSettingsError(
            f"metric {text!r}: {budget!r} is not a budget; e.g. fgsm:success_rate@0.1"
        ) from None
    return Metric(column=column, attack=attack or None, budget=at)


def where_from_text(items: list[str]) -> dict[str, list[str]]:
    """`AXIS=VALUE` items; one axis given twice keeps either value."""
    where: dict[str, list[str]] = {}
    for item in items:
        axis, equals, value = item.partition("=")
        if not equals or not axis:
            raise ReportSettingsError(
                f"--where {item}: expected AXIS=VALUE, e.g. --where model=fc10"
            )
        where.setdefault(axis, []).append(value)
    return where


def from_command_line(
    where: list[str], top: int | None, rank_by: str | None, descending: bool,
    chart_axes: list[str], chart_metrics: list[str], rows: int | None,
) -> ReportSettings:  # fmt: skip
    """The settings `advlab report`'s flags give; ReportSettingsError (one line) for a bad one."""
    from pydantic import ValidationError

    try:
        ranks = metric_from_text(rank_by) if rank_by else Metric()
        metrics = [metric_from_text(m) for m in chart_metrics] or None
        chosen = {"rows": rows} if rows is not None else {}
        return ReportSettings(
            where=where_from_text(where), top=top, rank_by=ranks, descending=descending,
            chart_axes=chart_axes or None, chart_metrics=metrics, **chosen,
        )  # fmt: skip
    except ValidationError as err:
        first = err.errors()[0]
        where_ = ".".join(str(p) for p in first["loc"]) or "report"
        raise ReportSettingsError(
            f"{where_}: {first['msg'].removeprefix('Value error, ')}"
        ) from None
