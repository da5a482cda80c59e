"""``mlkv generate``: continue prompts with a checkpoint and its tokenizer, through transformers' ``generate()``
(``--engine hf``) or mlkv's engine (``--engine fast``). Prints each continuation, then one JSON line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlkv.errors import UsageError

__all__ = ["add_generate_arguments", "run_generate_command", "hf_generate"]


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="mlkv (or any transformers causal LM) checkpoint directory")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a file with one prompt per line")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (with --temperature)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens holding this probability (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--engine", choices=["hf", "fast"], default="hf",
                   help="hf: transformers' generate() (default); fast: mlkv's static-cache engine (CUDA-graph "
                        "decode on GPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, the checkpoint's dtype on GPU")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError("give at least one --prompt or a --prompts-file")
    return prompts


def run_generate_command(args: argparse.Namespace) -> int:
    """Continue prompts with a checkpoint, using its tokenizer. --engine hf uses transformers' generate(); --engine
    fast uses mlkv's static-cache engine (CUDA-graph decode on GPU)."""
    prompts = _read_prompts(args)
    from mlkv.model.loading import default_device, load_model  # torch and transformers: not needed for --help

    model, tok = load_model(args.model, args.device or default_device(), args.dtype, args.tokenizer)
    ids = [tok(p)["input_ids"] for p in prompts]
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    if args.engine == "fast":
        from mlkv.inference.engine import generate as fast_generate

        outputs = fast_generate(model, ids, **sampling)
    else:
        outputs = hf_generate(model, tok, ids, **sampling)
    results = []
    for prompt, out in zip(prompts, outputs):
        text = tok.decode(out, skip_special_tokens=True)
        print(f"{prompt}{text}\n")
        results.append({"prompt": prompt, "completion": text, "new_tokens": len(out)})
    print(json.dumps({"engine": args.engine, "results": results}))
    return 0


def hf_generate(model, tok, ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> list[list[int]]:
    """Left-padded batch through transformers' ``generate()``; returns the new tokens of each prompt (each cut
    after the tokenizer's eos token)."""
    import torch

    torch.manual_seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)  # (B, width), prompts right-aligned
    mask = torch.zeros_like(input_ids)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x):] = torch.tensor(x)
        mask[row, width - len(x):] = 1
    sample = temperature > 0
    out = model.generate(input_ids.to(model.device), attention_mask=mask.to(model.device),
                         max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=pad,
                         **({"temperature": temperature, "top_k": top_k, "top_p": top_p} if sample else {}))
    eos = tok.eos_token_id
    result = []
    for row in out[:, width:].tolist():
        result.append(row[: row.index(eos) + 1] if eos is not None and eos in row else row)
    return result
