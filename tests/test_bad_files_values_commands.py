"""Bad sweep files, setting values and command lines, as a careless or hostile user writes
them (test_bad_input.py has the everyday mistakes). Each is refused with exit code 2 and one
line that names the key (or the file, or the option), no traceback, nothing written, Ray never
started, within seconds."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_sweep

from advlab.cli import main

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}]\n"
    for i in range(12)
)  # the billion laughs: 340-odd bytes that expand to 9^13 values

# (id, change to the tiny sweep or raw file text/bytes, extra args, command, text in the error)
Case = tuple[str, Any, list[str], str, str]
FILES: list[Case] = [
    ("binary-garbage", bytes(range(256)) * 4, [], "sweep", "not a UTF-8 text file"),
    ("nul-bytes", "name: x\x00\n", [], "sweep", "NUL bytes"),
    ("alias-bomb", BOMB, [], "sweep", "aliases"),
    ("too-large", "# " + "x" * (2 << 20) + "\nname: x\n", [], "sweep", "too large"),
    ("duplicate-key", "name: a\nname: b\n", [], "sweep", "key 'name' appears twice"),
    ("duplicate-nested", "name: a\ntrain: {lr: 0.1, lr: 0.2}\n", [], "sweep", "'lr' appears"),
    ("number-key", "name: a\n1: x\n", [], "sweep", "key 1 is a int"),
    ("null-key", "name: a\n~: x\n", [], "sweep", "key None is a NoneType"),
    ("empty-file", "", [], "sweep", "must be a mapping"),
    ("scalar-document", "just words\n", [], "sweep", "must be a mapping"),
    ("unclosed-bracket", "name: [a\n", [], "validate", "YAML syntax error at line"),
    ("tab-indent", "name: a\ntrain:\n\tlr: 0.1\n", [], "sweep", "YAML syntax error"),
]
VALUES: list[Case] = [
    (
        "bool-epochs",
        {"train": {"epochs": True}},
        [],
        "sweep",
        "train.epochs: Input should be a valid integer",
    ),
    ("bool-lr", {"train": {"lr": True}}, [], "sweep", "train.lr: Input should be a valid number"),
    ("text-lr", {"train": {"lr": "0.1"}}, [], "sweep", "train.lr: Input should be a valid number"),
    ("inf-lr", {"train": {"lr": float("inf")}}, [], "sweep", "train.lr: Input should be a finite"),
    ("negative-lr", {"train": {"lr": -0.1}}, [], "sweep", "train.lr: Input should be greater"),
    (
        "float-epochs",
        {"train": {"epochs": 10.5}},
        [],
        "sweep",
        "train.epochs: Input should be a valid integer",
    ),
    (
        "absurd-epochs",
        {"train": {"epochs": 10**9}},
        [],
        "sweep",
        "train.epochs: Input should be less",
    ),
    ("zero-batch", {"train": {"batch_size": 0}}, [], "sweep", "train.batch_size:"),
    (
        "inf-decay",
        {"weight_decay": float("inf"), "grid": {}},
        [],
        "sweep",
        "weight_decay: Input should be a finite",
    ),
    (
        "nan-in-decays",
        {"weight_decay": [1e-5, float("nan")], "grid": {}},
        [],
        "sweep",
        "weight_decay: Input should be",
    ),
    ("bool-decay", {"weight_decay": True, "grid": {}}, [], "sweep", "weight_decay:"),
    ("inf-budget", {"eps": [float("inf")]}, [], "sweep", "eps.0: Input should be a finite"),
    ("bool-budget", {"eps": [True]}, [], "sweep", "eps.0:"),
    (
        "inf-train-eps",
        {"train": {"adversarial": {"eps": float("inf")}}},
        [],
        "sweep",
        "train.adversarial.eps:",
    ),
    (
        "train-eps-over-box",
        {"train": {"adversarial": {"eps": 2.0}}},
        [],
        "sweep",
        "train.adversarial.eps: Input should be less",
    ),
    (
        "unknown-method",
        {"train": {"adversarial": {"method": "trades-x"}}},
        [],
        "sweep",
        "train.adversarial.method:",
    ),
    (
        "mix-over-one",
        {"train": {"adversarial": {"mix": 1.5}}},
        [],
        "sweep",
        "train.adversarial.mix:",
    ),
    ("seed-over-int64", {"seed": 2**63}, [], "sweep", "seed: Input should be less than or equal"),
    ("negative-seed", {"seed": -1}, [], "sweep", "seed: Input should be greater"),
    (
        "split-seed-text",
        {"dataset": {"name": "digits", "split_seed": "one"}},
        [],
        "sweep",
        "dataset.split_seed:",
    ),
    ("zero-examples", {"attack_examples": 0}, [], "sweep", "attack_examples:"),
    (
        "absurd-examples",
        {"attack_examples": 10**11},
        [],
        "sweep",
        "attack_examples: Input should be less",
    ),
    (
        "inf-cpus",
        {"resources": {"cpu": float("inf")}},
        [],
        "sweep",
        "resources.cpu: Input should be a finite",
    ),
    (
        "tiny-cpu-fraction",
        {"resources": {"cpu": 1e-9}},
        [],
        "sweep",
        "resources.cpu: Input should be greater",
    ),
    (
        "more-cpus-than-here",
        {"resources": {"cpu": 4096}},
        [],
        "sweep",
        "resources.cpu: 4096 CPUs per trial but this machine has",
    ),
    ("negative-gpus", {"resources": {"gpu": -1}}, [], "sweep", "resources.gpu:"),
    ("empty-name", {"name": ""}, [], "sweep", "name: use at most 100"),
    ("long-name", {"name": "x" * 300}, [], "sweep", "name: use at most 100"),
    ("name-with-space", {"name": "my sweep"}, [], "sweep", "name:"),
    ("number-name", {"name": 5}, [], "sweep", "name: Input should be a valid string"),
    (
        "http-storage",
        {"storage": "http://example.com/x"},
        [],
        "sweep",
        "storage: http:// is no storage",
    ),
    ("ftp-storage", {"storage": "ftp://host/x"}, [], "sweep", "storage: ftp:// is no storage"),
    ("blank-storage", {"storage": " "}, [], "sweep", "storage: give a folder path"),
    (
        "wandb-project-slash",
        {"wandb": {"project": "a/b"}},
        [],
        "sweep",
        "wandb.project: use at most 128",
    ),
    ("wandb-project-long", {"wandb": {"project": "p" * 200}}, [], "sweep", "wandb.project:"),
    ("wandb-mode", {"wandb": {"mode": "sometimes"}}, [], "sweep", "wandb.mode:"),
    (
        "million-point-grid",
        {"grid": {"seed": list(range(1000)), "train.lr": [0.1] * 1000}},
        [],
        "sweep",
        "grid: 1000000 trials",
    ),
    (
        "grid-value-not-list",
        {"grid": {"seed": 3}},
        [],
        "sweep",
        "grid.seed: Input should be a valid list",
    ),
    (
        "case-not-mapping",
        {"cases": [5]},
        [],
        "sweep",
        "cases.0: Input should be a valid dictionary",
    ),
    (
        "attack-steps-bool",
        {"attacks": [{"name": "pgd", "steps": True}]},
        [],
        "sweep",
        "attacks.0.steps:",
    ),
    (
        "attack-budget-inf",
        {"attacks": [{"name": "pgd", "eps": [float("inf")]}]},
        [],
        "sweep",
        "attacks.0.eps",
    ),
    (
        "attack-loss-unknown",
        {"attacks": [{"name": "lbfgs", "loss": "hinge"}]},
        [],
        "sweep",
        "attacks.0.loss:",
    ),
    (
        "attack-zero-restarts",
        {"attacks": [{"name": "pgd", "restarts": 0}]},
        [],
        "sweep",
        "attacks.0.restarts:",
    ),
    (
        "attack-label-path",
        {"attacks": [{"name": "fgsm", "label": "../x"}]},
        [],
        "sweep",
        "attacks.0.label:",
    ),
    (
        "attack-target-unknown",
        {"attacks": [{"name": "fgsm", "target": "sometimes"}]},
        [],
        "sweep",
        "attacks.0.target:",
    ),
    ("attacks-not-list", {"attacks": 5}, [], "sweep", "attacks: Input should be a valid list"),
    (
        "attack-by-bad-path",
        {"attacks": [{"name": "nosuch.module:X"}]},
        [],
        "sweep",
        "attacks.0.name: cannot import attack",
    ),
    (
        "density-k-over-data",
        {"measures": [{"name": "density", "k": 5000}]},
        [],
        "sweep",
        "measures: density: k: 5000 neighbours",
    ),
    (
        "npz-without-path",
        {"dataset": {"name": "npz"}},
        [],
        "sweep",
        "dataset.path: required for npz",
    ),
    (
        "npz-missing",
        {"dataset": {"name": "npz", "path": "/no/such/file.npz"}},
        [],
        "sweep",
        "dataset.path: /no/such/file.npz is no .npz file",
    ),
    (
        "builtin-with-path",
        {"dataset": {"name": "digits", "path": "x.npz"}},
        [],
        "sweep",
        "dataset.path: digits is built in",
    ),
    (
        "corrupt-gz-idx",
        {"dataset": {"name": "fashion_mnist", "root": "@corrupt"}},
        [],
        "sweep",
        "dataset.root:",
    ),
    (
        "folder-without-splits",
        {"dataset": {"name": "folder", "path": "@emptydir"}},
        [],
        "sweep",
        "has no train/ folder",
    ),
    (
        "zero-std",
        {"dataset": {"name": "digits", "normalize": {"mean": [0.5], "std": [0.0]}}},
        [],
        "sweep",
        "dataset.normalize:",
    ),
    (
        "args-for-builtin-model",
        {"model_args": {"width": 8}},
        [],
        "sweep",
        "model_args: fc10 is built in",
    ),
    ("init-missing", {"init": "/no/such.pt"}, [], "sweep", "init: no file /no/such.pt"),
    ("fraction-over-one", {"subset": "fraction:2"}, [], "sweep", "subset:"),
    ("unknown-optimizer", {"train": {"optimizer": "rmsprop"}}, [], "sweep", "train.optimizer:"),
    ("unknown-activation", {"activation": "gelu"}, [], "sweep", "activation:"),
    ("unknown-search", {"search": {"algorithm": "bayes"}}, [], "sweep", "search.algorithm:"),
    (
        "zero-grace",
        {"scheduler": {"name": "asha", "grace_period": 0}},
        [],
        "sweep",
        "scheduler.grace_period:",
    ),
    (
        "unknown-control",
        {"transfer": {"controls": ["svm_poly"]}},
        [],
        "sweep",
        "transfer.controls: 'svm_poly' is no prediction-only model family",
    ),
    (
        "amplify-over-box",
        {"transfer": {"amplify_rms": [2.0]}},
        [],
        "sweep",
        "transfer.amplify_rms:",
    ),
]
COMMANDS: list[Case] = [
    (
        "set-bad-yaml",
        {},
        ["--set", "train.epochs=[1"],
        "sweep",
        "--set train.epochs: the value is not valid YAML",
    ),
    ("set-without-key", {}, ["--set", "=5"], "sweep", "--set =5: expected KEY=VALUE"),
    (
        "set-bool-epochs",
        {},
        ["--set", "train.epochs=yes"],
        "sweep",
        "train.epochs: Input should be a valid integer",
    ),
    (
        "storage-option-scheme",
        {},
        ["--storage", "http://x/y"],
        "sweep",
        "storage: http:// is no storage",
    ),
    (
        "address-without-port",
        {},
        ["--address", "nowhere"],
        "sweep",
        "--address: 'nowhere' is not host:port",
    ),
    (
        "address-nobody-home",
        {},
        ["--address", "127.0.0.1:9"],
        "sweep",
        "--address: nothing answers",
    ),
    ("unknown-option", {}, ["--frobnicate"], "sweep", "unrecognized arguments: --frobnicate"),
    ("max-concurrent-text", {}, ["--max-concurrent", "many"], "sweep", "argument --max-concurrent"),
    ("index-text", {}, ["--index", "x"], "trial", "argument --index"),
    ("report-to-folder", {}, ["-o", "@dir"], "report", "-o: "),
    (
        "report-to-missing-folder",
        {},
        ["-o", "/no/such/dir/r.html"],
        "report",
        "-o: no folder /no/such/dir",
    ),
    ("report-of-nothing", {}, [], "report", "no advlab results here"),
    ("transfer-of-nothing", {}, [], "transfer", "no trials to transfer"),
    ("ls-of-a-file", {}, [], "ls", "is not a folder"),
]
CASES = FILES + VALUES + COMMANDS


def _prepare(change: Any, tmp_path: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    if isinstance(change, bytes):
        path.write_bytes(change)
        return path
    if isinstance(change, str):
        path.write_text(change)
        return path
    raw = {**tiny_sweep(), "storage": str(tmp_path / "results"), **change}
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):  # fmt: skip
        (corrupt / f"{stem}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03")[:-6])
    (tmp_path / "emptydir").mkdir()
    text = json.dumps(raw).replace('"@corrupt"', json.dumps(str(corrupt)))
    path.write_text(
        yaml.safe_dump(
            json.loads(text.replace('"@emptydir"', json.dumps(str(tmp_path / "emptydir"))))
        )
    )
    return path


def _argv(command: str, path: Path, args: list[str], tmp_path: Path) -> list[str]:
    empty = tmp_path / "nothing-here"
    empty.mkdir(exist_ok=True)
    args = [str(tmp_path) if a == "@dir" else a for a in args]
    if command == "report":
        return ["report", str(empty if "-o" not in args else path.parent), *args]
    if command == "transfer":
        return ["transfer", str(empty)]
    if command == "ls":
        return ["ls", str(path)]
    return [command, str(path), *args]


@pytest.mark.parametrize(
    ("change", "args", "command", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_file_value_or_command_is_one_line_exit_2_writes_nothing_and_starts_no_ray(
    change: Any, args: list[str], command: str, expected: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    path = _prepare(change, tmp_path)
    argv = _argv(command, path, args, tmp_path)
    before = sorted(tmp_path.rglob("*"))
    start = time.monotonic()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's errors leave through sys.exit
        code = exit_.code
    assert time.monotonic() - start < 10
    out, err = capsys.readouterr()
    err = err.strip()
    assert code == 2, err + out
    assert len(err.splitlines()) == 1 and err.startswith("advlab: error: "), err
    assert expected in err, err
    assert "Traceback" not in err + out
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_there_are_at_least_60_cases() -> None:
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
