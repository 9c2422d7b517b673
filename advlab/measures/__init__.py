"""Measures: everything a trial produces besides training and attack runs, behind one registry
(advlab.measures.registry). Built in: lipschitz, unit_analysis, density, masking."""

from advlab.measures.registry import (
    MeasureContext,
    MeasureDef,
    MeasureError,
    by_table,
    get,
    names,
    register,
    validate_settings,
)

__all__ = [
    "MeasureContext",
    "MeasureDef",
    "MeasureError",
    "by_table",
    "get",
    "names",
    "register",
    "validate_settings",
]
