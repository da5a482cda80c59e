#!/usr/bin/env python
"""Issue-5 inference benchmark: the nine paper plans on the Pythia-160M shape (bf16, random weights), the mlkv
engine next to transformers' generate() (dynamic and static cache) on the same card.

  GPU (full, ~4-6 min):  python benchmarks/inference.py
  GPU (quick):           python benchmarks/inference.py --quick
  CPU smoke test (<1 min, a tiny 12x12 model): python benchmarks/inference.py --quick --device cpu

Runs: batch 1 and 64 at prompt 512 + 128 new tokens; decode steps at context 1024 for batch 1, 64, 128, 256;
max batch at context 2048 and max context at batch 64 with the card's memory as budget; then, while the deadline
(--deadline-s, default 420 s) allows, the torch.compile'd engine on the generate and step runs at batch 1 for
MHA-144 and MLKV-1 (--compile-max-batch and --compile-plans to change, --no-compile to skip). Writes
benchmarks/results/inference.{json,csv} and plots; any mlkv bench option can be added (see --help).
"""

import argparse
import sys
import tempfile
from pathlib import Path

try:
    from mlkv.inference.bench.command import add_bench_arguments, run_bench_command
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from mlkv.inference.bench.command import add_bench_arguments, run_bench_command

from mlkv.model.config import preset_config

RESULTS = Path(__file__).resolve().parent / "results"


def tiny_cpu_config():
    """The paper's 12 layers x 12 heads at toy width, so that all nine plans resolve; small enough for a CPU."""
    return preset_config("tiny-neox", num_hidden_layers=12, num_attention_heads=12, hidden_size=96,
                         intermediate_size=192, max_position_embeddings=256)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    # --compile / --no-compile: unset means on (the run ends with the torch.compile'd engine on the generate and step
    # runs up to --compile-max-batch, until the deadline), except for the CPU smoke run.
    parser.set_defaults(out=str(RESULTS), compile=None)
    args = parser.parse_args(argv)
    import torch

    cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    model = None
    if cpu and args.model == "pythia-160m":
        # The Pythia-160M shape is far too slow for a CPU smoke run: a tiny 12x12 model exercises the same code.
        model = tiny_cpu_config()
        torch.set_num_threads(1)  # toy matrices: threads only add synchronisation (and contention on shared CPUs)
        defaults = dict(batch=["1", "4"], prompt_len=32, new_tokens=8, step_context=64, step_batch=["4"],
                        step_tokens=4, context=256, context_batch=4, repeats=1)
        for key, value in defaults.items():
            if getattr(args, key) is None or (key == "context_batch" and args.context_batch == 64):
                setattr(args, key, value)
        if args.out == str(RESULTS):
            args.out = str(Path(tempfile.gettempdir()) / "mlkv-bench-cpu-smoke")  # keep the repo clean
        args.compile = bool(args.compile)
    else:
        if args.deadline_s is None:
            args.deadline_s = 420.0  # one device command under ~8 minutes: later optional runs are skipped
        args.compile = args.compile is not False
        if args.compile_plans is None:  # the two ends of the grid: one compilation (~20-40 s) each
            args.compile_plans = ["MHA-144", "MLKV-1"]
    return run_bench_command(args, model=model)


if __name__ == "__main__":
    raise SystemExit(main())
