"""Identity from content: a trial's id and training key hash the files it reads (init weights,
npz data, an image folder, the model, loader and attack modules), so changing any one input
file of a finished sweep reruns exactly the trials that read it, with new rows, and an
unchanged file never reruns anything. Built-in data and models keep the ids they had."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from advlab import manifest
from advlab.attacks import registry as attack_registry
from advlab.cli import main
from advlab.models import build_model
from advlab.spec import TrialSpec
from advlab.store import SweepStore
from advlab.sweep import finished, trial_context
from advlab.sweepfile import load_sweep
from advlab.trial import run_trial

NETS = """
import math
from torch import nn

def make(input_shape, num_classes, width=WIDTH):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
        nn.Linear(width, num_classes),
    )
"""

# A model module whose width lives in a helper module beside it: the helper is an input too.
HELPED = """
from netparts import make_net


def make(input_shape, num_classes):
    return make_net(input_shape, num_classes)
"""

LOADER = """
import numpy as np
from sklearn.datasets import load_digits

def load():
    bunch = load_digits()
    x, y = (bunch.images / 16.0)[:300], bunch.target[:300]
    x[:, :, 0] = SHADE  # one column of every image
    return {"x_train": x[:200], "y_train": y[:200], "x_test": x[200:], "y_test": y[200:]}
"""

ATTACK = """
import torch
from advlab.attacks.base import finish
from advlab.attacks.registry import AttackDef, Settings


def toward_gray(model, x, y, *, eps, norm, target, generator):
    # The point FRACTION of the way from x to the gray image.
    point = x + FRACTION * (0.5 - x)
    return finish(model, point, y, None, torch.zeros(len(x), dtype=torch.int64))


GRAY = AttackDef("gray", "minimization", ("l2", "rms"), ("untargeted",), Settings, toward_gray)
"""

# case -> the input file it reads besides built-in code (None: none)
CASES = [
    ({"model": "nets:make", "dataset": {"name": "npz", "path": "d.npz"}}, "nets.py d.npz"),
    ({"model": "fc10", "init": "w.pt"}, "w.pt"),
    ({"model": "fc3", "dataset": {"name": "folder", "path": "imgs"}}, "imgs"),
    ({"model": "fc10", "dataset": {"name": "loaders:load"}}, "loaders.py"),
    ({"model": "helped:make"}, "helped.py netparts.py"),
    ({"model": "fc10"}, ""),
]


def _digits(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return (bunch.images[:n] * 255 / 16).astype(np.uint8), bunch.target[:n]


def _write_inputs(folder: Path) -> None:
    (folder / "nets.py").write_text(NETS.replace("WIDTH", "8"))
    (folder / "helped.py").write_text(HELPED)
    (folder / "netparts.py").write_text(
        NETS.replace("WIDTH", "6").replace("def make", "def make_net")
    )
    (folder / "loaders.py").write_text(LOADER.replace("SHADE", "0.0"))
    (folder / "attacks_mod.py").write_text(ATTACK.replace("FRACTION", "0.5"))
    x, y = _digits()
    np.savez(folder / "d.npz", x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    _save_weights(folder / "w.pt", seed=0)
    for split, part in (("train", slice(0, 150)), ("test", slice(150, 220))):
        for i, (image, label) in enumerate(zip(x[part], y[part], strict=True)):
            if label < 3:  # three classes
                target = folder / "imgs" / split / f"c{label}"
                target.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(target / f"{i:04d}.png")


def _save_weights(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    torch.save(build_model("fc10", (1, 8, 8), 10).state_dict(), path)


def _change(folder: Path, name: str) -> None:
    """A real change to one input file (new bytes that change what the trial computes)."""
    if name == "nets.py":
        (folder / name).write_text(NETS.replace("WIDTH", "24"))
    elif name == "netparts.py":
        (folder / name).write_text(NETS.replace("WIDTH", "12").replace("def make", "def make_net"))
    elif name == "loaders.py":
        (folder / name).write_text(LOADER.replace("SHADE", "1.0"))
    elif name == "attacks_mod.py":
        (folder / name).write_text(ATTACK.replace("FRACTION", "0.75"))
    elif name == "d.npz":
        x, y = _digits()
        np.savez(folder / name, x_train=255 - x[:200], y_train=y[:200], x_test=x[200:],
                 y_test=y[200:])  # fmt: skip
    elif name == "w.pt":
        _save_weights(folder / name, seed=7)
    elif name == "imgs":
        image = folder / "imgs" / "train" / "c1"
        first = sorted(image.iterdir())[0]
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(first)
    _forget_modules()


def _forget_modules() -> None:
    """A process imports a module once (a sweep's processes are new ones); this test's one
    process must forget the old modules by hand."""
    for module in ("nets", "helped", "netparts", "loaders", "attacks_mod"):
        sys.modules.pop(module, None)
    attack_registry._REGISTRY.pop("attacks_mod:GRAY", None)
    importlib.invalidate_caches()


def _sweep_file(folder: Path) -> Path:
    raw = {
        "name": "ident",
        "storage": str(folder / "results"),
        "cases": [case for case, _ in CASES],
        "train": {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
        "eps": [0.1],
        "attack_examples": 8,
        "attacks": [{"name": "fgsm"}, {"name": "attacks_mod:GRAY"}],
        "measures": [],
        "transfer": {"enabled": False},
        "wandb": {"mode": "disabled"},
    }
    path = folder / "ident.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _run(path: Path) -> set[int]:
    """What `advlab sweep` does without Ray: record the version, run every trial that is not
    finished (advlab.sweep.finished decides, as for a sweep); returns the cases that ran."""
    spec = load_sweep(path)
    store = SweepStore(spec.settings.storage, spec.name)
    store.write_manifest(manifest.record_version(store.read_manifest(), spec))
    done = finished(store, spec)
    ran = set()
    for index, trial in enumerate(spec.trials):
        if trial.trial_id() not in done:
            run_trial(trial, trial_context(spec, index, store.storage, "disabled"))
            ran.add(index)
    return ran


def _rows(path: Path) -> dict[int, dict[str, Any]]:
    """Per case: its trial id, training key, test error, final training loss, its gray
    attack's id and points."""
    spec = load_sweep(path)
    store = SweepStore(spec.settings.storage, spec.name)
    out = {}
    for index, trial in enumerate(spec.trials):
        row = store.read_trial("trials", trial.trial_id()).iloc[0]
        attacks = store.read_trial("attacks", trial.trial_id()).set_index("attack")
        examples = store.read_trial("examples", trial.trial_id())
        gray = np.stack(examples.loc[examples["attack"] == "gray", "x_adv"].to_numpy())
        epochs = store.read_trial("epochs", trial.trial_id())
        out[index] = {
            "trial_id": row["trial_id"],
            "training_key": row["training_key"],
            "test_error": float(row["test_error"]),
            "loss": float(epochs["loss"].iloc[-1]),
            "gray_id": attacks.loc["gray", "attack_id"],
            "gray_mean": float(gray.mean()),  # the points it found, fooling or not
        }
    return out


@pytest.fixture
def folder(tmp_path: Path, one_torch_thread) -> Path:
    """A finished sweep over every case, its input files beside its sweep file."""
    _forget_modules()  # another test's, same names
    _write_inputs(tmp_path)
    assert _run(_sweep_file(tmp_path)) == set(range(len(CASES)))
    return tmp_path


@pytest.mark.parametrize(
    "changed", ["w.pt", "d.npz", "imgs", "nets.py", "netparts.py", "loaders.py"]
)
def test_changing_one_input_file_reruns_exactly_the_trials_that_read_it(
    folder: Path, changed: str
) -> None:
    path = _sweep_file(folder)
    before = _rows(path)
    assert _run(path) == set()  # unchanged files: nothing reruns
    _change(folder, changed)
    readers = {i for i, (_, files) in enumerate(CASES) if changed in files.split()}
    assert _run(path) == readers
    after = _rows(path)
    for index in range(len(CASES)):
        if index in readers:  # a new trial, trained anew on the new file
            assert after[index]["trial_id"] != before[index]["trial_id"]
            assert after[index]["training_key"] != before[index]["training_key"]
            assert after[index]["loss"] != before[index]["loss"]
        else:
            assert after[index] == before[index]
    assert _run(path) == set()


def test_changing_an_attack_module_reruns_that_attack_only(folder: Path) -> None:
    path = _sweep_file(folder)
    before = _rows(path)
    trials = {p.name: p.read_bytes() for p in (folder / "results/ident/trials").iterdir()}
    _change(folder, "attacks_mod.py")
    assert _run(path) == set(range(len(CASES)))  # every trial gains the new gray run...
    after = _rows(path)
    for index in range(len(CASES)):
        for key in ("trial_id", "training_key", "test_error", "loss"):
            assert after[index][key] == before[index][key]  # ...and none retrains
        assert after[index]["gray_id"] != before[index]["gray_id"]
        assert after[index]["gray_mean"] != before[index]["gray_mean"]
    assert {p.name: p.read_bytes() for p in (folder / "results/ident/trials").iterdir()} == trials


def test_trials_on_built_in_data_and_models_keep_their_ids() -> None:
    # Pinned: ids of trials that read no input file must never change with this feature.
    assert TrialSpec().trial_id() == TrialSpec.model_validate({}).trial_id()
    spec = TrialSpec(model="fc100-100-10", weight_decay=1e-4, seed=3)
    assert spec.input_digests() == {}
    assert spec.trial_id() == _hash_without_inputs(spec)


def _hash_without_inputs(spec: TrialSpec) -> str:
    from advlab.spec import EVALUATION_KEYS, _content_hash

    content = spec.model_dump(mode="json", exclude=set(EVALUATION_KEYS), exclude_defaults=True)
    return _content_hash(content)


@pytest.mark.slow
def test_replaced_init_weights_retrain_in_a_real_sweep(ray_local, tmp_path: Path, capsys) -> None:
    _save_weights(tmp_path / "weights.pt", seed=1)
    raw = {
        "name": "w", "storage": str(tmp_path / "results"), "model": "fc10", "init": "weights.pt",
        "train": {"epochs": 0}, "attack_examples": 5, "attacks": [{"name": "fgsm"}],
        "measures": [], "transfer": {"enabled": False}, "wandb": {"mode": "disabled"},
    }  # fmt: skip
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 0
    first = SweepStore(str(tmp_path / "results"), "w").read("trials")
    _save_weights(tmp_path / "weights.pt", seed=2)  # other weights, same path
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 0
    assert "already finished" not in capsys.readouterr().out
    spec = load_sweep(path).trials[0]
    rows = SweepStore(str(tmp_path / "results"), "w").read("trials").set_index("trial_id")
    assert spec.trial_id() != first["trial_id"].iloc[0]
    assert rows.loc[spec.trial_id(), "test_error"] != first["test_error"].iloc[0]


def test_a_modules_digest_covers_the_user_modules_it_imports(tmp_path: Path, monkeypatch) -> None:
    from advlab.digests import module_digest

    files = {
        "main.py": "import numpy\nimport pkg.sub\nfrom advlab.models import build_model\n",
        "pkg/__init__.py": "",
        "pkg/sub.py": "from .deep import y\nfrom . import sibling\n",
        "pkg/deep.py": "y = 1\n",
        "pkg/sibling.py": "raise SystemExit('never imported to be digested')\n",
        "other.py": "z = 1\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    first = module_digest("main:make")
    (tmp_path / "other.py").write_text("z = 22\n")  # imported by nothing: no change
    assert module_digest("main:make") == first
    for name in ("pkg/deep.py", "pkg/__init__.py", "pkg/sibling.py"):
        before = module_digest("main:make")
        (tmp_path / name).write_text(files[name] + "# changed\n")
        assert module_digest("main:make") != before, name
    assert "pkg" not in sys.modules and "main" not in sys.modules  # found, never imported
    (tmp_path / "main.py").write_text(files["main.py"] + "import other\n")  # a new import
    before = module_digest("main:make")
    (tmp_path / "other.py").write_text("z = 333\n")
    assert module_digest("main:make") != before  # followed from the edited file at once
    alone = tmp_path / "alone.py"
    alone.write_text("import os\n")  # one file: its own digest, as before helpers counted
    from advlab.digests import file_digest

    assert module_digest("alone:f") == file_digest(alone)


def test_training_method_and_measure_modules_are_inputs_too(tmp_path: Path, monkeypatch) -> None:
    from types import SimpleNamespace

    from advlab.digests import run_inputs, trial_inputs

    (tmp_path / "tm.py").write_text("METHOD = None\n")
    (tmp_path / "ms.py").write_text("from msparts import M\n")
    (tmp_path / "msparts.py").write_text("M = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    method = SimpleNamespace(adversarial=SimpleNamespace(method="tm:METHOD"))
    spec = SimpleNamespace(init=None, dataset=SimpleNamespace(name="digits"), model="fc10",
                           train=method)  # fmt: skip
    first, measure = trial_inputs(spec), run_inputs("ms:M")
    assert set(first) == {"train.adversarial.method"} and set(measure) == {"module"}
    (tmp_path / "tm.py").write_text("METHOD = 'changed'\n")
    (tmp_path / "msparts.py").write_text("M = 'changed'\n")  # the measure's helper
    assert trial_inputs(spec) != first and run_inputs("ms:M") != measure
    assert run_inputs("fgsm") == {}  # built in: no file
