"""Measures: everything a trial produces besides training and attack runs, behind one registry
(advlab.measures.registry). Built in, registered as this package is imported: lipschitz,
unit_analysis, density, masking, health, bounds, jacobian, likelihood."""

from advlab.measures import builtin  # noqa: F401  (registers the built-ins)
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
