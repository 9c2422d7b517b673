"""Tests for advlab.models: name parsing, exact layer sizes, forward shapes, weight decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advlab.models import (
    Architecture,
    AutoencoderClassifier,
    ModelNameError,
    build_model,
    count_parameters,
    decay_weights,
    parse_architecture,
)
from advlab.spec import TrainSpec
from advlab.train import make_optimizer, penalty_value

MNIST = (1, 28, 28)
DIGITS = (1, 8, 8)
CIFAR = (3, 32, 32)


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fc10", Architecture("fc", (), 10)),
        ("fc100-100-10", Architecture("fc", (100, 100), 10)),
        ("fc123-456-10", Architecture("fc", (123, 456), 10)),
        ("fc200-200-10", Architecture("fc", (200, 200), 10)),
        ("fc7-3", Architecture("fc", (7,), 3)),
        ("ae400-10", Architecture("ae", (400,), 10)),
        ("cnn", Architecture("cnn", (), None)),
        ("resnet18", Architecture("resnet18", (), None)),
    ],
)
def test_parse_architecture(name: str, expected: Architecture) -> None:
    assert parse_architecture(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "fc",
        "fc100--10",
        "ae-10",
        "fcx",
        "fc100-x-10",
        "ae400",
        "ae400-100-10",
        "fc0-10",
        "fc010",
        "fc100-10-",
        "FC10",
        " fc10",
        "cnn10",
        "resnet",
        "resnet50",
        "",
    ],
)
def test_malformed_names_raise(name: str) -> None:
    with pytest.raises(ModelNameError) as info:
        build_model(name, MNIST, 10)
    assert str(info.value) == (
        f"model: {name!r} is not an architecture; use fc10, fc<h1>-...-<K>, ae<h>-<K> "
        "(or dae, cae, vae), cnn or resnet18"
    )


def test_model_name_error_is_a_value_error() -> None:
    assert issubclass(ModelNameError, ValueError)


@pytest.mark.parametrize(
    ("name", "fixed"),
    [("fc100-100-5", "fc100-100-10"), ("fc5", "fc10"), ("ae400-5", "ae400-10")],
)
def test_class_count_must_match_dataset(name: str, fixed: str) -> None:
    with pytest.raises(
        ModelNameError, match=rf"ends in 5 classes but the dataset has 10; use {fixed}$"
    ):
        build_model(name, MNIST, 10)


# --------------------------------------------------------------------------- exact sizes


# Hand-computed: a Linear(a, b) has a*b weights + b biases.
PARAMETER_COUNTS = {
    ("fc10", MNIST): 784 * 10 + 10,  # 7850
    ("fc10", DIGITS): 64 * 10 + 10,  # 650
    ("fc100-100-10", MNIST): (784 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10),  # 89610
    ("fc100-100-10", DIGITS): (64 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10),  # 17610
    ("fc123-456-10", MNIST): (784 * 123 + 123) + (123 * 456 + 456) + (456 * 10 + 10),  # 157669
    ("fc123-456-10", DIGITS): (64 * 123 + 123) + (123 * 456 + 456) + (456 * 10 + 10),  # 69109
    # encoder + decoder + classifier
    ("ae400-10", MNIST): (784 * 400 + 400) + (400 * 784 + 784) + (400 * 10 + 10),  # 632394
    ("ae400-10", DIGITS): (64 * 400 + 400) + (400 * 64 + 64) + (400 * 10 + 10),  # 55674
    # conv 1->32 3x3, conv 32->64 3x3, fc 64*7*7 -> 128, fc 128 -> 10
    ("cnn", MNIST): (9 * 32 + 32) + (9 * 32 * 64 + 64) + (64 * 7 * 7 * 128 + 128) + (128 * 10 + 10),
    # the CIFAR ResNet-18 everyone quotes: 11,173,962
    ("resnet18", CIFAR): 11_173_962,
}


@pytest.mark.parametrize(("name", "shape"), list(PARAMETER_COUNTS))
def test_parameter_counts(name: str, shape: tuple[int, int, int]) -> None:
    assert count_parameters(build_model(name, shape, 10)) == PARAMETER_COUNTS[(name, shape)]


def test_hand_counts_spelled_out() -> None:
    # Guard against a typo in the table above agreeing with a bug.
    assert PARAMETER_COUNTS[("fc100-100-10", MNIST)] == 89_610
    assert PARAMETER_COUNTS[("fc123-456-10", MNIST)] == 157_669
    assert PARAMETER_COUNTS[("ae400-10", MNIST)] == 632_394
    assert PARAMETER_COUNTS[("ae400-10", DIGITS)] == 55_674
    assert PARAMETER_COUNTS[("cnn", MNIST)] == 421_642


@pytest.mark.parametrize(
    ("name", "shape", "layers"),
    [
        ("fc10", MNIST, [(784, 10)]),
        ("fc10", DIGITS, [(64, 10)]),
        ("fc100-100-10", MNIST, [(784, 100), (100, 100), (100, 10)]),
        ("fc123-456-10", DIGITS, [(64, 123), (123, 456), (456, 10)]),
        ("fc200-200-10", MNIST, [(784, 200), (200, 200), (200, 10)]),
    ],
)
def test_fc_layer_sizes(name: str, shape: tuple[int, int, int], layers: list) -> None:
    assert linear_shapes(build_model(name, shape, 10)) == layers


def test_fc10_is_softmax_regression() -> None:
    model = build_model("fc10", MNIST, 10)
    assert [type(m) for m in model] == [nn.Flatten, nn.Linear]


def test_autoencoder_layers_and_reconstruction() -> None:
    model = build_model("ae400-10", MNIST, 10)
    assert isinstance(model, AutoencoderClassifier)
    assert (model.encoder[1].in_features, model.encoder[1].out_features) == (784, 400)
    assert (model.decoder[0].in_features, model.decoder[0].out_features) == (400, 784)
    assert (model.classifier.in_features, model.classifier.out_features) == (400, 10)
    x = torch.rand(3, *MNIST)
    recon = model.reconstruct(x)
    assert recon.shape == (3, *MNIST)
    assert recon.min() >= 0 and recon.max() <= 1
    code = model.encode(x)
    assert code.shape == (3, 400) and code.min() >= 0 and code.max() <= 1  # sigmoid code
    assert torch.allclose(model(x), model.classifier(code))


# --------------------------------------------------------------------------- activations


def test_default_activation_is_sigmoid() -> None:
    model = build_model("fc100-100-10", MNIST, 10)
    kinds = [type(m) for m in model]
    assert kinds == [nn.Flatten, nn.Linear, nn.Sigmoid, nn.Linear, nn.Sigmoid, nn.Linear]


def test_relu_option() -> None:
    model = build_model("fc100-100-10", MNIST, 10, activation="relu")
    kinds = [type(m) for m in model]
    assert kinds == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    # Behaviour, not just types: the first hidden layer's output is max(0, Wx + b).
    x = torch.rand(2, *MNIST)
    hidden = model[2](model[1](model[0](x)))
    assert torch.equal(hidden, torch.clamp(model[1](x.flatten(1)), min=0))
    ae = build_model("ae400-10", DIGITS, 10, activation="relu")
    assert isinstance(ae.encoder[2], nn.ReLU)
    assert isinstance(ae.decoder[1], nn.Sigmoid)  # reconstructions stay images in [0, 1]


def test_unknown_activation() -> None:
    with pytest.raises(ValueError, match="activation: 'softplus' is not supported"):
        build_model("fc100-10", MNIST, 10, activation="softplus")
    with pytest.raises(ValueError, match="activation"):
        build_model("cnn", MNIST, 10, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        build_model("fc10", MNIST, 10, activation="elu")  # no hidden layer, still a typo


# --------------------------------------------------------------------------- forward shapes


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("fc10", MNIST),
        ("fc10", DIGITS),
        ("fc100-100-10", MNIST),
        ("fc200-200-10", MNIST),
        ("fc123-456-10", DIGITS),
        ("fc100-100-10", CIFAR),
        ("ae400-10", MNIST),
        ("ae400-10", DIGITS),
        ("cnn", MNIST),
        ("cnn", DIGITS),
        ("cnn", CIFAR),
        ("resnet18", CIFAR),
        ("resnet18", MNIST),
    ],
)
def test_forward_shapes(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 10).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, *shape))
    assert logits.shape == (2, 10) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_other_class_counts() -> None:
    assert build_model("cnn", MNIST, 3)(torch.rand(1, *MNIST)).shape == (1, 3)
    assert build_model("fc50-3", DIGITS, 3)(torch.rand(4, *DIGITS)).shape == (4, 3)


def test_resnet18_is_adapted_to_small_inputs() -> None:
    model = build_model("resnet18", CIFAR, 10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


def test_cnn_rejects_tiny_inputs() -> None:
    with pytest.raises(ValueError, match="at least 4x4"):
        build_model("cnn", (1, 3, 3), 10)


# --------------------------------------------------------------------------- weight decay


def test_decay_weights_in_layer_order() -> None:
    fc = build_model("fc100-100-10", MNIST, 10)
    assert [tuple(w.shape) for w in decay_weights(fc)] == [(100, 784), (100, 100), (10, 100)]
    assert decay_weights(fc)[0] is fc[1].weight
    ae = build_model("ae400-10", MNIST, 10)
    # Encoder and classifier only: the decoder is not decayed.
    assert [tuple(w.shape) for w in decay_weights(ae)] == [(400, 784), (10, 400)]
    assert all(w is not ae.decoder[0].weight for w in decay_weights(ae))
    cnn = build_model("cnn", MNIST, 10)
    shapes = [tuple(w.shape) for w in decay_weights(cnn)]
    assert shapes == [(32, 1, 3, 3), (64, 32, 3, 3), (128, 64 * 7 * 7), (10, 128)]
    resnet = build_model("resnet18", CIFAR, 10)
    weights = decay_weights(resnet)
    # 1 stem conv + 8 blocks x 2 convs + 3 downsample convs + the final fc.
    assert len(weights) == 21
    assert weights[0] is resnet.conv1.weight and weights[-1] is resnet.fc.weight


def _constant_fc100() -> nn.Module:
    model = build_model("fc100-100-10", MNIST, 10)
    with torch.no_grad():
        for layer, value in zip((model[1], model[3], model[5]), (0.5, 2.0, -1.0), strict=True):
            layer.weight.fill_(value)
            layer.bias.fill_(100.0)  # biases are never penalised; this would show up if they were
    return model


def test_penalty_value_scalar_hand_computed() -> None:
    model = _constant_fc100()
    # ||W1||^2 = 78400 * 0.25 = 19600, ||W2||^2 = 10000 * 4 = 40000, ||W3||^2 = 1000 * 1 = 1000.
    assert penalty_value(model, 1e-3) == pytest.approx(1e-3 * 60600, rel=1e-6)
    assert penalty_value(model, 0.0) == 0.0


def test_penalty_value_per_layer_hand_computed() -> None:
    model = _constant_fc100()
    # The paper's FC100-100-10 lambdas: 1e-5 * 19600 + 1e-5 * 40000 + 1e-6 * 1000 = 0.597.
    penalty = penalty_value(model, [1e-5, 1e-5, 1e-6])
    assert penalty == pytest.approx(0.597, rel=1e-6)
    assert penalty_value(model, (0.0, 0.0, 1.0)) == pytest.approx(1000.0)


def test_optimizer_step_applies_the_penalty_gradient_two_lambda_w() -> None:
    # The penalty enters as the optimizer's coupled weight decay 2*lambda: with no data
    # gradient, one plain SGD step moves W by exactly -lr * 2 * lambda * W and leaves biases.
    model = build_model("fc10", DIGITS, 10)
    before = [p.detach().clone() for p in model.parameters()]
    settings = TrainSpec(optimizer="sgd", lr=0.1, momentum=0.0)
    optimizer = make_optimizer(model, settings, 0.25)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(model[1].weight.detach(), before[0] * (1 - 0.1 * 2 * 0.25))
    torch.testing.assert_close(model[1].bias.detach(), before[1])


def test_penalty_value_wrong_length() -> None:
    model = build_model("fc100-100-10", MNIST, 10)
    with pytest.raises(ValueError, match="2 values but the model has 3 weight layers"):
        penalty_value(model, [1e-5, 1e-5])
    with pytest.raises(ValueError, match="give 2 values"):
        penalty_value(build_model("ae400-10", MNIST, 10), [1e-6, 1e-6, 1e-6])


def test_penalty_value_rejects_negative() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        penalty_value(build_model("fc10", DIGITS, 10), -1.0)
