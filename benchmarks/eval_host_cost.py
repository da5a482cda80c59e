#!/usr/bin/env python
"""Host-side cost of one lm-eval evaluation, the scoring left out: where the CPU time of ``mlkv eval`` goes when the
model itself is free (as it nearly is for the small models of ``mlkv reproduce`` on a GPU).

    python benchmarks/eval_host_cost.py [--tasks lambada_openai piqa arc_easy sciq hellaswag] [--limit N]

``BatchedHFLM._loglikelihood_tokens`` is replaced by a constant answer, so what is timed is the harness's own work:
building the requests (documents, prompts), tokenizing them, and computing the metrics. Profiled with cProfile,
three times in one run: with ``HFLM``'s own tokenization (one ``encode`` per string, the baseline), with
``BatchedHFLM``'s batched tokenization, and with that plus the request cache (``run_tasks(request_cache=...)``,
built once beforehand by ``build_request_cache``, whose time is reported too, unprofiled). Prints the main phases
and ends with one JSON line (also written to ``--out``). Needs the shared data (``--data-dir`` / ``$MLKV_DATA``).

    python benchmarks/eval_host_cost.py --out benchmarks/results/eval_host_cost_cpu.json
"""

import argparse
import cProfile
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lm_eval.models.huggingface import HFLM  # noqa: E402
from report import finish  # noqa: E402
from mlkv.data.paths import default_data_dir  # noqa: E402
from mlkv.evaluation import tasks  # noqa: E402
from mlkv.evaluation.harness import BatchedHFLM  # noqa: E402

PHASES = {  # phase: the (file suffix, function) pairs whose cumulative times it adds up, in the profile
    "build requests": [("lm_eval/api/task.py", "build_all_requests")],
    "tokenize": [("lm_eval/api/model.py", "_encode_pair"), ("mlkv/evaluation/harness.py", "_encode_all")],
    "metrics": [("lm_eval/api/task.py", "process_results")],
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(tasks.DEFAULT_TASKS), help="local tasks (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: full sets)")
    ap.add_argument("--data-dir", default=None, help="shared data folder (default: $MLKV_DATA, else ../shared/data)")
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    args = ap.parse_args(argv)
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    data = default_data_dir(args.data_dir)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(data / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"),
                                  eos_token="<|endoftext|>")
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50304, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32)).eval()
    requests = []

    def constant_answers(self, reqs, *args, **kwargs):
        requests.extend(reqs)
        return [(-1.0, False)] * len(reqs)

    BatchedHFLM._loglikelihood_tokens = constant_answers
    torch.set_num_threads(1)
    runs = {}
    batched_loglikelihood = BatchedHFLM.loglikelihood
    cache = None
    for name, loglikelihood, cached in (("hflm tokenization", HFLM.loglikelihood, False),
                                        ("batched", batched_loglikelihood, False),
                                        ("batched + cache", batched_loglikelihood, True)):
        if cached and args.limit is not None:
            continue  # the request cache serves full sets only
        BatchedHFLM.loglikelihood = loglikelihood
        if cached:
            cache = Path(tempfile.mkdtemp(prefix="mlkv-requests-"))
            t = time.perf_counter()
            tasks.build_request_cache(args.tasks, cache, data)
            build_s = time.perf_counter() - t
        requests.clear()
        profiler = cProfile.Profile()
        t = time.perf_counter()
        profiler.enable()
        tasks.run_tasks(model, args.tasks, limit=args.limit, batch_size=32, data_dir=data, tokenizer=tok,
                     bootstrap_iters=100, request_cache=cache if cached else None)
        profiler.disable()
        wall = time.perf_counter() - t
        stats = pstats.Stats(profiler).stats  # {(file, line, function): (cc, nc, tottime, cumtime, callers)}
        phases = {phase: round(sum(v[3] for (f, _, fn), v in stats.items() for suffix, func in pairs
                                   if f.endswith(suffix) and fn == func), 1) for phase, pairs in PHASES.items()}
        runs[name] = {"wall_s_profiled": round(wall, 1), "phases_s": phases, "requests": len(requests)}
        if cached:
            runs[name]["cache_build_s"] = round(build_s, 1)
            shutil.rmtree(cache)
    BatchedHFLM.loglikelihood = batched_loglikelihood
    print(f"{'phase':<16} " + " ".join(f"{name:>18}" for name in runs))  # profiled: Python calls cost more
    for phase in PHASES:
        print(f"{phase:<16} " + " ".join(f"{r['phases_s'][phase]:>18.1f}" for r in runs.values()))
    print(f"{'total (profiled)':<16} " + " ".join(f"{r['wall_s_profiled']:>18.1f}" for r in runs.values())
          + f"  ({len(requests):,} log-likelihood requests)")
    last = runs.get("batched + cache", runs["batched"])
    if "cache_build_s" in last:
        print(f"the request cache took {last['cache_build_s']:.1f} s to build, once (unprofiled)")
    base, new = runs["hflm tokenization"]["phases_s"]["tokenize"], runs["batched"]["phases_s"]["tokenize"]
    report = {"benchmark": "eval_host_cost", "tasks": args.tasks, "limit": args.limit, "requests": len(requests),
              "cpu": _cpu(), "runs": runs, "tokenize_speedup": round(base / new, 1) if new else None,
              "total_speedup": round(runs["hflm tokenization"]["wall_s_profiled"] / last["wall_s_profiled"], 2)}
    if args.out:
        return finish(report, Path(args.out))
    print(json.dumps(report))
    return report


def _cpu() -> str:
    import platform

    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
