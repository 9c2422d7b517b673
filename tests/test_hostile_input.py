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


def _folder(empty: str = "", big: str = "", fifo: str = "") -> Callable[[Path], None]:
    """An image folder of classes a, b, c: `empty` has no training image, `big` holds one
    image of 6,000 x 6,000 pixels, `fifo` a FIFO named like an image."""

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
    ("set-6000-digit-integer", {}, {}, ["--set", "train.lr=" + "3" * 6000],
     "--set train.lr: a number has more than 4300 digits"),
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


@pytest.mark.parametrize(
    ("change", "files", "args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
@pytest.mark.parametrize("command", ["validate", "sweep"])
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


def test_a_training_method_that_exits_fails_its_trial_with_the_reason(tmp_path: Path) -> None:
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
