"""Models from the libraries robustness research uses: timm architectures by name with local
weights files, and RobustBench-format checkpoints as `init`, on weights written here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from advlab.models import ModelNameError, build_model, load_init, read_weights

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def imagenet_net(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    """An ImageNet-shaped timm net (timm's own small test_efficientnet: 3 channels, 1000
    classes; in timm 1.0.9, which robustbench pins, as in later ones), random weights saved as
    a torch file and as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = timm.create_model("test_efficientnet", num_classes=1000).state_dict()
    folder = tmp_path_factory.mktemp("weights")
    torch.save(state, folder / "net.pth")
    save_file(state, str(folder / "net.safetensors"))
    return state, folder / "net.pth", folder / "net.safetensors"


@pytest.mark.parametrize("which", [1, 2])
def test_timm_model_takes_local_weights_and_fits_the_data(imagenet_net: tuple, which: int) -> None:
    state, *files = imagenet_net
    model = build_model(
        "timm:test_efficientnet", (1, 16, 16), 3, model_args={"pretrained": str(files[which - 1])}
    )
    got = model.state_dict()
    assert torch.equal(got["blocks.1.0.conv_exp.weight"], state["blocks.1.0.conv_exp.weight"])
    # One gray channel: timm folds the RGB kernels into one by summing them (adapt_input_conv).
    assert torch.allclose(got["conv_stem.weight"], state["conv_stem.weight"].sum(1, keepdim=True))
    # A new head: 3 classes.
    assert got["classifier.weight"].shape == (3, state["classifier.weight"].shape[1])
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 3)


def test_timm_model_untrained_by_default() -> None:
    model = build_model("timm:test_efficientnet", (3, 8, 8), 5)
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"pretrained": True}, "model_args.pretrained: True is no local file"),
        ({"pretrained": "/nowhere/w.pth"}, "advlab downloads no weights"),
    ],
)
def test_timm_weights_that_would_download_are_refused_in_one_line(args: dict, message: str) -> None:
    with pytest.raises(ModelNameError, match=message) as err:
        build_model("timm:test_efficientnet", (3, 8, 8), 3, model_args=args)
    assert "\n" not in str(err.value)


def test_unknown_timm_name_is_one_line() -> None:
    with pytest.raises(ModelNameError, match="timm:resnet_nothing is no timm model"):
        build_model("timm:resnet_nothing", (3, 8, 8), 3)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict"])
def test_robustbench_checkpoint_loads_into_the_named_architecture(tmp_path: Path, key: str) -> None:
    """RobustBench's checkpoints hold the weights under 'state_dict' (or 'model_state_dict')
    beside training state, with DataParallel's 'module.' prefix on every key."""
    torch.manual_seed(1)
    source = build_model("timm:test_efficientnet", (3, 8, 8), 10)
    saved = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "Standard.pt"
    torch.save({key: saved, "epoch": 200, "best_acc": 0.91}, path)
    torch.manual_seed(2)
    target = build_model("timm:test_efficientnet", (3, 8, 8), 10)
    load_init(target, str(path))
    x = torch.rand(4, 3, 8, 8)
    source.eval(), target.eval()
    assert torch.equal(source(x), target(x))
    assert read_weights(str(path)).keys() == source.state_dict().keys()


def test_checkpoint_of_another_architecture_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cnn.pt"
    torch.save({"state_dict": build_model("cnn", (3, 8, 8), 10).state_dict()}, path)
    with pytest.raises(ModelNameError, match="does not fit the model") as err:
        load_init(build_model("timm:test_efficientnet", (3, 8, 8), 10), str(path))
    assert "\n" not in str(err.value)


def test_a_timm_weights_file_is_part_of_the_trial_id(imagenet_net: tuple, tmp_path: Path) -> None:
    """Identity from content: rewriting the weights file in place makes a new trial."""
    from conftest import tiny_sweep

    from advlab.sweepfile import parse_sweep

    state, weights, _ = imagenet_net
    copy = tmp_path / "weights.pth"
    copy.write_bytes(weights.read_bytes())
    raw = tiny_sweep(
        grid={"model": ["timm:test_efficientnet"]}, model_args={"pretrained": str(copy)}
    )
    before = parse_sweep(raw).trials[0]
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, copy)
    after = parse_sweep(raw).trials[0]
    assert before.input_digests().keys() == {"model_args.pretrained"}
    assert before.trial_id() != after.trial_id()
    assert before.training_key() != after.training_key()


def test_a_relative_weights_file_counts_from_the_sweep_files_folder(
    imagenet_net: tuple, tmp_path: Path
) -> None:
    import yaml
    from conftest import tiny_sweep

    from advlab.sweepfile import load_sweep

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.pth").write_bytes(imagenet_net[1].read_bytes())
    raw = tiny_sweep(
        grid={"model": ["timm:test_efficientnet"]}, model_args={"pretrained": "weights/w.pth"}
    )
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw))
    trial = load_sweep(tmp_path / "sweep.yaml").trials[0]
    assert trial.model_args["pretrained"] == str((tmp_path / "weights" / "w.pth").resolve())
