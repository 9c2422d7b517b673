"""The errors a model name or its settings raise, and the one check of `model_args`: a leaf
module, so advlab.models and the model forms it dispatches to (advlab.robustbench_models)
import it without importing each other."""

from __future__ import annotations

import os
from typing import Any

from pydantic import ValidationError

from advlab.strict import Strict
from advlab.text import one_line


class ModelNameError(ValueError):
    """A model name that names no architecture, or one whose class count does not fit the data."""


def validate_model_args(name: str, settings: type[Strict], args: dict[str, Any]) -> Strict:
    """`model_args` checked against a model's settings model: one line naming the key."""
    try:
        return settings.model_validate(args)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        known = ", ".join(settings.model_fields) or "none"
        message = first["msg"].removeprefix("Value error, ")
        raise ModelNameError(
            f"model_args.{key}: {message} for {name} (its settings: {known})"
        ) from None


def unloadable(path: str, err: BaseException) -> str:
    """Why torch.load refused an `init` file, in a few words."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "an empty file"
    if "Weights only load failed" in str(err):  # torch's paragraph about weights_only
        return "it holds Python objects besides tensors, and advlab never runs a pickle's code"
    return one_line(err, 160) or type(err).__name__
