"""Evaluate a trained model under attack: every attack at its budgets.

Produces the rows of the examples, attacks and curves tables, and the flat metrics
(`lbfgs/mean_dist_rms`, `pgd/robust_error@0.1`) that Ray Tune and W&B see. Metric names are
made here from the rows' fields and never parsed back. What a budget means for each kind of
attack is the registry's business (advlab.attacks.registry).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from advlab.attacks.base import check_result
from advlab.attacks.registry import MINIMIZATION, BudgetRun, hits_at_budgets, run_budgets
from advlab.measure import fraction, robust_error
from advlab.plugins import describe
from advlab.runtime import predict
from advlab.spec import AttackSpec, TrialSpec
from advlab.tables import Status


@dataclass
class AttackedSet:
    """The first n correctly classified examples of a split, and what the scan for them met."""

    x: Tensor
    y: Tensor
    dataset_index: Tensor
    n_scanned: int  # examples looked at, in split order, to find the n
    n_clean_wrong: int  # of those, the ones the model got wrong without any attack
    split: str = "test"  # which split dataset_index indexes


@dataclass
class Evaluation:
    """Rows for the examples, attacks and curves tables, plus flat metrics."""

    examples: list[dict[str, Any]] = field(default_factory=list)
    attacks: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Per-attack scalars for Tune and W&B, named from the rows (never parsed back)."""
        out: dict[str, float] = {}
        for row in self.attacks:
            if row["status"] == Status.OK and row["kind"] == MINIMIZATION:
                out[f"{row['attack']}/success_rate"] = row["success_rate"]
                out[f"{row['attack']}/mean_dist_rms"] = _number(row["mean_dist_rms"])
                out[f"{row['attack']}/grad_evals"] = row["grad_evals"]
        for row in self.curves:
            name = f"{row['attack']}/{{}}@{row['budget']:g}"
            out[name.format("success")] = row["success_rate"]
            out[name.format("robust_error")] = row["robust_error"]
        return out


TRIAL_METRICS = ("test_error", "train_error", "heldout_error")


def final_metrics(spec: TrialSpec) -> set[str]:
    """Every metric name a trial of `spec` reports at its end (as `Evaluation.metrics` names
    them), so a search can be checked against it before any trial runs."""
    names = set(TRIAL_METRICS)
    for attack in spec.attacks:
        if attack.defn.kind == MINIMIZATION:
            names |= {f"{attack.key}/{m}" for m in ("success_rate", "mean_dist_rms", "grad_evals")}
        for eps in spec.budgets(attack):
            names |= {f"{attack.key}/success@{eps:g}", f"{attack.key}/robust_error@{eps:g}"}
    return names


def first_correct(model: nn.Module, x: Tensor, y: Tensor, n: int) -> AttackedSet:
    """The first n examples, in order, that the model classifies correctly."""
    predicted = predict(model, x)
    correct = predicted == y.to(predicted.device)
    index = torch.nonzero(correct).flatten()[:n]
    scanned = int(index[-1]) + 1 if len(index) == n and n > 0 else len(y)
    return AttackedSet(
        x=x[index],
        y=y[index],
        dataset_index=index.cpu(),
        n_scanned=scanned,
        n_clean_wrong=scanned - int(correct[:scanned].sum()),
    )


def evaluate_attack(
    spec: TrialSpec, attack: AttackSpec, model: nn.Module, attacked: AttackedSet, trial_id: str
) -> Evaluation:
    """One attack over its budgets: rows for its own files of the examples, attacks and curves
    tables. An attack that raises leaves one failed attacks row with the reason instead, so a
    broken attack costs that attack only."""
    head = {"trial_id": trial_id, "attack": attack.key, "attack_id": spec.attack_id(attack)}
    try:
        runs, hits = run_one_attack(spec, attack, model, attacked)
    except (Exception, SystemExit) as err:  # an attack's own code may call sys.exit too
        return Evaluation(attacks=[head | {"status": Status.FAILED, "reason": describe(err)}])
    evaluation = Evaluation()
    for run in runs:
        evaluation.attacks.append(head | attack_row(attack, run))
        evaluation.examples += example_rows(trial_id, attack.key, run, attacked)
    evaluation.curves = [
        curve_row(trial_id, attack, eps, hit, attacked.n_clean_wrong) for eps, hit in hits
    ]
    return evaluation


def run_one_attack(
    spec: TrialSpec, attack: AttackSpec, model: nn.Module, attacked: AttackedSet
) -> tuple[list[BudgetRun], list[tuple[float, Tensor]]]:
    """The attack's runs over its budgets (seeded by the trial) and its hits at each budget."""
    defn, budgets = attack.defn, spec.budgets(attack)
    settings = attack.settings.model_dump()

    def attack_at(eps: float | None):  # a fresh seeded generator per run, as the budgets vary
        result = defn.run(
            model, attacked.x, attacked.y, eps=eps, norm=attack.budget_norm,
            target=attack.target_mode, generator=torch.Generator().manual_seed(spec.seed),
            **settings,
        )  # fmt: skip
        check_result(result, attacked.x)
        return result

    runs = run_budgets(defn, budgets, attack_at, attacked.x)
    return runs, hits_at_budgets(defn, runs, budgets, attack.budget_norm)


def attack_row(attack: AttackSpec, run: BudgetRun) -> dict[str, Any]:
    """One attacks-table row: success and distances (over successes) of one run."""
    ok = run.result.success.cpu()
    row: dict[str, Any] = {
        "status": Status.OK,
        "reason": "",
        "method": attack.name,
        "kind": attack.defn.kind,
        "norm": attack.budget_norm,
        "target": attack.target_mode,
        "budget": run.budget,
        "n": len(ok),
        "success_rate": fraction(ok) if len(ok) else None,
    }
    for norm, values in run.distances.items():
        chosen = values.detach().cpu()[ok].double().numpy()
        row[f"mean_dist_{norm}"] = float(chosen.mean()) if len(chosen) else None
        row[f"median_dist_{norm}"] = float(np.median(chosen)) if len(chosen) else None
    return row | {
        "grad_evals": float(run.result.grad_evals.double().mean()) if len(ok) else None,
        "seconds": run.seconds,
        "settings": json.dumps(attack.settings.model_dump(mode="json"), sort_keys=True),
    }


def curve_row(
    trial_id: str, attack: AttackSpec, eps: float, hit: Tensor, clean_wrong: int
) -> dict[str, Any]:
    n = len(hit)
    return {
        "trial_id": trial_id,
        "attack": attack.key,
        "norm": attack.budget_norm,
        "budget": eps,
        "n": n,
        "success_rate": int(hit.sum()) / n if n else None,
        "robust_error": robust_error(hit, clean_wrong),
    }


def example_rows(
    trial_id: str, attack: str, run: BudgetRun, attacked: AttackedSet
) -> list[dict[str, Any]]:
    result, dist = run.result, run.distances
    columns = {
        "dataset_index": attacked.dataset_index,
        "label": attacked.y,
        "target": result.target,
        "adv_pred": result.adv_pred,
        "success": result.success,
        "dist_rms": dist["rms"],
        "dist_l2": dist["l2"],
        "dist_linf": dist["linf"],
        "grad_evals": result.grad_evals,
    }
    lists = {name: values.cpu().tolist() for name, values in columns.items()}
    images = result.x_adv.detach().flatten(1).float().cpu().numpy()
    return [
        {
            "trial_id": trial_id,
            "attack": attack,
            "budget": run.budget,
            "example": i,
            "split": attacked.split,
            "clean_pred": lists["label"][i],  # attacked examples are all classified correctly
            **{name: values[i] for name, values in lists.items()},
            "x_adv": images[i],
        }
        for i in range(len(attacked.y))
    ]


def _number(value: float | None) -> float:
    return math.nan if value is None else value
