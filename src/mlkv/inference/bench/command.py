"""``mlkv bench``: its flags come from ``BenchSettings`` (one flag per field, the field's docstring as help)."""

from __future__ import annotations

import argparse

from mlkv.inference.bench.settings import BenchSettings, parse_bucket
from mlkv.settings import add_arguments, from_args

__all__ = ["add_bench_arguments", "run_bench_command"]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR_OR_PRESET", nargs="?", default="pythia-160m",
                        help="a preset (default pythia-160m, random weights), a converted checkpoint directory, "
                             "or a directory holding only an mlkv config.json (its shape, random weights)")
    add_arguments(parser, BenchSettings)


def run_bench_command(args: argparse.Namespace, model=None) -> int:
    """Benchmark decoding: the mlkv engine (static producer-only cache, CUDA graphs) against transformers'
    generate() for each sharing plan: KV bytes per token, memory, max batch and context under a budget, decode and
    prefill speed, and decode step time against the HBM bound. Writes JSON, CSV and plots with --out."""
    from mlkv.inference.bench.run import run_bench  # torch and transformers: not needed for --help

    settings = from_args(BenchSettings, args, bucket=parse_bucket(args.bucket))
    run_bench(model if model is not None else args.model, settings)
    return 0
