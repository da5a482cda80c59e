"""Forward + backward speed at bf16, seq 2048, on the Pythia-160M shape: mlkv's model against transformers'
``GPTNeoXForCausalLM`` (same weights, converted), and mlkv across sharing plans. Random weights and tokens.

    python benchmarks/forward.py [--batch 8] [--seq 2048] [--iters 20] [--plans MHA-144 MLKV-6 ...] [--out FILE]

Times each step with CUDA events (median of ``--iters`` after warm-up). Also measures the card's bf16 matmul rate
(8192^3) in the same run and reports model FLOP utilisation (6 x params x tokens + attention) against it.
Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import mlkv  # noqa: F401  (registers the model)
from mlkv.files import atomic_json
from mlkv.model.convert import build_model, convert_state
from mlkv.tables import text_table


def matmul_tflops(device, n: int = 8192, iters: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def time_train_step(model, ids, iters: int, warmup: int = 5) -> float:
    """Median milliseconds of forward + backward (loss on all tokens) under bf16 autocast."""
    model.train()
    times = []
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def model_flops_per_token(model, seq: int) -> float:
    """6 x parameters (lm head included, input embedding excluded) + attention 12 x layers x hidden x seq."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.hidden_size
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    ap.add_argument("--iters", type=int, default=20, help="timed steps per round, after warm-up (default 20)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best is kept")
    ap.add_argument("--plans", nargs="*", default=["MHA-144", "GQA-48", "MLKV-48", "MQA-12", "MLKV-6", "MLKV-1"],
                    help="sharing plans to time against transformers' model (default: six of the paper's grid)")
    ap.add_argument("--out", default=None, help="write the JSON results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/forward.py needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    card = torch.cuda.get_device_name()
    peak = matmul_tflops(device)

    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12,
                                          num_attention_heads=12, intermediate_size=3072, rotary_pct=0.25,
                                          max_position_embeddings=2048))
    tmp = tempfile.mkdtemp()
    hf.save_pretrained(tmp)
    hf = hf.to(device)
    ids = torch.randint(0, 50304, (args.batch, args.seq), device=device)
    tokens = args.batch * args.seq
    rows = []

    def record(name, model, ms):
        flops = model_flops_per_token(model, args.seq) * tokens
        rows.append({"model": name, "ms_per_step": round(ms, 2), "tokens_per_s": round(tokens / ms * 1e3),
                     "mfu_vs_measured_matmul": round(flops / (ms / 1e3) / 1e12 / peak, 3)})

    # Every model is built once and timed in ``--rounds`` interleaved rounds (so drift of the card's clocks hits all
    # of them alike); each row reports the best round's median.
    models = {"hf GPTNeoXForCausalLM (sdpa)": hf}
    for plan in args.plans:
        state, config = convert_state(tmp, plan)
        models[f"mlkv {plan}"] = build_model(state, config).to(device)
    best = {name: time_train_step(m, ids, args.iters) for name, m in models.items()}
    for _ in range(args.rounds - 1):
        for name, m in models.items():
            best[name] = min(best[name], time_train_step(m, ids, args.iters))
    for name, m in models.items():
        record(name, m, best[name])
    hf_ms = rows[0]["ms_per_step"]
    for r in rows:
        r["speed_vs_hf"] = round(hf_ms / r["ms_per_step"], 3)
    print(f"{card}: forward+backward, bf16 autocast, batch {args.batch} x seq {args.seq}; "
          f"measured bf16 matmul {peak:.0f} TFLOP/s; best of {args.rounds} interleaved rounds")
    print(text_table(rows))
    result = {"benchmark": "forward_backward", "card": card, "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "batch": args.batch, "seq": args.seq, "rounds": args.rounds, "iters": args.iters,
              "matmul_tflops": round(peak, 1), "rows": rows}
    if args.out:
        atomic_json(args.out, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
