"""Your own code, named by import path (`module:attribute`) in a sweep file: models, model
families, data loaders, attacks and measures all import through here, so every failure of a
user module says the same thing in one line: which key, which module, and what went wrong."""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from advlab.text import one_line

T = TypeVar("T")


class PluginError(ValueError):
    """A user module or attribute that cannot be imported; one line naming the key."""


class UserExit(RuntimeError):
    """User code called sys.exit (or raised SystemExit) where advlab called it."""


# Model names of the libraries advlab builds from (advlab.models), not modules of yours.
LIBRARY_PREFIXES = ("torchvision:", "timm:", "robustbench:")


def is_import_path(name: Any) -> bool:
    return isinstance(name, str) and ":" in name and not name.startswith(LIBRARY_PREFIXES)


def import_object(path: str, key: str) -> Any:
    """The attribute `path` names (modules beside the sweep file are on sys.path)."""
    module, _, attribute = path.partition(":")
    if not module or not attribute:
        raise PluginError(f"{key}: {path!r} is not module:attribute; e.g. mymodels:make_net")
    try:
        with held_output(), kept_defaults():
            loaded = importlib.import_module(module)
    except ImportError as err:
        raise PluginError(
            f"{key}: cannot import module {module!r} ({one_line(err, 200)}); "
            "put it beside the sweep file or install it"
        ) from None
    except SystemExit as err:  # a script's command line (argparse) run as it is imported
        raise PluginError(
            f"{key}: importing {module!r} exited (sys.exit({err.code!r})), as a script does; "
            "put its command-line code under `if __name__ == '__main__':`"
        ) from None
    except Exception as err:  # the module itself fails as it is imported
        raise PluginError(
            f"{key}: importing {module!r} raised {describe(err)}; fix the module"
        ) from None
    if not hasattr(loaded, attribute):
        raise PluginError(
            f"{key}: module {module!r} has no {attribute!r}; check the name after ':'"
        )
    return getattr(loaded, attribute)


def call_user(
    function: Callable[..., T],
    key: str,
    what: str,
    *args: Any,
    error: type[ValueError] = PluginError,
    **kwargs: Any,
) -> T:
    """Call user code (a model factory, a data loader, an estimator's `make`): whatever it
    raises, SystemExit included, becomes `error` with one line naming the key and `what`
    failed; an `error` it raises itself passes as it is. What it prints goes out only when it
    returns (a usage message argparse prints before exiting is no line of advlab's)."""
    try:
        with held_output():
            return function(*args, **kwargs)
    except error:
        raise
    except (Exception, SystemExit) as err:
        raise error(f"{key}: {what} raised {describe(err)}") from None


def describe(err: BaseException) -> str:
    """An error as one line: its type and its first words (sys.exit's code for SystemExit)."""
    if isinstance(err, SystemExit):
        return f"SystemExit (it called sys.exit({err.code!r})); it must return, not exit"
    text = one_line(err, 200)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextlib.contextmanager
def held_output() -> Iterator[None]:
    """Hold what user code prints while it runs; let it out if the code returns, drop it if
    the code fails (its one-line error says what went wrong)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())


@contextlib.contextmanager
def kept_defaults() -> Iterator[None]:
    """Keep torch's default dtype across user code that sets it as it is imported (advlab
    feeds float32 images everywhere; float64 layers would meet them only mid-training)."""
    torch = sys.modules.get("torch")
    dtype = torch.get_default_dtype() if torch is not None else None
    try:
        yield
    finally:
        if dtype is not None and torch is not None:
            torch.set_default_dtype(dtype)
