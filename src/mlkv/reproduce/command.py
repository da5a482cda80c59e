"""``mlkv reproduce``: the flags (the fields of ``mlkv.reproduce.config.Settings``) and the command.

Importing this module needs no optional package (``--help`` works with the base install); the command checks for
lm-evaluation-harness, ``datasets`` and matplotlib before the first stage, not hours later at the evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mlkv.errors import require_extra
from mlkv.reproduce.config import Settings, canonical_plans
from mlkv.reproduce.pipeline import reproduce
from mlkv.settings import add_arguments, from_args

__all__ = ["add_reproduce_arguments", "run_reproduce_command", "settings_from_args"]


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per ``Settings`` field (``--out``, ``--smoke``, ``--plans``, ``--uptrain-lr``, ...)."""
    return add_arguments(parser, Settings)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``Settings`` from the flags: plan names spelled as the paper does, ``--smoke``'s tiny values for every setting
    left at its default, the distill and init-comparison plans cut to ``--plans``, and the values checked."""
    s = from_args(Settings, args, plans=canonical_plans(args.plans))
    if s.smoke:
        s = _smoke(s)
    s.distill_plans = [p for p in s.distill_plans if p in s.plans]
    s.init_plans = [p for p in s.init_plans if p in s.plans]
    if s.uptrain_lr <= 0:  # checked here, not minutes later when the first uptraining starts
        raise ValueError(f"--uptrain-lr must be positive, got {s.uptrain_lr}")
    if s.distill_hidden < 0:
        raise ValueError(f"--distill-hidden must be >= 0, got {s.distill_hidden}")
    return s


def _smoke(s: Settings) -> Settings:
    """``--smoke``: the smoke settings, with every flag given a value other than its default on top."""
    default = Settings()
    given = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)
             if f.name != "out" and getattr(s, f.name) != getattr(default, f.name)}
    return Settings.smoke_settings(s.out, **given)


def run_reproduce_command(args: argparse.Namespace) -> int:
    """Run the MLKV paper's experiment end to end on the Gutenberg corpus: pretrain (or --base) an MHA model,
    convert it to the 9 paper configs, uptrain each (lm, and distill for MLKV), evaluate perplexity and zero-shot
    tasks, benchmark inference, and write report.md, results.json and plots. --smoke runs it all tiny on CPU."""
    s = settings_from_args(args)
    for module in ("lm_eval", "datasets", "matplotlib"):
        require_extra(module, "mlkv reproduce")
    report = reproduce(s, command="mlkv " + " ".join(sys.argv[1:]))
    results = json.loads((Path(s.out) / "results.json").read_text())
    print(report.read_text())
    print(json.dumps({"report": str(report), "rows": len(results["rows"]), "seconds": round(results["seconds"], 1),
                      "distillation_gap": results["distillation_gap"]}))
    return 0
