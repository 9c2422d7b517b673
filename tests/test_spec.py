"""Sweep files -> validated specs and grids; every mistake is one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sweep_files, tiny_sweep

from advlab.cli import main
from advlab.spec import SpecError, TrialSpec
from advlab.sweepfile import load_sweep, parse_sweep

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_expands_to_the_full_grid() -> None:
    spec = load_sweep(REPO / "sweeps" / "quickstart.yaml")
    assert len(spec.trials) == 8
    points = {(t.model, t.weight_decay, t.subset) for t in spec.trials}
    assert points == {
        (m, wd, s) for m in ("fc10", "fc100-100-10") for wd in (1e-4, 1e-3) for s in ("p1", "p2")
    }
    assert spec.grid_values(spec.trials[0]) == {
        "model": "fc10",
        "weight_decay": 1e-4,
        "subset": "p1",
    }
    assert len({t.trial_id() for t in spec.trials}) == 8


def test_every_sweep_file_in_the_repo_is_valid() -> None:
    files = sweep_files()
    assert files
    for path in files:
        spec = load_sweep(path)
        assert spec.trials, path
        # `storage: ../results` from sweeps/: the repository's results/, wherever one runs.
        assert spec.settings.storage == str(REPO / "results"), path


def test_dotted_grid_axes_reach_nested_keys() -> None:
    spec = parse_sweep(tiny_sweep(grid={"train.lr": [0.1, 0.01], "dataset.split_seed": [0, 1]}))
    assert sorted((t.train.lr, t.dataset.split_seed) for t in spec.trials) == [
        (0.01, 0),
        (0.01, 1),
        (0.1, 0),
        (0.1, 1),
    ]
    # Untouched nested keys keep the base values.
    assert {t.train.epochs for t in spec.trials} == {3}


def test_per_layer_weight_decay_and_sorted_budgets() -> None:
    spec = parse_sweep(
        tiny_sweep(model="fc16-16-10", eps=[0.2, 0.05], grid={"weight_decay": [[1e-5, 1e-5, 1e-6]]})
    )
    assert spec.trials[0].eps == [0.05, 0.2]
    assert spec.trials[0].weight_decay == [1e-5, 1e-5, 1e-6]


@pytest.mark.parametrize("axis", ["eps", "attacks"])
def test_budgets_and_attacks_are_no_grid_axes(axis: str) -> None:
    # Every trial runs every attack at every budget; a grid over them would make one trial twice.
    with pytest.raises(SpecError, match=f"grid.{axis}: every trial runs every attack"):
        parse_sweep(tiny_sweep(grid={axis: [[0.1], [0.2]]}))


def test_attack_ids_follow_settings_and_budgets_not_the_trial() -> None:
    spec = parse_sweep(tiny_sweep(grid={"seed": [0, 1]}))
    one, two = spec.trials
    fgsm = one.attacks[0]
    assert one.attack_id(fgsm) == two.attack_id(two.attacks[0])
    wider = TrialSpec.model_validate(one.model_dump() | {"eps": [0.05, 0.1, 0.2]})
    assert wider.trial_id() == one.trial_id()  # budgets are not the trial's
    assert wider.attack_id(wider.attacks[0]) != one.attack_id(fgsm)


def test_trial_id_depends_on_content_only() -> None:
    a = TrialSpec(model="fc10", seed=1)
    assert a.trial_id() == TrialSpec(seed=1, model="fc10").trial_id()
    assert a.trial_id() != TrialSpec(model="fc10", seed=2).trial_id()


def test_attack_budgets_default_to_the_trial_budgets() -> None:
    spec = parse_sweep(tiny_sweep(attacks=[{"name": "fgsm", "eps": 0.3}, {"name": "lbfgs"}]))
    trial = spec.trials[0]
    fgsm, lbfgs = trial.attacks
    assert trial.budgets(fgsm) == [0.3]
    assert trial.budgets(lbfgs) == [0.05, 0.1]
    assert (fgsm.budget_norm, lbfgs.budget_norm) == ("linf", "rms")


def test_a_started_lbfgs_parses_and_its_start_is_part_of_its_id() -> None:
    plain = {"name": "lbfgs", "loss": "margin"}
    started = plain | {"start": "ddn", "start_settings": {"steps": 50}}
    longer = plain | {"start": "ddn", "start_settings": {"steps": 100}}
    trials = [parse_sweep(tiny_sweep(attacks=[a])).trials[0] for a in (plain, started, longer)]
    attacks = [t.attacks[0] for t in trials]
    assert attacks[1].settings.start == "ddn"
    assert attacks[1].settings.start_settings == {"steps": 50}
    assert len({t.attack_id(a) for t, a in zip(trials, attacks, strict=True)}) == 3


BAD_SWEEPS = [
    ({"modle": "fc10"}, "modle: unknown key; did you mean 'model'?"),
    ({"train": {"epochs": 3, "lrr": 0.1}}, "train.lrr: unknown key; did you mean 'lr'?"),
    ({"grid": {"model": ["fc10", "fc100-x-10"]}}, "model: 'fc100-x-10'"),
    ({"grid": {"model": ["fc100-100-7"]}}, "end the name in 10"),
    ({"eps": [0.1, -0.2]}, "eps: budget -0.2 must be a finite number >= 0"),
    ({"eps": [float("nan")]}, "eps.0: Input should be a finite number"),
    ({"grid": {"model": []}}, "grid.model: empty list"),
    ({"grid": {"modell": ["fc10"]}}, "grid.modell: not a trial key; did you mean 'model'?"),
    ({"dataset": {"name": "imagenet"}}, "dataset.name:"),
    ({"dataset": {"name": "fashion_mnist", "root": "/no/such/folder"}}, "/no/such/folder"),
    ({"subset": "p3"}, "subset:"),
    ({"attacks": [{"name": "jsma"}]}, "attacks.0.name: unknown attack 'jsma'; use one of"),
    ({"attacks": [{"name": "fgsm", "norm": "l2"}]}, "attacks.0.norm: fgsm takes 'linf'"),
    (
        {"attacks": [{"name": "lbfgs", "candidtes": 3}]},
        "attacks.0.candidtes: not a setting of lbfgs; did you mean 'candidates'?",
    ),
    ({"attacks": [{"name": "pgd", "steps": 0}]}, "attacks.0.steps: Input should be greater"),
    (
        {"attacks": [{"name": "lbfgs", "start": "pgd"}]},
        "attacks.0.start: pgd is not a minimisation attack other than lbfgs",
    ),
    ({"attacks": [{"name": "lbfgs", "start": "lbfgs"}]}, "attacks.0.start: lbfgs is not a"),
    ({"attacks": [{"name": "lbfgs", "start": "ddm"}]}, "attacks.0.start: unknown attack 'ddm'"),
    (
        {"attacks": [{"name": "lbfgs", "start": "ddn", "start_settings": {"stepz": 5}}]},
        "attacks.0.start_settings: stepz: not a setting of ddn; did you mean 'steps'?",
    ),
    (
        {"attacks": [{"name": "lbfgs", "start_settings": {"steps": 5}}]},
        "attacks.0.start_settings: given without start",
    ),
    ({"attacks": [{"name": "deepfool", "loss": "margin"}]}, "not a setting of deepfool"),
    ({"attacks": [{"name": "noise", "target": "random"}]}, "attacks.0.target: noise takes"),
    ({"attacks": [{"name": "fgsm"}, {"name": "fgsm"}]}, "give repeated attacks a `label`"),
    ({"grid": {"weight_decay": [-1.0]}}, "weight_decay:"),
    ({"grid": {"weight_decay": [[1e-5, -1e-5]]}}, "weight_decay:"),
    ({"train": {"epochs": -1}}, "train.epochs:"),
    ({"name": "../escape"}, "name:"),
    ({"resources": {"cpu": 0}}, "resources.cpu:"),
]


@pytest.mark.parametrize(("change", "expected"), BAD_SWEEPS)
def test_bad_sweeps_fail_with_one_line_naming_the_key(change: dict, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_sweep(tiny_sweep(**change))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"modle": "fc10"}, "modle"),
        ({"grid": {"model": ["fc10", "nonsense"]}}, "model"),
        ({"eps": [-0.1]}, "eps"),
        ({"grid": {"model": []}}, "grid.model"),
    ],
)
def test_cli_rejects_bad_sweeps_with_exit_2_before_ray_starts(
    change: dict, key: str, write_sweep, tmp_path: Path, capsys, monkeypatch
) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the sweep started despite a bad sweep file")

    monkeypatch.setattr("advlab.sweep.run_sweep", must_not_run)
    path = write_sweep(tiny_sweep(**change))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("advlab: error: ") and key in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "results").exists()  # nothing written


def test_console_script_exits_2_on_a_bad_file_without_importing_ray(write_sweep) -> None:
    path = write_sweep(tiny_sweep(modle="fc10"))
    code = (
        "import sys; from advlab.cli import main; rc = main(['sweep', sys.argv[1]]); "
        "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"advlab: error: {path}: modle: unknown key; did you mean 'model'?"
    ]


def test_yaml_syntax_error_names_the_line(write_sweep, tmp_path: Path, capsys) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ngrid: {model: [fc10\n")
    assert main(["validate", str(path)]) == 2
    assert "YAML syntax error at line" in capsys.readouterr().err


def test_validate_reports_the_grid(write_sweep, capsys) -> None:
    assert main(["validate", str(write_sweep(tiny_sweep()))]) == 0
    assert (
        "tiny: valid, 2 trials; grid axes: model (2), weight_decay (1)" in capsys.readouterr().out
    )


def test_one_trial_is_one_trial_not_1_trials(write_sweep, capsys) -> None:
    from advlab.text import count

    assert [count(n, "trial") for n in (0, 1, 2)] == ["0 trials", "1 trial", "2 trials"]
    one = tiny_sweep(grid={"model": ["fc10"]})
    assert main(["validate", str(write_sweep(one))]) == 0
    assert "tiny: valid, 1 trial; grid axes: model (1)" in capsys.readouterr().out


WIDTHS = """
import torch.nn as nn


def build(input_shape, num_classes, width=4):
    hidden = nn.Linear(64, width)
    return nn.Sequential(nn.Flatten(), hidden, nn.ReLU(), nn.Linear(width, num_classes))
"""


def test_set_reaches_any_nested_grid_axis_and_search_dimension(
    write_sweep, tmp_path: Path, capsys
) -> None:
    (tmp_path / "widthnets.py").write_text(WIDTHS)
    path = write_sweep(tiny_sweep(model="widthnets:build", grid={"seed": [0]}))
    spec = load_sweep(path, overrides={"grid.model_args.width": [4, 8]})
    assert [t.model_args for t in spec.trials] == [{"width": 4}, {"width": 8}]
    assert spec.settings.grid["model_args.width"] == [4, 8]
    args = ["validate", str(path), "--set", "grid.model_args.width=[4,8]"]
    assert main(args) == 0
    assert "valid, 2 trials; grid axes: seed (1), model_args.width (2)" in capsys.readouterr().out
    space = {"search.algorithm": "random", "search.num_samples": 2,
             "search.space.train.lr": {"loguniform": [1e-3, 0.1]}}  # fmt: skip
    searched = load_sweep(path, overrides=space)
    assert list(searched.settings.search.space) == ["train.lr"]


def test_every_relative_path_in_a_sweep_file_counts_from_its_folder(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import numpy as np
    import yaml

    folder = tmp_path / "project" / "sweeps"
    (folder / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((40, 8, 8), dtype=np.float32), "y_train": np.arange(40) % 10}
    arrays |= {"x_test": rng.random((10, 8, 8), dtype=np.float32), "y_test": np.arange(10) % 10}
    np.savez(folder / "data" / "pairs.npz", **arrays)
    raw = tiny_sweep(dataset={"name": "npz", "path": "data/pairs.npz"}, storage="out")
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # somewhere else: the working directory plays no part
    spec = load_sweep(path)
    assert spec.settings.storage == str(folder / "out")
    assert spec.trials[0].dataset.path == str(folder / "data" / "pairs.npz")
    # init and a timm weights file too (only named here, not read); dataset.root likewise.
    for name in ("w.pt", "w.safetensors"):
        (folder / name).touch()
    more = raw | {"model": "timm:resnet18", "model_args": {"pretrained": "w.safetensors"}}
    path.write_text(yaml.safe_dump(more | {"init": "w.pt"}))
    trial = load_sweep(path).trials[0]
    assert (trial.init, trial.model_args["pretrained"]) == (
        str(folder / "w.pt"),
        str(folder / "w.safetensors"),
    )
    path.write_text(yaml.safe_dump(raw | {"dataset": {"name": "mnist", "root": "idx"}}))
    with pytest.raises(SpecError, match=f"dataset.root: folder {folder / 'idx'} does not exist"):
        load_sweep(path)
    bare = {k: v for k, v in raw.items() if k != "storage"}
    path.write_text(yaml.safe_dump(bare))
    assert load_sweep(path).settings.storage == str(folder / "results")  # none: results/ beside
    path.write_text(yaml.safe_dump(raw))
    # --storage is a command-line path: relative to where the command runs.
    assert main(["validate", str(path), "--storage", "elsewhere"]) == 0
    spec = load_sweep(path, overrides={"storage": str(tmp_path / "elsewhere")})
    assert spec.settings.storage == str(tmp_path / "elsewhere")
    # Under `ray job submit` the file's folder is Ray's temporary copy: relative storage is
    # refused in one line, exit 2, before any work; an absolute one or a URI is fine.
    job = '{"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_1"}}'
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", job)
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "storage: 'out' is relative, and under `ray job submit`" in line
    assert "s3://BUCKET/advlab" in line
    assert main(["validate", str(path), "--storage", "rel"]) == 2
    assert "--storage rel: relative" in capsys.readouterr().err
    assert main(["validate", str(path), "--storage", str(tmp_path / "abs")]) == 0
    assert not (tmp_path / "abs").exists() and not (folder / "out").exists()  # nothing written


def test_readme_commands_list_every_option_of_each_command() -> None:
    import argparse
    import re

    from advlab.cli import build_parser

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Commands\n\n```\n", 1)[1].split("```", 1)[0]
    listed: dict[str, str] = {}
    command = ""
    for line in block.splitlines():
        if line.startswith("advlab "):
            command = line.split()[1]
        listed[command] = listed.get(command, "") + line.strip().split("   ")[0] + " "
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(listed) == set(commands.choices)
    for name, parser in commands.choices.items():
        shown = set(re.findall(r"(?<![\w-])-{1,2}[a-z][\w-]*", listed[name]))
        missing = [
            a.option_strings
            for a in parser._actions
            if a.option_strings and "--help" not in a.option_strings
            and not shown & set(a.option_strings)
        ]  # fmt: skip
        assert not missing, (name, missing)
