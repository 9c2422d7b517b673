"""What both shapes of the transfer section write in their cells and headings."""

from __future__ import annotations

from advlab.text import value_text

KIND_TITLES = {
    "adversarial": "adversarial examples",
    "noise": "Gaussian noise of each example's own rms",
}


def budget_text(budget: float | None) -> str:
    return value_text(budget, missing="")  # a minimisation attack's run has none


def heat(value: float) -> str:
    """White (0) to red (1); the text turns white on the darkest cells."""
    ink = "color:#fff;" if value > 0.6 else ""
    return f"background:rgba(200,30,30,{0.08 + 0.8 * value:.3f});{ink}"


def kind_title(kind: str, amplified_to: float | None = None) -> str:
    if kind == "amplified":
        return f"perturbation amplified to rms {budget_text(amplified_to)}"
    return KIND_TITLES.get(kind, kind)
