"""Denoising, contractive and variational autoencoder classifiers (advlab.autoencoders): their
pretraining losses against autograd and closed forms, their settings, and a trial of each with
the Jacobian and likelihood measures (advlab.measures.jacobian, advlab.measures.likelihood)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_sweep

from advlab.autoencoders import (
    AutoencoderClassifier,
    ContractiveAutoencoder,
    ContractiveSettings,
    DenoisingAutoencoder,
    VariationalAutoencoder,
    VariationalSettings,
)
from advlab.measures.jacobian import code_map, jacobian_norms
from advlab.models import ModelNameError, build_model, decay_weights
from advlab.store import SweepStore
from advlab.sweep import trial_context
from advlab.sweepfile import SpecError, parse_sweep
from advlab.trial import run_trial

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHAPE = (1, 3, 4)
FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_contractive_penalty_is_the_jacobian_norm_by_autograd(activation: str) -> None:
    torch.manual_seed(0)
    model = ContractiveAutoencoder(
        SHAPE, 5, 3, activation, settings=ContractiveSettings(contraction=0.5)
    ).double()
    x = torch.rand(6, *SHAPE, dtype=torch.float64)
    by_autograd = torch.stack(
        [torch.autograd.functional.jacobian(model.encode, xi[None]).pow(2).sum() for xi in x]
    )
    closed = model.jacobian_norm_sq(x)
    torch.testing.assert_close(closed, by_autograd, rtol=1e-12, atol=1e-12)
    # The measure's batched autograd gives the same norms, in chunks of any size.
    for chunk in (1, 4, 16):
        measured = jacobian_norms(code_map(model), x, chunk=chunk)
        torch.testing.assert_close(measured.pow(2), by_autograd, rtol=1e-12, atol=1e-12)
    # The pretraining loss is the reconstruction error plus contraction times the mean penalty.
    gen = torch.Generator()
    mse = torch.nn.functional.mse_loss(model.reconstruct(x), x)
    loss = model.pretraining_loss(x, gen)
    torch.testing.assert_close(loss, mse + 0.5 * by_autograd.mean())


def test_denoising_reconstructs_from_its_corrupted_copy() -> None:
    torch.manual_seed(0)
    args = {"corruption": "mask", "noise": 0.5}
    model = build_model("dae5-3", SHAPE, 3, model_args=args)
    x = torch.rand(8, *SHAPE) + 0.1
    corrupted = model.corrupt(x, torch.Generator().manual_seed(1))
    zeroed = float((corrupted == 0).float().mean())
    assert 0.25 < zeroed < 0.75 and bool(((corrupted == 0) | (corrupted == x)).all())
    expected = torch.nn.functional.mse_loss(model.decoder(model.encoder(corrupted)), x)
    torch.testing.assert_close(
        model.pretraining_loss(x, torch.Generator().manual_seed(1)), expected
    )


def test_variational_loss_has_the_closed_form_kl_and_the_mean_feeds_the_classifier() -> None:
    torch.manual_seed(0)
    x = torch.rand(8, *SHAPE)
    model = build_model("vae6-3", SHAPE, 3, model_args={"latent": 2})
    mean, log_var = model.posterior(x)
    assert mean.shape == (8, 2)
    torch.testing.assert_close(model(x), model.classifier(mean))
    torch.testing.assert_close(model.encode(x), mean)
    q = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum()
    with_kl = model.pretraining_loss(x, torch.Generator().manual_seed(3))
    model.settings = VariationalSettings(latent=2, beta=0.0)
    without = model.pretraining_loss(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(with_kl - without, kl / x.numel())
    # The encoder's two weight matrices and the classifier's take weight decay; the decoder not.
    assert len(decay_weights(model)) == 3


def test_each_name_builds_its_kind() -> None:
    kinds = {"ae": AutoencoderClassifier, "dae": DenoisingAutoencoder}
    kinds |= {"cae": ContractiveAutoencoder, "vae": VariationalAutoencoder}
    for kind, cls in kinds.items():
        assert type(build_model(f"{kind}6-3", SHAPE, 3)) is cls


def test_settings_are_checked_and_part_of_the_training_key() -> None:
    with pytest.raises(ModelNameError, match=r"^model_args.contraction: .* for cae5-3 \(its"):
        build_model("cae5-3", SHAPE, 3, model_args={"contraction": -1.0})
    with pytest.raises(ModelNameError, match=r"its settings: latent, beta"):
        build_model("vae5-3", SHAPE, 3, model_args={"latnet": 3})
    with pytest.raises(ModelNameError, match="ae5-3 is built in and takes none"):
        build_model("ae5-3", SHAPE, 3, model_args={"noise": 0.1})
    raw = tiny_sweep(grid={"model": ["cae16-10"], "model_args.contraction": [0.1, 1.0]})
    spec = parse_sweep(raw)
    assert len({t.training_key() for t in spec.trials}) == 2
    raw["grid"]["model_args.contraction"] = [-1.0]
    with pytest.raises(SpecError, match=r"model_args\.contraction"):
        parse_sweep(raw)
    bad = tiny_sweep(measures=[{"name": "likelihood", "ood": "fashion_mnist", "ood_root": "/no"}])
    with pytest.raises(SpecError, match="ood_root: folder /no does not exist"):
        parse_sweep(bad)


def test_each_autoencoder_trains_and_is_attacked_with_its_measures(tmp_path: Path) -> None:
    raw = tiny_sweep(
        name="autoencoders",
        cases=[
            {"model": "dae16-10", "model_args": {"noise": 0.2}},
            {"model": "cae16-10", "model_args": {"contraction": 0.1}},
            {"model": "vae16-10", "model_args": {"latent": 4}},
        ],
        grid={"weight_decay": [0.0]},
        attacks=[{"name": "fgsm"}, {"name": "ddn", "steps": 20}],
        measures=[
            {"name": "jacobian", "examples": 10},
            {
                "name": "likelihood", "latent": 2, "hidden": 8, "epochs": 2, "samples": 4,
                "max_train": 200, "ood": "fashion_mnist", "ood_root": FASHION,
            },
        ],
    )  # fmt: skip
    raw["train"]["ae_epochs"] = 2
    spec = parse_sweep(raw)
    for i, trial in enumerate(spec.trials):
        assert (
            run_trial(trial, trial_context(spec, i, str(tmp_path), "disabled")).row["status"]
            == "ok"
        )
    store = SweepStore(str(tmp_path), "autoencoders")
    measures = store.read("measures")
    assert set(measures["status"]) == {"ok"}, measures[["name", "reason"]]
    jac = store.read("jacobian")
    assert sorted(jac["of"]) == ["code"] * 3 + ["logits"] * 3
    assert (jac["frobenius"] > 0).all() and (jac["frobenius_sq"] >= jac["frobenius"] ** 2).all()
    lik = store.read("likelihood")
    assert lik["elbo_bits_per_dim"].ge(lik["bits_per_dim"]).all()  # the IWAE bound is tighter
    examples = store.read("examples")
    for (trial, attack, budget), group in examples.groupby(
        ["trial_id", "attack", "budget"], dropna=False
    ):
        row = lik[(lik.trial_id == trial) & (lik.attack == attack) & (lik.inputs == "adversarial")]
        row = row[row.budget.isna()] if pd.isna(budget) else row[row.budget == budget]
        assert row["examples"].tolist() == [int(group["success"].sum())]
    assert set(lik["inputs"]) == {"train", "clean", "ood", "adversarial", "noise"}
    assert set(lik.loc[lik.inputs == "ood", "ood"]) == {"fashion_mnist"}


@pytest.mark.slow
def test_autoencoders_sweep_transfers_among_them_and_reports_the_new_measures(
    ray_local, tmp_path: Path
) -> None:
    """A real Ray Tune sweep of the autoencoder kinds, its transfer stage and its report."""
    import yaml

    from advlab import results
    from advlab.cli import main

    raw = tiny_sweep(
        name="ae-e2e",
        grid={"model": ["fc16-10", "cae16-10", "vae16-10"]},
        attacks=[{"name": "ddn", "steps": 20}],
        measures=[
            {"name": "jacobian", "examples": 10},
            {"name": "likelihood", "latent": 2, "hidden": 8, "epochs": 1, "samples": 4,
             "max_train": 100, "ood": None},
        ],
        transfer={"controls": [], "noise": False, "amplify_rms": []},
        storage=str(tmp_path / "results"),
        wandb={"mode": "disabled"},  # W&B is test_sweep_e2e's
    )  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 0
    res = results.load(str(tmp_path / "results" / "ae-e2e"))
    assert sorted(res.trials["model"]) == ["cae16-10", "fc16-10", "vae16-10"]
    pairs = res.transfer.query("kind == 'adversarial'")
    assert len(pairs[["source_trial", "target"]].drop_duplicates()) == 9  # every pair, diagonal
    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "results" / "ae-e2e"), "-o", str(out)]) == 0
    page = out.read_text()
    for name in ("jacobian", "likelihood"):
        assert f'data-measure="{name}"' in page or f"measure-{name}" in page
