"""A user's own code named in the run config as ``"module:attribute"`` (an aggregation rule, a model).

The module is imported from the app folder (the folder holding ``fedapp/``, which Flower puts on
``sys.path`` when it runs the app, and which is the working directory of ``fedvideo run``) or from
an installed package. Every failure is a :class:`PluginError` naming the key, the value and what
went wrong, so the launcher refuses the run before Flower starts.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedapp.config.keys import ConfigError

APP_DIR = Path(__file__).resolve().parents[1]
_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class PluginError(ConfigError):
    """A ``module:attribute`` value that cannot be loaded, has the wrong form, or fails when tried."""


def is_plugin(value: str) -> bool:
    """Whether a config value names user code (``"module:attribute"``) rather than a built-in."""
    return ":" in value


def load_plugin(key: str, spec: str) -> Any:
    """The object ``spec`` (``"package.module:name"``) names, imported as the app would import it."""
    if not _SPEC.fullmatch(spec):
        raise PluginError(f'{key}="{spec}" is not "module:attribute" (e.g. "myrules:clipped_mean")')
    module_name, attribute = spec.split(":")
    if str(APP_DIR) not in sys.path:  # as under Flower, where the app folder is on the path
        sys.path.insert(0, str(APP_DIR))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the user's module raises while importing
        raise PluginError(
            f'{key}="{spec}": could not import {module_name!r} ({type(exc).__name__}: {exc}); put the module in '
            f"the app folder {str(APP_DIR)!r} (next to fedapp/) or install it on every node"
        ) from exc
    if not hasattr(module, attribute):
        raise PluginError(f'{key}="{spec}": module {module_name!r} has no attribute {attribute!r}')
    return getattr(module, attribute)


def check_signature(key: str, spec: str, obj: Any, parameters: tuple[str, ...]) -> Callable[..., Any]:
    """``obj`` if it is callable with ``parameters`` positionally, else a :class:`PluginError`
    naming the signature it must have."""
    wanted = f"({', '.join(parameters)})"
    if not callable(obj):
        raise PluginError(f'{key}="{spec}" is a {type(obj).__name__}, not a function or class {wanted}')
    try:
        inspect.signature(obj).bind(*parameters)
    except TypeError as exc:
        raise PluginError(f'{key}="{spec}" cannot be called as {wanted}: {exc}') from None
    except ValueError:  # builtins without a signature: let the call itself decide
        pass
    return obj
