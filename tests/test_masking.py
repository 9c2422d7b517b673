"""The strong attack set and the gradient-masking flag: a deliberately masked model (logits
scaled by 1e4, so the softmax saturates and input gradients vanish) is flagged; the same model
unscaled is not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_sweep
from torch import Tensor, nn
from wandb_reader import offline_run_dirs, read_offline_run

from advlab.data import load_dataset
from advlab.evaluate import Evaluation, evaluate_attack, first_correct
from advlab.measures.masking import MASKING, MaskingSettings, assess_masking, strong_attacks
from advlab.models import build_model
from advlab.plan import attack_plan
from advlab.spec import AttackSpec, MeasureSpec, TrainSpec, TrialSpec
from advlab.store import SweepStore
from advlab.sweep import flag_lines, trial_context
from advlab.sweepfile import parse_sweep
from advlab.track import TrialRun
from advlab.trial import run_trial


class Scaled(nn.Module):
    """Logits times a constant: the same decisions, a saturated softmax."""

    def __init__(self, model: nn.Module, scale: float):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.model(x)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Tensor, Tensor]:
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("fc32-10", (1, 8, 8), 10, "relu")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):  # full batch: a few seconds, ~4% test error
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        optimizer.step()
    return model.eval(), data.x_test, data.y_test


def adversarial_spec(**overrides) -> TrialSpec:
    settings = {
        "model": "fc32-10",
        "eps": [0.05, 0.1, 0.2],
        "attack_examples": 100,
        "attacks": [AttackSpec(name="fgsm"), AttackSpec(name="pgd", steps=20)],
        "train": TrainSpec(adversarial={"method": "fgsm"}),
    }
    return TrialSpec(**settings | overrides)


def verdict(model: nn.Module, x: Tensor, y: Tensor):
    """What a trial does: each attack of the plan (the sweep's and the strong set) evaluated on
    its own, then the masking check over all their curves and examples."""
    spec, attacked = adversarial_spec(), first_correct(model, x, y, 100)
    evaluation = Evaluation()
    for attack in attack_plan(spec):
        one = evaluate_attack(spec, attack, model, attacked, "t")
        evaluation.curves += one.curves
        evaluation.examples += one.examples
    flag, reason = assess_masking(
        attack_plan(spec), evaluation.curves, evaluation.examples, attacked.n_clean_wrong
    )
    return flag, reason, evaluation


def test_a_saturated_softmax_is_flagged(trained) -> None:
    model, x, y = trained
    masked = Scaled(model, 1e4).eval()
    assert torch.equal(masked(x).argmax(1), model(x).argmax(1))  # same decisions
    flag, reason, _ = verdict(masked, x, y)
    assert flag is True
    assert "strong_deepfool (minimum norm)" in reason  # DeepFool works on logits, not softmax
    assert "PGD fools only" in reason and "at eps 1" in reason
    row = {"flagged": flag, "reason": reason}
    assert MASKING.metrics([row]) == {"gradient_masking": 1.0} and MASKING.flag([row]) == reason


def test_the_same_model_unscaled_is_not_flagged(trained) -> None:
    model, x, y = trained
    flag, reason, evaluation = verdict(model, x, y)
    assert (flag, reason) == (False, "")
    curves = {(r["attack"], r["budget"]): r for r in evaluation.curves}
    assert curves[("strong_pgd_box", 1.0)]["success_rate"] == 1.0
    # The strong PGD is at least as strong as the sweep's own PGD-20.
    for eps in (0.05, 0.1, 0.2):
        assert curves[("strong_pgd", eps)]["robust_error"] >= curves[("pgd", eps)]["robust_error"]


def test_strong_attacks_are_added_to_adversarially_trained_models_only() -> None:
    auto, always = MaskingSettings(), MaskingSettings(strong_attacks="always")
    labels = [a["label"] for a in strong_attacks(adversarial_spec(), auto)]
    assert labels == ["strong_pgd", "strong_deepfool", "strong_pgd_box"]
    assert strong_attacks(adversarial_spec(train=TrainSpec()), auto) == []  # standard training
    assert len(strong_attacks(adversarial_spec(train=TrainSpec()), always)) == 3
    never = MaskingSettings(strong_attacks="never")
    assert strong_attacks(adversarial_spec(), never) == []
    asked = adversarial_spec(
        attacks=[
            AttackSpec(name="pgd", steps=20, restarts=3),
            AttackSpec(name="lbfgs"),
            AttackSpec(name="pgd", label="wide", eps=[1.0]),
        ]
    )
    assert strong_attacks(asked, auto) == []  # the sweep asked for each kind already
    plan = attack_plan(adversarial_spec())
    assert [a.key for a in plan] == ["fgsm", "pgd", *labels]  # the sweep's own come first
    # The strong set comes with the masking measure: a trial measuring something else has none.
    other = adversarial_spec(measures=[MeasureSpec(name="lipschitz")])
    assert [a.key for a in attack_plan(other)] == ["fgsm", "pgd"]
    asked_always = adversarial_spec(
        train=TrainSpec(), measures=[MeasureSpec(name="masking", strong_attacks="always")]
    )
    assert [a.key for a in attack_plan(asked_always)] == ["fgsm", "pgd", *labels]


def curve(attack: str, budget: float, robust_error: float, success: float = 0.5) -> dict:
    return {
        "attack": attack,
        "budget": budget,
        "robust_error": robust_error,
        "success_rate": success,
    }


PLAN = [AttackSpec(name="fgsm"), AttackSpec(name="pgd", steps=20)]


def test_the_fgsm_pgd_gap_of_the_issue_is_flagged_and_a_mild_one_is_not() -> None:
    # Issue 19: FGSM training at eps 0.2, FGSM robust error 27.1% but PGD-20 92.1%.
    flag, reason = assess_masking(
        PLAN, [curve("fgsm", 0.2, 0.271), curve("pgd", 0.2, 0.921)], [], 0
    )
    assert flag and reason == (
        "FGSM robust error 27.1% vs PGD 92.1% at eps 0.2: one step finds under half of what "
        "PGD finds (65.0 points apart; the check needs 25.0 points and under half)"
    )
    # FGSM-trained digits at 0.2 (36.3% vs 63.2%): FGSM finds more than half of PGD's.
    mild = [curve("fgsm", 0.2, 0.363), curve("pgd", 0.2, 0.632)]
    assert assess_masking(PLAN, mild, [], 0) == (False, "")


def test_the_fgsm_pgd_gap_counts_only_within_the_training_budget() -> None:
    # Issue 30: PGD- and TRADES-trained conv nets flagged from eps 0.3 alone (trained at 0.2):
    # past the training ball PGD follows the robustness cliff one FGSM step cannot see.
    rows = [
        curve("fgsm", 0.2, 0.30),
        curve("pgd", 0.2, 0.36),
        curve("fgsm", 0.3, 0.35),
        curve("pgd", 0.3, 0.95),
    ]
    assert assess_masking(PLAN, rows, [], 0, trained_eps=0.2) == (False, "")
    # The same gap at the training budget itself is the masking signature (0.1 + 0.2 != 0.3).
    flag, reason = assess_masking(PLAN, rows, [], 0, trained_eps=0.1 + 0.2)
    assert flag and reason.startswith("FGSM robust error 35.0% vs PGD 95.0% at eps 0.3, within")
    # A model trained without perturbations has no such ball: every budget is compared.
    flag, reason = assess_masking(PLAN, rows, [], 0, trained_eps=None)
    assert flag and "at eps 0.3:" in reason and "at eps 0.2" not in reason


def test_a_robust_error_that_falls_as_the_budget_grows_is_flagged() -> None:
    rows = [curve("fgsm", 0.1, 0.40), curve("fgsm", 0.2, 0.30), curve("pgd", 0.1, 0.45)]
    flag, reason = assess_masking(PLAN, rows, [], 0)
    assert flag and reason == (
        "fgsm robust error falls from 40.0% at eps 0.1 to 30.0% at eps 0.2, though the larger "
        "ball holds every adversarial of the smaller (a fall of 10.0 points; the check needs 5.0)"
    )


def test_no_pgd_means_no_verdict() -> None:
    assert assess_masking([AttackSpec(name="fgsm")], [curve("fgsm", 0.1, 0.5)], [], 0) == (
        None,
        None,
    )


def test_a_trial_writes_the_verdict_and_the_strong_attacks(tmp_path: Path) -> None:
    train = {"epochs": 3, "batch_size": 32, "optimizer": "adam", "lr": 0.01}
    train["adversarial"] = {"method": "fast", "eps": 0.1}
    spec = parse_sweep(tiny_sweep(name="strong", grid={"seed": [0]}, train=train))
    result = run_trial(spec.trials[0], trial_context(spec, 0, str(tmp_path), "offline"))
    verdicts = SweepStore(str(tmp_path), "strong").read("masking")
    assert verdicts["flagged"].tolist() == [False]
    assert verdicts["reason"].tolist() == [""]
    attacks = SweepStore(str(tmp_path), "strong").read("attacks")
    assert set(attacks["attack"]) == {"fgsm", "lbfgs", "strong_pgd", "strong_pgd_box"}
    assert result.metrics["gradient_masking"] == 0.0
    (run_dir,) = offline_run_dirs(tmp_path / "strong")
    assert read_offline_run(run_dir)["summary"]["gradient_masking"] == 0.0  # a plain scalar


def test_a_flag_reaches_wandb_and_the_sweep_summary(tmp_path: Path) -> None:
    run = TrialRun(
        mode="offline", project="advlab-tests", entity=None, group="g", run_id="g-r", name="r",
        config={}, directory=str(tmp_path),
    )  # fmt: skip
    run.log_summary({"gradient_masking": 1.0})
    run.flag("masking", "FGSM robust error 27.1% vs PGD 92.1% at eps 0.2")
    run.finish()
    (run_dir,) = offline_run_dirs(tmp_path)
    found = read_offline_run(run_dir)
    assert found["summary"]["masking/flag"] == "FGSM robust error 27.1% vs PGD 92.1% at eps 0.2"
    assert "masking-flagged" in found["run"]["tags"]
    store = SweepStore(str(tmp_path), "sweep")
    rows = [
        {"trial_id": "a", "measure": "masking", "status": "ok", "flag": "why"},
        {"trial_id": "b", "measure": "masking", "status": "ok", "flag": ""},
        {"trial_id": "c", "measure": "masking", "status": "ok", "flag": "not listed"},
    ]
    for row in rows:
        store.write_rows("measures", row["trial_id"], [row], "measure.masking")
    lines = flag_lines(store, {"a": "fgsm eps=0.2"}, ["a", "b"])
    assert lines == ["  masking flagged fgsm eps=0.2: why"]
