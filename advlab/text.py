"""Text rules: values as people read them (labels, filters, tables, captions), and which names
may become part of a file name (attack and measure names and labels, sweep names)."""

from __future__ import annotations

import json
import math
from typing import Any


def one_line(message: object, limit: int | None = None) -> str:
    """A message (an exception, say) on one line, at most `limit` characters: error texts
    span lines (torchvision's name each mirror), the lines advlab prints must not."""
    return " ".join(str(message).split())[:limit]


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`n noun` with the noun in the plural unless n is 1: "1 trial", "0 trials", "4 trials"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def value_text(value: Any, sep: str = ", ", missing: str = "—", brackets: bool = False) -> str:
    """Floats in %g, sequences joined by `sep` (in [] with `brackets`), mappings as key:value
    (JSON with `brackets`), None and NaN as `missing`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, float):
        return f"{value:g}"
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):  # numpy values
        return value_text(value.tolist(), sep, missing, brackets)
    if isinstance(value, list | tuple):
        inner = sep.join(value_text(v, sep, missing, brackets) for v in value)
        return f"[{inner}]" if brackets else inner
    if isinstance(value, dict):
        if brackets:
            return json.dumps(value, sort_keys=True)
        return sep.join(f"{k}:{value_text(v, sep, missing)}" for k, v in value.items())
    return str(value)


def is_file_name(value: object, longest: int = 64) -> bool:
    """At most `longest` ASCII letters, digits, '-', '_' or '.', not starting with '.': a name
    that is safe as (part of) a file or folder name everywhere."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= longest
        and value[0] != "."
        and all(ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in value)
    )
