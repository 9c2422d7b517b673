"""Your own code, named by import path (`module:attribute`) in a sweep file: models, model
families, data loaders, attacks and measures all import through here, so every failure of a
user module says the same thing in one line: which key, which module, and what went wrong."""

from __future__ import annotations

import importlib
from typing import Any


class PluginError(ValueError):
    """A user module or attribute that cannot be imported; one line naming the key."""


def is_import_path(name: Any) -> bool:
    return isinstance(name, str) and ":" in name and not name.startswith("torchvision:")


def import_object(path: str, key: str) -> Any:
    """The attribute `path` names (modules beside the sweep file are on sys.path)."""
    module, _, attribute = path.partition(":")
    if not module or not attribute:
        raise PluginError(f"{key}: {path!r} is not module:attribute; e.g. mymodels:make_net")
    try:
        loaded = importlib.import_module(module)
    except ImportError as err:
        raise PluginError(
            f"{key}: cannot import module {module!r} ({_line(err)}); "
            "put it beside the sweep file or install it"
        ) from None
    except (Exception, SystemExit) as err:  # the module itself fails as it is imported
        raise PluginError(
            f"{key}: importing {module!r} raised {type(err).__name__}: {_line(err)}; fix the module"
        ) from None
    if not hasattr(loaded, attribute):
        raise PluginError(
            f"{key}: module {module!r} has no {attribute!r}; check the name after ':'"
        )
    return getattr(loaded, attribute)


def _line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]
