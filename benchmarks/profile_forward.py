"""Profile one forward+backward step (bf16, Pythia-160M shape) of HF GPTNeoX and mlkv plans: top CUDA kernels.

    python benchmarks/profile_forward.py [--plans MHA-144 GQA-48] [--batch 8] [--seq 2048]
"""

import argparse
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import mlkv  # noqa: F401
from mlkv.model.convert import build_model, convert_state


def step(model, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", nargs="*", default=["MHA-144", "GQA-48"], help="sharing plans to profile")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    args = ap.parse_args()
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12,
                                          num_attention_heads=12, intermediate_size=3072, rotary_pct=0.25))
    tmp = tempfile.mkdtemp()
    hf.save_pretrained(tmp)
    ids = torch.randint(0, 50304, (args.batch, args.seq), device="cuda")
    models = {"hf": hf.cuda().train()}
    for plan in args.plans:
        state, config = convert_state(tmp, plan)
        models[plan] = build_model(state, config).cuda().train()
    for name, model in models.items():
        for _ in range(3):
            step(model, ids)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(model, ids)
            torch.cuda.synchronize()
        print(f"==== {name}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    main()
