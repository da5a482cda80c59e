"""lm-evaluation-harness's own log, kept out of ``mlkv eval``'s output.

The harness logs for its own command line: given a model object it warns "Please do not launch via accelerate or
use `parallelize=True` ..." and "Passed an already-initialized model through `pretrained` ...", and it logs its
seeds, tasks and phases at INFO. None of it is about mlkv's use of it. While ``quiet_harness`` is active the
harness's loggers (``lm_eval`` and below) pass on errors only, and the Python warnings its modules raise are
ignored. ``LMEVAL_LOG_LEVEL`` (the harness's own variable, e.g. ``INFO`` or ``WARNING``) brings its records back,
through the root logger like mlkv's own log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

__all__ = ["HARNESS_LOGGER", "LEVEL_ENV", "harness_log_level", "quiet_harness"]

#: The harness's top logger; every module of it logs below it.
HARNESS_LOGGER = "lm_eval"
#: The harness's own variable for its log level.
LEVEL_ENV = "LMEVAL_LOG_LEVEL"


def harness_log_level() -> int:
    """The level the harness's records need to be shown: ``$LMEVAL_LOG_LEVEL`` if it names a level, else ERROR."""
    level = logging.getLevelName(os.environ.get(LEVEL_ENV, "").strip().upper() or "ERROR")
    return level if isinstance(level, int) else logging.ERROR


@contextlib.contextmanager
def quiet_harness() -> Iterator[None]:
    """Within the block, the harness logs at ``harness_log_level()`` and its modules' warnings are ignored (unless
    that level is WARNING or below); both are put back afterwards."""
    logger = logging.getLogger(HARNESS_LOGGER)
    level = harness_log_level()
    old = logger.level
    logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            if level > logging.WARNING:
                warnings.filterwarnings("ignore", module=r"lm_eval(\.|$)")
            yield
    finally:
        logger.setLevel(old)
