#!/usr/bin/env python
"""Host-side cost of one lm-eval evaluation, the scoring left out: where the CPU time of ``mlkv eval`` goes when the
model itself is free (as it nearly is for the small models of ``mlkv reproduce`` on a GPU).

    python benchmarks/eval_host_cost.py [--tasks lambada_openai piqa arc_easy sciq hellaswag] [--limit N]

``BatchedHFLM._loglikelihood_tokens`` is replaced by a constant answer, so what is timed is the harness's own work:
building the requests (documents, prompts), tokenizing them, and computing the metrics. Profiled with cProfile;
prints the main phases and ends with one JSON line. Needs the shared data (``--data-dir`` / ``$MLKV_DATA``).
"""

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mlkv import evaluate as ev  # noqa: E402
from mlkv.harness import BatchedHFLM  # noqa: E402
from mlkv.tasks.converters import resolve_data_dir  # noqa: E402

PHASES = {  # phase: (file suffix, function) in the profile
    "build requests": ("lm_eval/api/task.py", "build_all_requests"),
    "tokenize": ("lm_eval/api/model.py", "_encode_pair"),
    "metrics": ("lm_eval/api/task.py", "process_results"),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(ev.DEFAULT_TASKS))
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: full sets)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    data = resolve_data_dir(args.data_dir)
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
    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.enable()
    ev.run_tasks(model, args.tasks, limit=args.limit, batch_size=32, data_dir=data, tokenizer=tok, bootstrap_iters=100)
    profiler.disable()
    wall = time.perf_counter() - t
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (cc, nc, tottime, cumtime, callers)}
    phases = {phase: round(sum(v[3] for (f, _, fn), v in stats.items() if f.endswith(suffix) and fn == func), 1)
              for phase, (suffix, func) in PHASES.items()}
    report = {"benchmark": "eval_host_cost", "tasks": args.tasks, "limit": args.limit, "requests": len(requests),
              "wall_s_profiled": round(wall, 1), "phases_s": phases}
    print(f"{'phase':<16} {'seconds':>8}")
    for phase, seconds in phases.items():
        print(f"{phase:<16} {seconds:>8.1f}")
    print(f"{'total (profiled)':<16} {wall:>8.1f}  ({len(requests):,} log-likelihood requests)")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
