"""The ``mlkv train`` command (also ``python -m mlkv.training``, and under ``torchrun -m mlkv.training``): its flags
are the fields of ``TrainConfig``, their help the docstrings under them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from mlkv.settings import add_arguments, from_args
from mlkv.training.config import TrainConfig

__all__ = ["add_train_arguments", "run_train_command", "main"]


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``mlkv train`` (dest names = ``TrainConfig`` fields)."""
    return add_arguments(parser, TrainConfig)


def run_train_command(args: argparse.Namespace) -> int:
    """Train a model (pretraining from a config/preset, uptraining or distillation from a checkpoint).

    The ``mlkv train`` command: prints a JSON summary on rank 0 and returns the exit status: 0 when the run
    completed (or stopped at --stop-after-steps), 128 + the signal's number when SIGTERM/SIGINT stopped it early
    (with a checkpoint to --resume; "interrupted" in the summary), so that ``mlkv train ... && mlkv eval ...`` does
    not evaluate an unfinished model."""
    from mlkv.training.loop import NonFiniteLossError, train

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = train(from_args(TrainConfig, args))
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        brief = {k: v for k, v in summary.items() if k not in ("losses", "step_seconds", "data")}
        print(json.dumps(brief))
    if "stop_signal" in summary:  # a signal stopped it (on several ranks, one that did not receive it has None)
        return 128 + (summary["stop_signal"] or signal.SIGTERM)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlkv train", description=run_train_command.__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    return run_train_command(parser.parse_args(argv))
