"""Training curves: test error and training loss after each epoch, mean over seeds."""

from __future__ import annotations

import altair as alt
import pandas as pd

from advlab.report import charts
from advlab.report.html import chart, chart_row, section
from advlab.report.load import Compared
from advlab.stats import with_counts
from advlab.tables import RATE_COUNTS

# metric, title, axis format, largest value it can take
CURVES = (("test_error", "test error", ".0%"), ("loss", "training loss", ".3~g"))


def epoch_rows(compared: Compared, metric: str) -> pd.DataFrame:
    """Per configuration and epoch: the mean of `metric` over seeds (epochs without it left out)."""
    epochs = compared.epochs
    ok = set(compared.ok_trials["trial_id"])
    mine = epochs[epochs["trial_id"].isin(ok) & epochs[metric].notna()]
    frame = mine.assign(value=mine[metric].astype(float))
    # test error: a share of the test set, whose size is in the trial's row
    frame, count = with_counts(frame, compared.ok_trials, RATE_COUNTS.get(("epochs", metric)))
    return charts.summarise(frame, ["epoch"], "value", count=count)


def render(compared: Compared) -> str:
    if compared.epochs.empty:
        return ""
    items = []
    for metric, title, fmt in CURVES:
        rows = epoch_rows(compared, metric)
        if rows.empty:
            continue
        spec = charts.trend(
            rows, compared.configs, x=alt.X("epoch:Q", title="epoch", axis=alt.Axis(tickMinStep=1)),
            y_title=title, title=f"{title} after each epoch", y_format=fmt,
            extra_tooltip=[alt.Tooltip("epoch:Q")],
        )  # fmt: skip
        items.append(chart(f"training-{metric}", spec, shows="training", metric=metric))
    intro = (
        "Means over seeds, bands their 95% interval (the test error's over seeds and test "
        "examples; each chart's subtitle names its method), hollow points each seed."
    )
    return section("training", "Training curves", chart_row(items), intro) if items else ""
