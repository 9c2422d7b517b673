"""User code and user files as a hostile user writes them: modules that fail or exit as they
are imported or called, data files that lie about their size, hang a reader or hold nothing a
classifier can learn from, YAML that no parser should follow. Each is refused before any work
starts: exit code 2, one `advlab: error:` line naming the key, within 10 s, nothing written,
Ray never started. User code that exits mid-trial fails that run with its reason instead."""

from __future__ import annotations

import io
import os
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from advlab.cli import main

BASE: dict[str, Any] = {
    "name": "hostile", "dataset": {"name": "digits"}, "model": "fc10", "train": {"epochs": 1},
    "attack_examples": 4, "attacks": [{"name": "fgsm"}], "measures": [],
    "wandb": {"mode": "disabled"}, "transfer": {"enabled": False},
}  # fmt: skip
LINEAR = """
import math

from torch import nn

def make(shape, k, **kw):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), k))
"""
RNG = np.random.default_rng(3)
X = (RNG.random((24, 5, 5)) * 255).astype(np.uint8)
Y = np.arange(24) % 3


def _npz(**arrays: Any) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        full = {"x_train": X, "y_train": Y, "x_test": X, "y_test": Y} | arrays
        np.savez(path, **full)

    return write


def _forged_npz(path: Path) -> None:
    """x_train's header claims 2**45 float64 values; its member holds a few bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (1 << 15, 1 << 30)}
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x_train.npy", header.getvalue() + bytes(40))
        for key, value in (("y_train", Y), ("x_test", X), ("y_test", Y)):
            buffer = io.BytesIO()
            np.save(buffer, value)
            archive.writestr(f"{key}.npy", buffer.getvalue())


def _cut_npz(path: Path) -> None:
    _npz()(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _weights(fill: float | None = None, pickled: object = None) -> Callable[[Path], None]:
    """fc10's weights for 8 x 8 digits, every value `fill`; or a pickle of `pickled`."""

    def write(path: Path) -> None:
        import pickle

        import torch

        from advlab.models import build_model

        if pickled is not None:
            path.write_bytes(pickle.dumps(pickled, protocol=4))
            return
        state = build_model("fc10", (1, 8, 8), 10).state_dict()
        torch.save({k: torch.full_like(v, fill) for k, v in state.items()}, path)

    return write


def _symlink_loop(path: Path) -> None:
    path.symlink_to(path.with_name("other.npz"))
    path.with_name("other.npz").symlink_to(path)


def _folder(
    empty: str = "", big: str = "", fifo: str = "", wide: str = ""
) -> Callable[[Path], None]:
    """An image folder of classes a, b, c: `empty` has no training image, `big` holds one
    image of 6,000 x 6,000 pixels, `fifo` a FIFO named like an image, `wide` a 16-bit one."""

    def write(path: Path) -> None:
        for split in ("train", "test"):
            for name in ("a", "b", "c"):
                folder = path.parent / "imgs" / split / name
                folder.mkdir(parents=True, exist_ok=True)
                if split == "train" and name == empty:
                    continue
                for i in range(2):
                    Image.fromarray(X[i]).save(folder / f"{i}.png")
        if big:
            Image.new("L", (6000, 6000)).save(path.parent / "imgs" / "train" / big / "huge.png")
        if fifo:
            os.mkfifo(path.parent / "imgs" / "train" / fifo / "pipe.png")
        if wide:
            deep = X[0].astype(np.uint16) * 257  # 16-bit gray: 8-bit reading would clip it
            Image.fromarray(deep).save(path.parent / "imgs" / "test" / wide / "deep.png")

    return write


def _modules(**sources: str) -> dict[str, str]:
    return {f"{name}.py": text for name, text in sources.items()}


NPZ = {"dataset": {"name": "npz", "path": "d.npz"}, "model": "fc3"}
FOLDER = {"dataset": {"name": "folder", "path": "imgs"}, "model": "fc3"}
# (id, change to BASE or raw YAML text, files to write, extra args, text in the error)
CASES: list[tuple[str, Any, dict[str, Any], list[str], str]] = [
    ("model-syntax-error", {"model": "ms1:make"}, _modules(ms1="class Net(\n"), [],
     "model: importing 'ms1' raised SyntaxError"),
    ("model-relative-path", {"model": "..pkg.ms2:make"}, _modules(ms2=LINEAR), [],
     "model: importing '..pkg.ms2' raised TypeError"),
    ("model-raises-on-import", {"model": "ms3:make"}, _modules(ms3="x = 1 / 0\n"), [],
     "model: importing 'ms3' raised ZeroDivisionError"),
    ("model-argparse-on-import", {"model": "ms4:make"},
     _modules(ms4="import argparse\nargparse.ArgumentParser().add_argument('--data', "
                  "required=True)\nargparse.ArgumentParser(exit_on_error=True).parse_args(['-z'])\n"),
     [], "model: importing 'ms4' exited (sys.exit(2)), as a script does"),
    ("factory-raises-systemexit", {"model": "ms5:make"},
     _modules(ms5="def make(shape, k):\n    raise SystemExit('bye')\n"), [],
     "model: ms5:make(input_shape, num_classes, **model_args) raised SystemExit"),
    ("loader-exits", {"dataset": {"name": "ls1:load"}, "model": "fc3"},
     _modules(ls1="import sys\ndef load():\n    sys.exit(None)\n"), [],
     "dataset.name: ls1:load(**dataset.args) raised SystemExit (it called sys.exit(None))"),
    ("loader-syntax-error", {"dataset": {"name": "ls2:load"}, "model": "fc3"},
     _modules(ls2="def load()\n    return 1\n"), [], "dataset.name: importing 'ls2' raised Syntax"),
    ("attack-module-exits", {"attacks": [{"name": "as1:A"}]},
     _modules(as1="import sys\nsys.exit('no attacks today')\n"), [],
     "attacks.0.name: cannot import attack 'as1:A' (attack: importing 'as1' exited"),
    ("attack-module-raises", {"attacks": [{"name": "as2:A"}]},
     _modules(as2="raise KeyError('registry')\n"), [], "importing 'as2' raised KeyError"),
    ("attack-named-with-a-slash", {"attacks": [{"name": "an1:A"}]},
     _modules(an1="from advlab.attacks.registry import AttackDef, Settings\n"
                  "A = AttackDef('up/down', 'minimization', ('l2',), ('untargeted',), Settings, "
                  "print)\n"), [], "attacks.0.name: attack name 'up/down': use 1 to 64"),
    ("attack-without-norms", {"attacks": [{"name": "an2:A"}]},
     _modules(an2="from advlab.attacks.registry import AttackDef, Settings\n"
                  "A = AttackDef('nonorm', 'fixed_budget', (), ('untargeted',), Settings, "
                  "print)\n"), [], "attacks.0.name: attack 'nonorm': no norms"),
    ("model-forward-exits", {"model": "mf1:make"},
     _modules(mf1=LINEAR.replace("return nn.Sequential(", "return Quits(").replace(
         "def make", "class Quits(nn.Sequential):\n    def forward(self, x):\n"
                     "        raise SystemExit(0)\n\ndef make")), [],
     "model: mf1:make's forward on a batch of data's shape raised SystemExit (it called "
     "sys.exit(0))"),
    ("float64-model", {"model": "md1:make"},
     _modules(md1=LINEAR.replace("math.prod(shape), k))", "math.prod(shape), k)).double()")),
     [], "model: md1:make has float64 parameters; advlab trains and attacks float32 images"),
    ("npz-symlink-loop", {"dataset": {"name": "npz", "path": "loop.npz"}, "model": "fc3"},
     {"loop.npz": _symlink_loop}, [], "loop.npz is no .npz file"),
    ("image-of-16-bit-pixels", FOLDER, {"imgs": _folder(wide="c")}, [],
     "deep.png has 16-bit pixels (mode I;16); advlab reads 8-bit images"),
    ("init-nan-weights", {"init": "w.pt"}, {"w.pt": _weights(float("nan"))}, [],
     "w.pt holds NaN or infinite values in 1.weight; save finite weights"),
    ("init-pickled-function", {"init": "w.pt"}, {"w.pt": _weights(pickled=os.getcwd)}, [],
     "w.pt (it holds Python objects besides tensors, and advlab never runs a pickle's code)"),
    ("npz-forged-header", NPZ, {"d.npz": _forged_npz}, [],
     "array 'x_train' claims shape (32768, 1073741824) (281474976710656 bytes)"),
    ("npz-cut-short", NPZ, {"d.npz": _cut_npz}, [], "dataset.path: cannot read"),
    ("labels-of-7e11", NPZ, {"d.npz": _npz(y_train=np.where(Y == 1, 7 * 10**11, Y))}, [],
     "labels run to 700000000000 but class 1 has no training example"),
    ("infinite-pixels", NPZ, {"d.npz": _npz(x_train=np.full((24, 5, 5), np.inf))}, [],
     "x_train has 600 pixels that are NaN or infinite"),
    ("image-of-36m-pixels", FOLDER, {"imgs": _folder(big="b")}, [],
     "huge.png is 6000 x 6000 pixels; advlab reads images of 1 to 33554432 pixels"),
    ("fifo-named-as-image", FOLDER, {"imgs": _folder(fifo="c")}, [],
     "pipe.png is no regular file; remove it"),
    ("yaml-4400-digit-integer", "name: hostile\ntrain: {epochs: " + "7" * 4400 + "}\n", {}, [],
     "a number has more than 4300 digits"),
    ("yaml-1e-4-reads-as-text", "name: hostile\nweight_decay: 1e-4\n", {}, [],
     "weight_decay: Input should be a valid number (got '1e-4'); YAML reads 1e-4 as text, "
     "write 1.0e-4"),
    ("set-1E3-reads-as-text", {}, {}, ["--set", "train.lr=1E3"],
     "YAML reads 1E3 as text, write 1.0e+3"),
    ("set-6000-digit-integer", {}, {}, ["--set", "train.lr=" + "3" * 6000],
     "--set train.lr: a number has more than 4300 digits"),
    ("set-a-7e11-parameter-model", {}, {}, ["--set", "model=fc10000000000-10"],
     "model: fc10000000000-10 has 750,000,000,010 parameters; training it needs about"),
    ("yaml-mappings-1000-deep", "name: hostile\nmodel_args: " + "{a: " * 1000 + "1" +
     "}" * 1000 + "\n", {}, [], "nested more than 50 levels deep"),
    ("one-class", NPZ, {"d.npz": _npz(y_train=np.full(24, 2), y_test=np.full(24, 2))}, [],
     "y_train holds one class (2); a classifier needs at least two classes"),
    ("one-class-zero", NPZ, {"d.npz": _npz(y_train=np.zeros(24, int), y_test=np.zeros(24, int))},
     [], "y_train holds one class (0); a classifier needs at least two classes"),
    ("zero-width-images", NPZ, {"d.npz": _npz(x_train=np.zeros((24, 5, 0), np.uint8),
                                              x_test=np.zeros((24, 5, 0), np.uint8))}, [],
     "x_train images are (1, 5, 0) (C, H, W): no pixels"),
    ("folder-middle-class-empty", FOLDER, {"imgs": _folder(empty="b")}, [],
     "imgs/train/b holds no images; give every class training images"),
    ("normalize-std-1e-9", {"dataset": {"name": "digits", "normalize": {"mean": [0.1],
                                                                       "std": [1e-9]}}}, {}, [],
     "dataset.normalize: a std below 1e-06"),
    ("model-without-parameters", {"model": "mp1:make"},
     _modules(mp1="import torch\nfrom torch import nn\nclass Fixed(nn.Module):\n"
                  "    def forward(self, x):\n        return x.flatten(1)[:, :10] * 1.0\n"
                  "def make(shape, k):\n    return Fixed()\n"), [],
     "model: mp1:make has no parameters to train"),
    ("int32-logits", {"model": "mi1:make"},
     _modules(mi1=LINEAR.replace("return nn.Sequential(", "return Int(").replace(
         "def make", "class Int(nn.Sequential):\n    def forward(self, x):\n"
                     "        return super().forward(x).int()\n\ndef make")), [],
     "model: mi1:make returns int32 logits; return floating-point logits"),
    *[  # search spaces: every choice and both ends of every range, checked as a grid point
        (f"search-{name}", {"search": {"algorithm": "random", "num_samples": 2,
                                       "space": space}} | extra, files, [], expected)
        for name, space, extra, files, expected in [
            ("unimportable-model", {"model": {"choice": ["fc10", "gone:make"]}}, {}, {},
             "search.space.model: 'gone:make' makes no valid trial: model: cannot import"),
            ("subset-larger-than-the-data", {"subset": {"choice": ["p1", "per_class:999"]}},
             {}, {}, "search.space.subset: 'per_class:999' makes a trial that cannot run: "
                     "subset: 'per_class:999' asks for more examples"),
            ("args-the-factory-refuses", {"model_args": {"choice": [{}, {"depth": 4}]}},
             {"model": "mc1:make"}, _modules(mc1=LINEAR.replace("**kw", "width=3")),
             "search.space.model_args: {'depth': 4} makes a trial that cannot run: model: "
             "mc1:make(input_shape, num_classes, **model_args) raised TypeError"),
            ("zero-byte-init", {"init": {"choice": ["empty.pt"]}}, {}, {"empty.pt": ""},
             "search.space.init: 'empty.pt' makes a trial that cannot run: init: cannot load"),
            ("normalize-for-two-channels", {"dataset.normalize": {"choice": [
                {"mean": [0.1, 0.2], "std": [0.3, 0.3]}]}}, {}, {},
             "2 means for 1-channel images; give 1"),
            ("uniform-over-the-seed", {"seed": {"uniform": [0, 7]}}, {}, {},
             "search.space.seed: uniform samples fractions such as 2.59, which seed does not "
             "take; use {int: [0, 7]}"),
            ("loguniform-over-batch-size", {"train.batch_size": {"loguniform": [8, 64]}}, {},
             {}, "search.space.train.batch_size: loguniform samples fractions"),
            ("a-gridded-setting", {"train.lr": {"uniform": [0.01, 0.1]}},
             {"grid": {"train": [{"epochs": 1}, {"epochs": 2}]}}, {},
             "search.space.train.lr: train is also a grid axis; sample it or grid it, not both"),
            ("a-setting-of-the-cases", {"seed": {"int": [0, 9]}},
             {"cases": [{"seed": 1}, {"seed": 2, "model": "fc16-10"}]}, {},
             "search.space.seed: seed is also set by cases; sample it or grid it, not both"),
        ]
    ],
    ("optuna-metric-empty-list", {"search": {"algorithm": "optuna", "metric": [], "mode": [],
                                             "space": {"train.lr": {"uniform": [0.01, 0.1]}}}},
     {}, [], "search.metric: optuna needs the metric it optimises"),
    ("optuna-metric-blank", {"search": {"algorithm": "optuna", "metric": ["test_error", " "],
                                        "mode": ["min", "min"],
                                        "space": {"train.lr": {"uniform": [0.01, 0.1]}}}},
     {}, [], "search.metric: a metric is empty"),
]  # fmt: skip


# `advlab trial --index 0` runs one grid point: every case but a search's (which it does not
# sample) is refused there the same way.
PARAMS = [
    pytest.param(command, *case[1:], id=f"{command}-{case[0]}")
    for command in ("validate", "sweep", "trial")
    for case in CASES
    if command != "trial" or not case[0].startswith(("search-", "optuna-"))
]


@pytest.mark.parametrize(("command", "change", "files", "args", "expected"), PARAMS)
def test_hostile_input_is_one_line_exit_2_within_10_s_and_writes_nothing(
    command: str, change: Any, files: dict[str, Any], args: list[str], expected: str,
    tmp_path: Path, capsys, monkeypatch,
) -> None:  # fmt: skip
    import ray

    def must_not_start(*a: object, **k: object) -> None:
        raise AssertionError("Ray started despite bad input")

    monkeypatch.setattr(ray, "init", must_not_start)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # importing writes no __pycache__
    for name, content in files.items():
        target = tmp_path / name
        content(target) if callable(content) else target.write_text(content)
    path = tmp_path / "s.yaml"
    raw = change if isinstance(change, str) else yaml.safe_dump(
        BASE | {"storage": str(tmp_path / "results")} | change
    )  # fmt: skip
    path.write_text(raw)
    before = sorted(tmp_path.rglob("*"))
    start = time.monotonic()
    assert main([command, str(path), *args]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("advlab: error: ") and expected in err, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    for name in files:  # the next case's modules of the same name are other modules
        sys.modules.pop(name.removesuffix(".py"), None)


def test_there_is_a_case_for_every_kind_the_issue_names() -> None:
    assert len(CASES) >= 25


# --------------------------------------------------------------------------- mid-trial exits

EXITING = """
import sys
import torch
from advlab.attacks.registry import AttackDef, Settings
from advlab.measures import MeasureDef
import pyarrow as pa


def run_away(model, x, y, *, eps, norm, target, generator):
    sys.exit(7)


RUN_AWAY = AttackDef("run_away", "minimization", ("l2",), ("untargeted",), Settings, run_away)


def leave(ctx, settings):
    raise SystemExit("measured enough")


LEAVE = MeasureDef("leave", "trial", pa.schema([("trial_id", pa.string())]), leave)
"""


def test_an_attack_or_measure_that_exits_mid_trial_fails_that_run_only(
    tmp_path: Path, monkeypatch
) -> None:
    from advlab.store import SweepStore
    from advlab.sweep import trial_context
    from advlab.sweepfile import load_sweep
    from advlab.trial import run_trial

    (tmp_path / "exiting.py").write_text(EXITING)
    raw = BASE | {"storage": str(tmp_path / "results"), "attack_examples": 3}
    raw |= {"attacks": [{"name": "exiting:RUN_AWAY"}, {"name": "fgsm"}]}
    raw |= {"measures": [{"name": "exiting:LEAVE"}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_sweep(path)
    result = run_trial(
        spec.trials[0], trial_context(spec, 0, str(tmp_path / "results"), "disabled")
    )
    assert result.row["status"] == "ok"
    store = SweepStore(str(tmp_path / "results"), "hostile")
    attacks = store.read("attacks").set_index("attack")
    assert attacks.loc["run_away", "status"] == "failed"
    assert attacks.loc["run_away", "reason"].startswith("SystemExit (it called sys.exit(7))")
    assert (attacks.loc["fgsm", "status"] == "ok").all()
    measure = store.read("measures").iloc[0]
    assert (measure["status"], measure["reason"][:10]) == ("failed", "SystemExit")


def test_a_training_method_that_exits_fails_its_trial_with_the_reason(
    tmp_path: Path, capsys
) -> None:
    from advlab.plugins import UserExit
    from advlab.store import SweepStore
    from advlab.sweep import trial_context
    from advlab.sweepfile import load_sweep
    from advlab.trial import run_trial

    (tmp_path / "quits.py").write_text(
        "import sys\nfrom torch import nn\nclass Quit(nn.Sequential):\n"
        "    def forward(self, x):\n        if self.training:\n            sys.exit(5)\n"
        "        return super().forward(x)\n"
        "def make(shape, k):\n    return Quit(nn.Flatten(), nn.Linear(64, k))\n"
    )
    raw = BASE | {"storage": str(tmp_path / "results"), "model": "quits:make"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_sweep(path)
    with pytest.raises(UserExit, match=r"user code SystemExit \(it called sys.exit\(5\)\)"):
        run_trial(spec.trials[0], trial_context(spec, 0, str(tmp_path / "results"), "disabled"))
    row = SweepStore(str(tmp_path / "results"), "hostile").read("trials").iloc[0]
    assert row["status"] == "failed"
    assert row["reason"].startswith("UserExit: user code SystemExit (it called sys.exit(5))")
    capsys.readouterr()
    assert main(["trial", str(path)]) == 1  # the same through `advlab trial`: one line
    err = capsys.readouterr().err.strip()
    assert err.startswith("advlab: error: the trial failed: user code SystemExit (it called ")
    assert len(err.splitlines()) == 1
    sys.modules.pop("quits", None)


def test_channels_last_images_are_detected_and_turned_channels_first() -> None:
    from advlab.sources import arrays_to_dataset

    x = (RNG.random((24, 6, 5, 3)) * 255).astype(np.uint8)  # (N, H, W, C), as PIL keeps it
    data = arrays_to_dataset("rgb", {"x_train": x, "y_train": Y, "x_test": x, "y_test": Y}, "t")
    assert data.input_shape == (3, 6, 5)
    np.testing.assert_allclose(data.x_train[4, 2].numpy(), x[4, :, :, 2] / 255, rtol=1e-6)
    gray = arrays_to_dataset("g", {"x_train": X, "y_train": Y, "x_test": X, "y_test": Y}, "t")
    assert gray.input_shape == (1, 5, 5)  # (N, H, W) as before


def test_validate_states_the_layout_it_read_and_refuses_a_shape_that_reads_both_ways(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = (RNG.random((24, 6, 5, 3)) * 255).astype(np.uint8)  # (N, H, W, C)
    shapes = {"last": last, "first": last.transpose(0, 3, 1, 2), "gray": X}
    shapes["both"] = (RNG.random((24, 3, 6, 3)) * 255).astype(np.uint8)  # 3 of 6x3, or 3 of 3x6
    said = {}
    for name, x in shapes.items():
        np.savez(tmp_path / f"{name}.npz", x_train=x, y_train=Y, x_test=x, y_test=Y)
        raw = BASE | {"dataset": {"name": "npz", "path": f"{name}.npz"}, "model": "fc3"}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw | {"storage": str(tmp_path / "results")}))
        capsys.readouterr()
        code = main(["validate", str(path)])
        out, err = capsys.readouterr()
        said[name] = (code, out.splitlines()[-1].strip() if code == 0 else err.strip())
    images = "24 training images, 24 test images, 3 classes"
    assert said["last"] == (
        0,
        f"data last: images (N, H, W, C), read as (N, C, H, W) = 3x6x5; {images}",
    )
    assert said["first"] == (
        0,
        f"data first: images (N, C, H, W), read as (N, C, H, W) = 3x6x5; {images}",
    )
    assert said["gray"] == (
        0,
        f"data gray: images (N, H, W), read as (N, C, H, W) = 1x5x5; {images}",
    )
    code, line = said["both"]
    assert code == 2 and "\n" not in line
    assert (
        "x_train has shape (24, 3, 6, 3), which reads as 3 channels of 6x3 or 3 channels of 3x6"
        in line
    )
    assert line.endswith(
        "save the images as (N, C, H, W) or (N, H, W, C) with height and width above 4"
    )
    # Image files have a known layout: tiny RGB images (3x3 pixels) are read, not refused.
    for split in ("train", "test"):
        for label in range(2):
            folder = tmp_path / "tiny" / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = (RNG.random((3, 3, 3)) * 255).astype(np.uint8)
                Image.fromarray(pixels, mode="RGB").save(folder / f"{i}.png")
    raw = BASE | {"dataset": {"name": "folder", "path": "tiny"}, "model": "fc2"}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw | {"storage": str(tmp_path / "results")}))
    assert main(["validate", str(path)]) == 0
    assert "data tiny: images (N, C, H, W), read as (N, C, H, W) = 3x3x3" in capsys.readouterr().out


@pytest.mark.slow
def test_a_search_over_relative_init_paths_runs_its_samples(ray_local, tmp_path: Path) -> None:
    import torch

    from advlab import results
    from advlab.models import build_model

    for seed, name in enumerate(("a.pt", "b.pt")):
        torch.manual_seed(seed)
        torch.save(build_model("fc10", (1, 8, 8), 10).state_dict(), tmp_path / name)
    raw = BASE | {"storage": str(tmp_path / "results"), "train": {"epochs": 0}}
    raw["search"] = {"algorithm": "random", "num_samples": 3,
                     "space": {"init": {"choice": ["a.pt", "b.pt"]}}}  # fmt: skip
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 0
    trials = results.load(str(tmp_path / "results" / "hostile")).trials
    assert (trials["status"] == "ok").all() and len(trials) >= 1  # the samples may repeat
    assert set(trials["init"]) <= {str(tmp_path / "a.pt"), str(tmp_path / "b.pt")}


def test_one_colour_image_makes_both_splits_colour(tmp_path: Path) -> None:
    from advlab.datafiles import read_image_folder

    _folder()(tmp_path / "s.yaml")  # gray images in imgs/
    Image.new("RGBA", (5, 5), (255, 0, 0, 128)).save(tmp_path / "imgs" / "train" / "a" / "r.png")
    arrays = read_image_folder(tmp_path / "imgs")
    assert arrays["x_train"].shape == (7, 3, 5, 5) and arrays["x_test"].shape == (6, 3, 5, 5)
    np.testing.assert_array_equal(arrays["x_test"][0, 1], X[0])  # gray, repeated per channel
    assert arrays["x_train"][2, :, 0, 0].tolist() == [255, 0, 0]  # the red one, sorted a: 0 1 r


@pytest.mark.parametrize("kind", ["fifo", "folder", "dangling-symlink"])
def test_a_sweep_file_that_is_no_regular_file_is_refused_without_blocking(
    kind: str, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "s.yaml"
    if kind == "fifo":
        os.mkfifo(path)  # opening it to read would wait for a writer forever
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "gone.yaml")
    start = time.monotonic()
    assert main(["validate", str(path)]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err.strip()
    what = "no such sweep file" if kind == "dangling-symlink" else "is no regular file"
    assert err == f"advlab: error: {path}: {what}; pass the path of a YAML sweep file"


BROKEN_ATTACKS = """
import torch
from advlab.attacks.base import AttackResult, finish
from advlab.attacks.registry import AttackDef, Settings


def _raw(x, y, points):  # a result built by hand, as a plug-in may, without finish()
    n = len(x)
    zeros = torch.zeros(n, dtype=torch.int64)
    return AttackResult(points, torch.ones(n, dtype=torch.bool), zeros, zeros - 1, zeros)


def nan_points(model, x, y, *, eps, norm, target, generator):
    return finish(model, x * float("inf"), y, None, torch.zeros(len(x), dtype=torch.int64))


def nothing(model, x, y, *, eps, norm, target, generator):
    return None


def outside(model, x, y, *, eps, norm, target, generator):
    return _raw(x, y, x + 0.5)


def cropped(model, x, y, *, eps, norm, target, generator):
    return _raw(x, y, x[..., :4])


def _attack(name, run):
    return AttackDef(name, "minimization", ("l2",), ("untargeted",), Settings, run)


NAN, NOTHING, OUTSIDE, CROPPED = (_attack(n, f) for n, f in (
    ("nan", nan_points), ("nothing", nothing), ("outside", outside), ("cropped", cropped)))
"""


def test_a_plug_in_attack_that_breaks_its_contract_fails_that_attack_only(
    tmp_path: Path,
) -> None:
    from advlab.store import SweepStore
    from advlab.sweep import trial_context
    from advlab.sweepfile import load_sweep
    from advlab.trial import run_trial

    (tmp_path / "broken.py").write_text(BROKEN_ATTACKS)
    names = ["NAN", "NOTHING", "OUTSIDE", "CROPPED"]
    raw = BASE | {"storage": str(tmp_path / "results"), "attack_examples": 3}
    raw["attacks"] = [{"name": f"broken:{n}"} for n in names] + [{"name": "fgsm"}]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_sweep(path)
    result = run_trial(
        spec.trials[0], trial_context(spec, 0, str(tmp_path / "results"), "disabled")
    )
    assert result.row["status"] == "ok"
    store = SweepStore(str(tmp_path / "results"), "hostile")
    reasons = store.read("attacks").groupby("attack")["reason"].first().to_dict()
    assert reasons == {
        "nan": "AttackError: returned NaN or infinite points",
        "nothing": "AttackError: returned a NoneType, not an AttackResult",
        "outside": "AttackError: returned points outside the [0, 1] box; clamp them (see finish)",
        "cropped": "AttackError: returned points of shape (3, 1, 8, 4) for a batch of (3, 1, 8, 8)",
        "fgsm": "",
    }
    examples = store.read("examples")
    assert set(examples["attack"]) == {"fgsm"}  # no broken attack's points were stored
    for module in ("broken",):
        sys.modules.pop(module, None)


def test_an_interrupt_outside_a_sweep_is_one_line_and_exit_130(tmp_path: Path, capsys) -> None:
    (tmp_path / "ki1.py").write_text("def make(shape, k):\n    raise KeyboardInterrupt\n")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(BASE | {"storage": str(tmp_path / "r"), "model": "ki1:make"}))
    assert main(["validate", str(path)]) == 130  # as Ctrl-C while the factory ran
    err = capsys.readouterr().err.strip()
    assert err == "advlab: interrupted; run the same command again to resume"
    sys.modules.pop("ki1", None)


def test_an_image_named_in_bytes_that_are_not_utf8_is_read_and_digested(tmp_path: Path) -> None:
    from advlab.datafiles import read_image_folder
    from advlab.digests import folder_digest

    _folder()(tmp_path / "s.yaml")
    odd = os.fsdecode(bytes(tmp_path / "imgs" / "train" / "b") + b"/\xff\xfe.png")
    Image.fromarray(X[5]).save(odd, format="PNG")  # a name no UTF-8 decoder reads
    first = folder_digest(tmp_path / "imgs")
    assert len(read_image_folder(tmp_path / "imgs")["x_train"]) == 7
    Image.fromarray(X[6]).save(odd, format="PNG")
    assert folder_digest(tmp_path / "imgs") != first


def test_a_module_that_sets_torchs_default_dtype_as_it_is_imported_changes_nothing(
    tmp_path: Path, monkeypatch
) -> None:
    import torch

    from advlab.plugins import import_object

    source = "import torch\ntorch.set_default_dtype(torch.float64)\nX = 1\n"
    (tmp_path / "dd1.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_object("dd1:X", "model") == 1
    assert torch.get_default_dtype() == torch.float32  # advlab's float32 images still fit
    sys.modules.pop("dd1", None)
