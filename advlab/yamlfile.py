"""Strict, bounded YAML: what a sweep file may be before advlab looks at what it says.

yaml.safe_load never runs code, but it accepts what a sweep file should not: a repeated key
(the last silently wins), keys that are numbers or null, and aliases that expand a few hundred
bytes into gigabytes once the mapping is copied or printed. This loader refuses all three, and
files too large to be sweep files, each with a one-line YAMLRefused naming the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a sweep file is settings, not data
MAX_ALIASES = 100
MAX_VALUES = 200_000  # scalars after aliases are expanded
MAX_DEPTH = 50  # levels of lists and mappings; a sweep file needs a handful


class YAMLRefused(ValueError):
    """A file that is not acceptable YAML for advlab; str() is one line naming the fix."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases and refuses repeated and non-string keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise YAMLRefused(f"more than {MAX_ALIASES} YAML aliases; write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise YAMLRefused(
                    f"line {line}: key {_short(key)} is a {type(key).__name__}; keys are names "
                    "(quote it if you mean the text)"
                )
            if key in seen:
                raise YAMLRefused(f"line {line}: key {key!r} appears twice; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_text(text: str) -> Any:
    """Parse YAML text strictly (see module doc); YAMLRefused or yaml.YAMLError on failure."""
    try:
        loaded = yaml.load(text, Loader=_StrictLoader)
    except YAMLRefused:
        raise
    except RecursionError:  # the parser recurses once per level of nesting
        raise YAMLRefused(f"nested more than {MAX_DEPTH} levels deep; flatten it") from None
    except ValueError as err:  # a value Python will not convert: an integer of 4300+ digits
        why = "a number has more than 4300 digits" if "digits" in str(err) else _short(err, 80)
        raise YAMLRefused(f"{why}; write a smaller value") from None
    if _count(loaded) > MAX_VALUES:
        raise YAMLRefused(f"the file expands to more than {MAX_VALUES} values; write less")
    if _depth(loaded) > MAX_DEPTH:
        raise YAMLRefused(f"nested more than {MAX_DEPTH} levels deep; flatten it")
    return loaded


def _depth(value: Any) -> int:
    """How deeply lists and mappings nest in `value` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        )
        if children is None:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def load_file(path: Path) -> Any:
    """Read and parse a sweep file, refusing binary, oversized and malformed files."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise YAMLRefused(f"{size / 2**20:.1f} MiB is too large for a sweep file (at most 1 MiB)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise YAMLRefused("not a UTF-8 text file; give a YAML sweep file") from None
    if "\x00" in text:
        raise YAMLRefused("holds NUL bytes, so it is binary; give a YAML sweep file")
    return load_text(text)


def _count(value: Any, budget: int = MAX_VALUES + 1) -> int:
    """Values in `value` with shared (aliased) parts counted each time, up to `budget`."""
    count = 0
    for _ in _walk(value):
        count += 1
        if count >= budget:
            break
    return count


def _walk(value: Any) -> Iterator[Any]:
    stack = [value]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
