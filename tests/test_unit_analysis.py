"""Unit analysis (advlab.measures.units): purity and similarity by hand, and on a net whose
units read one pixel each."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from advlab.measures.units import UNIT_ANALYSIS, label_purity, mean_pairwise_cosine, unit_analysis
from advlab.models import build_model

# Everything here is small; on a shared 2-core box, OpenMP threads only spin and wait.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_purity_and_similarity_by_hand() -> None:
    assert label_purity(torch.tensor([2, 2, 1])) == pytest.approx(2 / 3)
    assert label_purity(torch.tensor([4, 4, 4])) == 1.0
    same = torch.ones(3, 1, 2, 2)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    orthogonal = torch.eye(4).reshape(4, 1, 2, 2)
    assert mean_pairwise_cosine(orthogonal) == pytest.approx(0.0)
    pair = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert mean_pairwise_cosine(pair) == pytest.approx(1 / math.sqrt(2))


def one_pixel_per_class_data() -> tuple[nn.Module, Tensor, Tensor]:
    """4 classes; class c lights pixel c. Hidden unit c reads pixel c, so its top images are c."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(6)
    x = 0.3 * torch.rand(24, 1, 4, 4, generator=gen)
    x.view(24, 16)[torch.arange(24), y] = 0.9 + 0.1 * torch.rand(24, generator=gen)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(4, 16))
        model[1].bias.zero_()
    return model, x, y


def test_unit_analysis_unit_with_one_label_has_purity_one(tmp_path: Path) -> None:
    model, x, y = one_pixel_per_class_data()
    rows = unit_analysis(model, x, y, units=4, top_k=5, seed=3, out_dir=str(tmp_path))
    values = UNIT_ANALYSIS.metrics(rows)
    assert set(values) == {
        f"unit_analysis/{stat}_{kind}"
        for stat in ("purity", "similarity") for kind in ("natural", "random")
    }  # fmt: skip
    values = {k.removeprefix("unit_analysis/"): v for k, v in values.items()}
    assert {r["layer"] for r in rows} == {"3:input"}  # input of the last Linear
    assert values["purity_natural"] == 1.0
    assert 0.0 <= values["purity_random"] <= 1.0
    assert -1.0 <= values["similarity_random"] <= 1.0
    for kind in ("natural", "random"):
        image = Image.open(tmp_path / f"unit_analysis_{kind}.png")
        assert image.size[0] > image.size[1]  # 4 rows of 5 images each


def test_unit_analysis_is_deterministic_and_layer_selectable() -> None:
    torch.manual_seed(0)
    model = build_model("fc16-10", (1, 8, 8), 10)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(60, 1, 8, 8, generator=gen), torch.randint(0, 10, (60,), generator=gen)
    first = unit_analysis(model, x, y, seed=5)
    assert first == unit_analysis(model, x, y, seed=5)
    by_name = unit_analysis(model, x, y, seed=5, layer="2")  # the sigmoid's output: same features
    scores = [(r["purity"], r["similarity"]) for r in first]
    assert [(r["purity"], r["similarity"]) for r in by_name] == scores
    assert {r["layer"] for r in first} == {"3:input"} and {r["layer"] for r in by_name} == {"2"}
    assert all(0.0 <= r["purity"] <= 1.0 for r in first)
    logits = unit_analysis(build_model("fc10", (1, 8, 8), 10), x, y, units=3)
    assert {r["layer"] for r in logits} == {"1"}  # fc10 has no hidden layer: its logits
