"""The strict base of every validated mapping in advlab (sweep keys, attack, measure and model
settings): unknown keys are refused, no bool or text passes where a number belongs, every float
is finite and the validated values are frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class NoSettings(Strict):
    """For an attack, measure or model family that takes no settings."""
