"""RGB data at CIFAR scale: streaming (memory-mapped npz, image folders read per batch),
augmentation, mixed precision, and channels-last data, each against the in-memory path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cifar_like, tiny_sweep

from advlab.augment import augment_batch, autocast, random_crop
from advlab.data import DataError
from advlab.sources import load_data
from advlab.spec import AugmentSpec, SpecError, TrainSpec
from advlab.store import SweepStore
from advlab.sweep import trial_context
from advlab.sweepfile import parse_sweep
from advlab.trial import run_trial


def rgb_arrays(seed: int = 0, n_train: int = 96, n_test: int = 48, size: int = 8) -> dict:
    """Three classes of (N, H, W, 3) uint8 images, each class brightest in its own channel."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        x = (rng.random((n, size, size, 3)) * 100).astype(np.uint8)
        x[np.arange(n), :, :, y] += 120
        return x, y

    (x_train, y_train), (x_test, y_test) = split(n_train), split(n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def write_pngs(arrays: dict, root: Path) -> Path:
    """The arrays as PNG folders, <split>/<class>/<i>.png, by cifar_like.py's own writer."""
    cifar_like().write_pngs(arrays, root)
    return root


# --------------------------------------------------------------------------- reading


def test_streamed_npz_reads_the_same_pixels_as_loaded(tmp_path: Path) -> None:
    arrays = rgb_arrays()
    np.savez(tmp_path / "rgb.npz", **arrays)
    loaded = load_data("npz", path=str(tmp_path / "rgb.npz"))
    streamed = load_data("npz", path=str(tmp_path / "rgb.npz"), streaming=True)
    assert loaded.layout == streamed.layout == "(N, H, W, C)"
    assert streamed.input_shape == loaded.input_shape == (3, 8, 8)
    assert torch.equal(streamed.x_train.to("cpu"), loaded.x_train)
    rows = torch.tensor([40, 3, 17, 3])  # out of order, repeated: indexed like a tensor
    assert torch.equal(streamed.x_test[rows].to("cpu"), loaded.x_test[rows])
    assert torch.equal(streamed.x_test[5:9].to("cpu"), loaded.x_test[5:9])
    assert torch.equal(streamed.y_train, loaded.y_train)


def test_streamed_folder_reads_the_same_pixels_as_loaded(tmp_path: Path) -> None:
    root = write_pngs(rgb_arrays(n_train=24, n_test=9), tmp_path / "pngs")
    loaded = load_data("folder", path=str(root))
    streamed = load_data("folder", path=str(root), streaming=True)
    assert streamed.input_shape == loaded.input_shape == (3, 8, 8)
    assert torch.equal(streamed.x_train.to("cpu"), loaded.x_train)
    assert torch.equal(streamed.y_test, loaded.y_test)


def test_streaming_refuses_a_compressed_npz_in_one_line(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "small.npz", **rgb_arrays())
    with pytest.raises(DataError, match="not savez_compressed") as err:
        load_data("npz", path=str(tmp_path / "small.npz"), streaming=True)
    assert "\n" not in str(err.value)


def test_streaming_refuses_float_pixels_outside_the_box(tmp_path: Path) -> None:
    arrays = rgb_arrays()
    arrays["x_test"] = arrays["x_test"].astype(np.float32) / 100.0  # up to 2.2
    np.savez(tmp_path / "float.npz", **arrays)
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        load_data("npz", path=str(tmp_path / "float.npz"), streaming=True)


# --------------------------------------------------------------------------- augmentation


def test_random_crop_is_the_padded_image_sliced_at_each_offset() -> None:
    x = torch.rand(5, 3, 6, 7)
    gen = torch.Generator().manual_seed(3)
    got = random_crop(x, 2, gen)
    # the same draw, replayed: each image is a slice of its zero-padded copy
    offsets = torch.randint(0, 5, (2, 5), generator=torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(5):
        r, c = int(offsets[0, i]), int(offsets[1, i])
        assert torch.equal(got[i], padded[i, :, r : r + 6, c : c + 7])


def test_flip_mirrors_about_half_and_off_draws_nothing() -> None:
    x = torch.rand(400, 1, 2, 3)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert augment_batch(x, AugmentSpec(), gen) is x
    assert torch.equal(gen.get_state(), state)  # off: the shuffle's stream is as before
    out = augment_batch(x, AugmentSpec(flip=True), gen)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert bool((flipped | same).all())
    # 400 fair coins: 200 +- 50 is over 5 standard deviations (10 each side)
    assert 150 < int(flipped.sum()) < 250


# --------------------------------------------------------------------------- precision


def test_float16_on_cpu_is_refused_in_one_line_and_bfloat16_runs() -> None:
    with (
        pytest.raises(RuntimeError, match="float16 needs a GPU"),
        autocast("float16", torch.device("cpu")),
    ):
        pass
    layer = torch.nn.Linear(4, 3)
    with autocast("bfloat16", torch.device("cpu")):
        out = layer(torch.rand(2, 4))
    assert out.dtype == torch.bfloat16
    with autocast("float32", torch.device("cpu")):
        assert layer(torch.rand(2, 4)).dtype == torch.float32


# --------------------------------------------------------------------------- trials


def rgb_sweep(dataset: dict, **train: object) -> dict:
    return tiny_sweep(
        name="rgb",
        dataset=dataset,
        grid={"model": ["cnn"]},
        subset="all",
        activation="relu",
        train={"epochs": 2, "batch_size": 16, "optimizer": "adam", "lr": 0.01, **train},
        eps=[0.05],
        attack_examples=6,
        attacks=[{"name": "fgsm"}],
        measures=[],
    )


def trial_outputs(raw: dict, storage: Path) -> tuple[dict, dict, list]:
    spec = parse_sweep(raw)
    row = run_trial(spec.trials[0], trial_context(spec, 0, str(storage), "disabled")).row
    store = SweepStore(str(storage), "rgb")
    weights = store.load_model(spec.trials[0].training_key())["model"]
    examples = store.read("examples").sort_values("example")
    return row, weights, examples["x_adv"].map(list).tolist()


AUGMENT = {"crop_padding": 2, "flip": True}


def test_streamed_training_gives_the_in_memory_weights_bit_for_bit(
    tmp_path: Path, one_torch_thread: None
) -> None:
    """The same batches, read from file by two DataLoader workers instead of indexed in
    memory, hold the same float32 values in the same order, and augmentation draws from the
    same generator in the same order: every operation after that is the same, so the
    weights, errors and adversarial examples agree exactly, not within a tolerance."""
    np.savez(tmp_path / "rgb.npz", **rgb_arrays())
    data = {"name": "npz", "path": str(tmp_path / "rgb.npz")}
    memory = trial_outputs(rgb_sweep(data, augment=AUGMENT), tmp_path / "memory")
    streamed = trial_outputs(
        rgb_sweep(data | {"streaming": True, "workers": 2}, augment=AUGMENT), tmp_path / "stream"
    )
    assert memory[0]["trial_id"] == streamed[0]["trial_id"]  # how data is read is no input
    for key in ("train_error", "test_error", "n_attacked", "n_scanned", "n_test", "n_heldout"):
        assert memory[0][key] == streamed[0][key] is not None
    assert memory[1].keys() == streamed[1].keys()
    assert all(torch.equal(memory[1][k], streamed[1][k]) for k in memory[1])
    assert memory[2] == streamed[2]


def test_augmentation_is_part_of_the_training_key() -> None:
    data = {"name": "digits"}
    plain, augmented = (
        parse_sweep(rgb_sweep(data, **extra)).trials[0] for extra in ({}, {"augment": AUGMENT})
    )
    assert plain.training_key() != augmented.training_key()
    assert TrainSpec().model_dump(exclude_defaults=True) == {}  # off by default: old ids stay


def test_channels_last_data_trains_as_channels_first_bit_for_bit(
    tmp_path: Path, one_torch_thread: None
) -> None:
    """(N, H, W, C) arrays are transposed to (N, C, H, W) on load: a permutation of the same
    float32 values, with no arithmetic, so the two files give identical tensors and so
    identical training, in memory and streamed."""
    last = rgb_arrays()
    first = last | {k: last[k].transpose(0, 3, 1, 2) for k in ("x_train", "x_test")}
    np.savez(tmp_path / "last.npz", **last)
    np.savez(tmp_path / "first.npz", **first)
    outputs = [
        trial_outputs(
            rgb_sweep({"name": "npz", "path": str(tmp_path / f"{name}.npz"), **extra}),
            tmp_path / f"{name}{len(extra)}",
        )
        for name in ("last", "first")
        for extra in ({}, {"streaming": True})
    ]
    reference = outputs[0]
    for other in outputs[1:]:
        assert other[0]["test_error"] == reference[0]["test_error"]
        assert all(torch.equal(reference[1][k], other[1][k]) for k in reference[1])
        assert other[2] == reference[2]


def test_streaming_refuses_whole_set_training_in_one_line(tmp_path: Path) -> None:
    from advlab.preflight import check_streaming

    np.savez(tmp_path / "rgb.npz", **rgb_arrays())
    data = {"name": "npz", "path": str(tmp_path / "rgb.npz"), "streaming": True}
    raw = rgb_sweep(data) | {"grid": {"model": ["ae20-3"]}}
    with pytest.raises(SpecError, match=r"dataset\.streaming: model ae20-3 pretrains"):
        check_streaming(parse_sweep(raw).trials[0])
    with pytest.raises(SpecError, match="streaming: reads an npz file or an image folder"):
        parse_sweep(rgb_sweep({"name": "digits", "streaming": True}))


def test_bfloat16_training_runs_under_autocast_on_cpu(one_torch_thread: None) -> None:
    """bfloat16 keeps 8 bits of mantissa: the same seeded run ends on other weights than in
    float32 (so autocast was on), with a finite loss near float32's."""
    from advlab.models import build_model
    from advlab.train import train_model

    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0, :4].mean((1, 2)) > 0.5).long() + 2 * (x[:, 0, 4:].mean((1, 2)) > 0.5).long()
    runs = {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = build_model("fc32-4", (1, 8, 8), 4, "relu")
        settings = TrainSpec(
            epochs=2, batch_size=32, optimizer="adam", lr=0.01, precision=precision
        )
        history = train_model(model, x, y, x[:16], y[:16], settings, 0.0, seed=0)
        runs[precision] = (history[-1].loss, next(model.parameters()).detach().clone())
    (loss32, w32), (loss16, w16) = runs["float32"], runs["bfloat16"]
    assert not torch.equal(w32, w16)
    assert np.isfinite(loss16) and abs(loss16 - loss32) < 0.25 * loss32 + 0.05


def test_validate_says_a_set_is_streamed(tmp_path: Path) -> None:
    from advlab.cli import data_line

    np.savez(tmp_path / "rgb.npz", **rgb_arrays())
    line = data_line(load_data("npz", path=str(tmp_path / "rgb.npz"), streaming=True, workers=2))
    assert line == (
        "data rgb: images (N, H, W, C), read as (N, C, H, W) = 3x8x8, streamed per batch with "
        "2 workers; 96 training images, 48 test images, 3 classes"
    )


def test_float16_with_device_cpu_is_refused_before_any_work() -> None:
    raw = rgb_sweep({"name": "digits"}, precision="float16") | {"device": "cpu"}
    with pytest.raises(SpecError, match=r"train\.precision: float16 needs a GPU") as err:
        parse_sweep(raw)
    assert "\n" not in str(err.value)


def test_float16_on_a_machine_without_a_gpu_is_refused_before_any_work(
    write_sweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # device: auto (the default) would run the trials on the CPU here, where each one failed
    # at its first batch (`advlab trial`: a traceback, exit 1). Now: one line, exit 2, nothing
    # written, from validate, sweep and trial alike; bfloat16 passes.
    from advlab.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write_sweep(rgb_sweep({"name": "digits"}, precision="float16"))
    for command in (["validate"], ["sweep"], ["trial", "--index", "0"]):
        capsys.readouterr()
        assert main([*command, str(path)]) == 2, command
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "train.precision: float16 needs a GPU and this machine has none" in line
    assert not (tmp_path / "results").exists()
    assert main(["validate", str(path), "--set", "train.precision=bfloat16"]) == 0
