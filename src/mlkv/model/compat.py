"""The transformers releases the model code runs on, checked when that code is imported.

The model follows transformers' internals (its caches, its mask helper, the cache argument renamed in 5.24), so on a
release outside the tested range it would fail somewhere deep in a forward pass. Importing this module (the first
import of ``mlkv.model.config``) makes that one clear ``ImportError`` instead, in mlkv and in the modeling files that
``mlkv export`` ships with a checkpoint, where it is all a user without mlkv sees.
"""

from __future__ import annotations

import re

import transformers

#: Tested transformers releases as (major, minor): at least the first, below the second. pyproject.toml's dependency
#: says the same (a test keeps the two equal).
SUPPORTED_TRANSFORMERS = ((5, 23), (5, 25))


def transformers_requirement() -> str:
    """The supported range as a pip requirement: ``transformers>=5.23,<5.25``."""
    (low_major, low_minor), (high_major, high_minor) = SUPPORTED_TRANSFORMERS
    return f"transformers>={low_major}.{low_minor},<{high_major}.{high_minor}"


def check_transformers(version: str) -> None:
    """Raise ``ImportError`` naming the installed ``version`` and the supported range unless it is in the range."""
    low, high = SUPPORTED_TRANSFORMERS
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if not low <= release < high:
        requirement = transformers_requirement()
        raise ImportError(f"transformers {version} is installed, but this MLKV model code supports {requirement}: "
                          f"pip install '{requirement}'")


check_transformers(transformers.__version__)
