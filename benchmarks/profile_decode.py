"""Profile the mlkv engine's decode step with ``torch.profiler``: wall time, GPU kernel time and kernel launches per
step, the top kernels by device time and the fraction of the step the GPU is busy.

    python benchmarks/profile_decode.py [pythia-160m] [--plan MHA-144] [--batch 1] [--no-compile] [--bucket 256]
        [--coordinate-descent] [--out FILE.json]
    CPU smoke test (a tiny 12x12 model, CPU op self times instead of kernels):
    python benchmarks/profile_decode.py --device cpu

The model is built as ``mlkv bench`` builds it (random weights unless a checkpoint directory is given; speed does
not depend on the values). The engine is compiled by default on CUDA (its decode step through ``torch.compile``,
captured in CUDA graphs; ``--no-compile``: CUDA graphs alone) and eager on CPU, where inductor's C++ build takes
minutes (``--compile`` forces it). One generate warms the engine up (graph capture, compilation); the same prompts
are then prefilled again and the decode steps of a generate of ``--new-tokens`` tokens are timed unprofiled
(median of ``--repeats``) and then profiled, the prefill outside the profile. ``--coordinate-descent`` sets
``torch._inductor.config.coordinate_descent_tuning`` before compiling, as gpt-fast does. Prints a table and ends
with one JSON line (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import tiny_cpu_config  # noqa: E402
from report import finish  # noqa: E402
from mlkv.inference.bench.measure import random_prompts, sync  # noqa: E402
from mlkv.inference.bench.models import build_model, resolve_model  # noqa: E402
from mlkv.inference.bench.settings import parse_bucket  # noqa: E402
from mlkv.inference.engine import MLKVEngine  # noqa: E402
from mlkv.model.loading import default_device, parse_dtype  # noqa: E402
from mlkv.model.sharing import resolve_plan  # noqa: E402

NAME_WIDTH = 70


def device_events(prof, cuda: bool) -> list[tuple[str, float]]:
    """(name, microseconds) of everything the device ran: on CUDA every kernel (memcpy and memset included), on CPU
    every op's self time (so that nested ops are not counted twice)."""
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == kind and not e.is_user_annotation
              and not e.name.startswith("[memory]")]
    if cuda:
        return [(e.name, e.time_range.elapsed_us()) for e in events]
    return [(e.name, e.self_cpu_time_total) for e in events]


def top_kernels(events: list[tuple[str, float]], n: int) -> list[dict]:
    """The ``n`` names with the most total time: count, total and mean microseconds."""
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, us in events:
        by_name[name].append(us)
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:n]
    return [{"name": name[:NAME_WIDTH], "count": len(us), "total_us": round(sum(us), 2),
             "mean_us": round(sum(us) / len(us), 3)} for name, us in ranked]


def decode_seconds(engine: MLKVEngine, rows: list[list[int]], steps: int, device) -> float:
    """Prefill ``rows`` afresh (untimed), then the wall time of ``steps`` decode steps."""
    first_col = engine.prefill(rows)
    sync(device)
    t = time.perf_counter()
    engine.decode(steps, first_col)
    sync(device)
    return time.perf_counter() - t


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", metavar="DIR_OR_PRESET", nargs="?", default="pythia-160m",
                    help="a preset (default pythia-160m; a tiny 12x12 model on CPU) or a checkpoint directory")
    ap.add_argument("--plan", default="MHA-144", help="sharing plan (default MHA-144)")
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together (default 1)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (512; 32 on CPU)")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="new tokens of the profiled generate, that many - 1 decode steps (128; 8 on CPU)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="bf16 (default on cuda), fp16 or fp32 (default on cpu)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="decode step through torch.compile (default: on CUDA yes, on CPU no)")
    ap.add_argument("--bucket", default="auto", help="the engine's attention-length granularity (auto, none or N)")
    ap.add_argument("--coordinate-descent", action="store_true",
                    help="torch._inductor.config.coordinate_descent_tuning = True before compiling")
    ap.add_argument("--repeats", type=int, default=3, help="unprofiled timed decodes (median)")
    ap.add_argument("--top", type=int, default=15, help="kernels listed")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    ap.add_argument("--out", default=None, help="write the JSON report here too")
    return ap


def print_profile(report: dict, cuda: bool) -> None:
    """The run's settings, the per-step times, then the top kernels (or CPU ops) by total time."""
    print(f"{report['device']}, {report['dtype']}, {report['source']}, plan {report['plan']}, batch "
          f"{report['batch']}, prompt {report['prompt_len']}, {report['steps']} decode steps; engine "
          f"{'compiled' if report['compiled'] else 'eager step'}{' + CUDA graphs' if report['cuda_graphs'] else ''}"
          f", bucket {report['bucket'] or 'none (whole cache)'}"
          f"{', coordinate descent' if report['coordinate_descent'] else ''}")
    unit = "kernel" if cuda else "cpu op"
    print(f"wall {report['step_ms']:.4g} ms/step ({report['profiled_step_ms']:.4g} profiled); {unit} time "
          f"{report['kernel_ms_per_step']:.4g} ms/step; {report['kernels_per_step']:.4g} {unit}s/step; busy "
          f"{report['busy_fraction']:.1%} of the profiled wall time")
    print(f"{'name':<{NAME_WIDTH}} {'count':>7} {'total us':>11} {'mean us':>9}")
    for k in report["top"]:
        print(f"{k['name']:<{NAME_WIDTH}} {k['count']:>7} {k['total_us']:>11.1f} {k['mean_us']:>9.2f}")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)

    device = torch.device(args.device or default_device())
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    try:
        dtype = parse_dtype(args.dtype or ("bf16" if cuda else "fp32"), "--dtype")
    except ValueError as err:
        raise SystemExit(str(err)) from None
    compile_ = cuda if args.compile is None else args.compile
    if args.coordinate_descent and not compile_:
        raise SystemExit("--coordinate-descent tunes torch.compile's kernels: it needs the compiled engine")
    if args.coordinate_descent:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    tiny = not cuda and args.model == "pythia-160m"  # the Pythia-160M shape is far too slow for a CPU smoke run
    if tiny:
        torch.set_num_threads(1)  # toy matrices: threads only add synchronisation
    prompt_len = args.prompt_len if args.prompt_len is not None else (32 if tiny else 512)
    new_tokens = args.new_tokens if args.new_tokens is not None else (8 if tiny else 128)
    for name, value, low in (("--batch", args.batch, 1), ("--prompt-len", prompt_len, 1),
                             ("--new-tokens", new_tokens, 2), ("--repeats", args.repeats, 1)):
        if value < low:
            raise SystemExit(f"{name} ({value}) must be at least {low}")

    config, loaded, source = resolve_model(tiny_cpu_config() if tiny else args.model)
    plan = resolve_plan(args.plan, config.num_hidden_layers, config.num_attention_heads)
    model, weights = build_model(config, loaded, plan, device, dtype, args.seed)
    rows = random_prompts(args.batch, prompt_len, config.vocab_size, args.seed).tolist()
    steps = new_tokens - 1

    engine = MLKVEngine(model, compile=compile_, bucket=parse_bucket(args.bucket))
    with torch.no_grad():
        t = time.perf_counter()
        engine.generate(rows, new_tokens, stop_tokens=[])  # graph capture, compilation
        sync(device)
        warmup_s = time.perf_counter() - t
        step_s = statistics.median(decode_seconds(engine, rows, steps, device) for _ in range(args.repeats)) / steps
        first_col = engine.prefill(rows)
        sync(device)
        activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            engine.decode(steps, first_col)
            sync(device)
            profiled_s = time.perf_counter() - t
    events = device_events(prof, cuda)
    busy_us = sum(us for _, us in events)
    report = {
        "benchmark": "profile_decode", "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, "source": source, "weights": weights,
        "plan": plan.name or plan.structure, "batch": args.batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "steps": steps, "compiled": compile_, "bucket": engine.bucket, "cuda_graphs": engine.cuda_graphs,
        "coordinate_descent": args.coordinate_descent, "warmup_s": round(warmup_s, 3),
        "events": "cuda kernels (memcpy/memset included)" if cuda else "cpu ops (self time)",
        "step_ms": step_s * 1e3, "profiled_step_ms": profiled_s / steps * 1e3,
        "kernel_ms_per_step": busy_us / steps / 1e3, "kernels_per_step": len(events) / steps,
        "busy_fraction": busy_us / (profiled_s * 1e6), "top": top_kernels(events, args.top),
    }
    engine.release()
    print_profile(report, cuda)
    if args.out:
        return finish(report, Path(args.out))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
