"""Errors a user can act on, and the check for an optional extra.

``UsageError``: a bad flag value or input file, reported by the CLI as ``mlkv X: error: ...`` with exit code 2.
``MissingExtraError``: a command needs a package from an extra (``pip install 'mlkv[eval]'``); its ``--help`` never
does, since command modules import such packages only when they run.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: Which extra installs each optional package.
EXTRAS = {"lm_eval": "eval", "accelerate": "eval", "datasets": "data", "pyarrow": "data", "matplotlib": "plot",
          "gguf": "real", "liger_kernel": "liger"}


class UsageError(ValueError):
    """A bad input the user can fix; the message names the flag or file, the value and the rule."""


class MissingExtraError(UsageError, ImportError):
    """A command needs an optional package; the message names the extra that installs it."""


def require_extra(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise ``MissingExtraError`` naming ``pip install 'mlkv[<extra>]'``."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        extra = EXTRAS.get(module.split(".")[0], "all")
        raise MissingExtraError(f"{purpose or module} needs the {module.split('.')[0]!r} package: "
                                f"pip install 'mlkv[{extra}]'")
    return importlib.import_module(module)
