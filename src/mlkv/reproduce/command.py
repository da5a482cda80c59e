"""``mlkv reproduce``: the flags (the fields of ``mlkv.reproduce.config.Settings``) and the command.

Importing this module needs no optional package (``--help`` works with the base install); the command checks every
setting, plan and task name, then lm-evaluation-harness, ``datasets`` and matplotlib, then (in ``reproduce``) every
input file, before the first stage: not hours later at the evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlkv.errors import require_extra
from mlkv.reproduce.config import Settings, resolve_settings
from mlkv.reproduce.pipeline import reproduce
from mlkv.settings import add_arguments, from_args

__all__ = ["add_reproduce_arguments", "run_reproduce_command", "settings_from_args"]


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per ``Settings`` field (``--out``, ``--smoke``, ``--base``, ``--plans``, ``--uptrain-lr``, ...)."""
    return add_arguments(parser, Settings)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``Settings`` from the flags, resolved for the pipeline ``--base`` names (``--smoke``'s values for every
    setting left at its default) and checked: a bad plan, task, init or number fails here."""
    return resolve_settings(from_args(Settings, args))


def run_reproduce_command(args: argparse.Namespace) -> int:
    """Run the MLKV paper's experiment end to end on the Gutenberg corpus: pretrain a 12x12 MHA base (or take a
    real one: --base smollm2, a .gguf or a folder), convert it to every plan, uptrain each (lm, and distill from the
    original), evaluate perplexity and zero-shot tasks (also before training, for a real base), benchmark inference,
    and write report.md, results.json and plots. --smoke runs it all tiny on CPU."""
    s = settings_from_args(args)
    for module in ("lm_eval", "datasets", "matplotlib"):
        require_extra(module, "mlkv reproduce")
    report = reproduce(s, command="mlkv " + " ".join(sys.argv[1:]))
    results = json.loads((Path(s.out) / "results.json").read_text())
    print(report.read_text())
    seconds = results["seconds"]  # None: --report-only on a run that recorded no time yet
    print(json.dumps({"report": str(report), "rows": len(results["rows"]),
                      "seconds": None if seconds is None else round(seconds, 1),
                      "disk_gb": round(results["disk_bytes"] / 1e9, 3), "findings": {
                          k: v.get("verdict") for k, v in results["findings"].items()},
                      "distillation_gap": {plan: {m: (g["control"] or {}).get("fraction_closed") for m, g in v.items()}
                                           for plan, v in results["distillation_gap"].items()}}))
    return 0
