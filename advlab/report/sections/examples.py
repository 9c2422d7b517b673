"""Adversarial examples: for each configuration, its first seed's first few successful examples
of its first minimisation attack (else of its first attack at the largest budget)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from advlab.report.html import esc, section
from advlab.report.images import CleanImages, image_shape, magnified, png_uri
from advlab.report.load import Compared, Config

PER_TRIAL = 3
MAX_CONFIGS = 16  # keeps the page light for big sweeps


def chosen_run(attacks: pd.DataFrame, trial_id: str) -> tuple[str, float | None] | None:
    """(attack, budget) to show for a trial: minimisation first, else the largest budget."""
    mine = attacks[attacks["trial_id"] == trial_id]
    if mine.empty:
        return None
    minimising = mine[mine["kind"] == "minimization"]
    if not minimising.empty:
        return str(minimising["attack"].iloc[0]), None
    first = mine[mine["attack"] == mine["attack"].iloc[0]]
    return str(first["attack"].iloc[0]), float(first["budget"].max())


def picked_examples(examples: pd.DataFrame, attack: str, budget: float | None) -> pd.DataFrame:
    """The first successful examples in order (the first unsuccessful ones when none is)."""
    mine = examples[examples["attack"] == attack]
    mine = mine[mine["budget"].isna()] if budget is None else mine[mine["budget"] == budget]
    mine = mine.sort_values("example")
    return pd.concat(
        [mine[mine["success"].fillna(False)], mine[~mine["success"].fillna(False)]]
    ).head(PER_TRIAL)


def render(compared: Compared) -> str:
    clean = CleanImages()
    cards = []
    examples_by_sweep: dict[str, pd.DataFrame] = {}
    ok = set(compared.ok_trials["trial_id"])
    for config in compared.configs[:MAX_CONFIGS]:
        trial = next((t for t in config.trial_ids if t in ok), None)
        run = compared.runs[compared.sweep_names.index(config.sweep)]
        choice = chosen_run(compared.attacks, trial) if trial else None
        if trial is None or choice is None:
            continue
        if config.sweep not in examples_by_sweep:
            examples_by_sweep[config.sweep] = run.examples(images=True)
        mine = examples_by_sweep[config.sweep]
        rows = picked_examples(mine[mine["trial_id"] == trial], *choice)
        spec = json.loads(run.trials.set_index("trial_id").loc[trial, "spec"])
        dirs = (run.manifest or {}).get("plugin_dirs", [])
        records = rows.to_dict("records")
        originals = [clean.original(spec, row, dirs) for row in records]
        cards.append(_card(config, trial, choice, records, originals))
    if not cards:
        return ""
    intro = (
        "Original, adversarial, and the perturbation magnified ×10 around gray, as in the paper's "
        "figures; caption: true label → prediction on the adversarial image, rms distortion."
    )
    notes = "".join(
        f'<p class="note">No clean images for {esc(n)} ({esc(p)}): adversarial images only.</p>'
        for n, p in clean.problems.items()
    )
    more = len(compared.configs) - MAX_CONFIGS
    if more > 0:
        notes += (
            f'<p class="note">The first {MAX_CONFIGS} configurations; {more} more not shown.</p>'
        )
    return section(
        "examples",
        "Adversarial examples",
        notes + f'<div class="examples">{"".join(cards)}</div>',
        intro,
    )


def _card(
    config: Config, trial: str, choice: tuple[str, float | None], rows: list[dict[str, Any]],
    originals: list[np.ndarray | None],
) -> str:  # fmt: skip
    attack, budget = choice
    run = attack if budget is None else f"{attack} at ε = {budget:g}"
    body = "".join(_example(r, o) for r, o in zip(rows, originals, strict=True))
    shown_budget = "" if budget is None else str(budget)
    return (
        f'<div class="trial-examples" data-config="{esc(config.key)}" data-trial="{esc(trial)}" '
        f'data-attack="{esc(attack)}" data-budget="{esc(shown_budget)}">'
        f'<h4><span class="swatch" style="background:{esc(config.colour)}"></span>'
        f"{esc(config.name)} · {esc(run)}</h4>{body}</div>"
    )


def _example(row: dict[str, Any], original: np.ndarray | None) -> str:
    """One example: the image it was made from (when at hand), the adversarial image and the
    perturbation magnified; the adversarial image alone when the data is not at hand."""
    adversarial = np.asarray(row["x_adv"], dtype=np.float32)
    if original is not None:
        adversarial = adversarial.reshape(original.shape)
        images = [
            ("original", original),
            ("adversarial", adversarial),
            ("perturbation ×10", magnified(original, adversarial)),
        ]
    else:
        shape = image_shape(adversarial.size)  # a caption alone when no square fits
        images = [] if shape is None else [("adversarial", adversarial.reshape(shape))]
    figures = "".join(
        f'<figure><img src="{png_uri(image)}" data-kind="{esc(kind)}" alt="{esc(kind)}">'
        f"{esc(kind.split(' ')[0])}</figure>"
        for kind, image in images
    )
    fooled = "" if row["success"] else " (not fooled)"
    caption = f"{row['label']} → {row['adv_pred']}{fooled}, rms {row['dist_rms']:.3f}"
    return (
        f'<div class="example" data-example="{int(row["example"])}">{figures}'
        f'<span class="caption">{esc(caption)}</span></div>'
    )
