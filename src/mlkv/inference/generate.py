"""``mlkv generate``: continue prompts with a checkpoint and its tokenizer, through transformers' ``generate()``
(``--engine hf``) or mlkv's engine (``--engine fast``). Prints each continuation, then one JSON line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlkv.devices import check_device
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
        prompts += [line for line in _prompts_file_lines(args.prompts_file) if line.strip()]
    if not prompts:
        raise UsageError("give at least one --prompt or a --prompts-file")
    return prompts


def _prompts_file_lines(path: str) -> list[str]:
    """The lines of ``--prompts-file``; a folder, a missing or an unreadable file is an error naming the flag."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise UsageError(f"--prompts-file {path}: is a folder; give a text file with one prompt per line")
    try:
        return file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"--prompts-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--prompts-file {path}: cannot be read as UTF-8 text ({exc})") from None


def check_sampling(args: argparse.Namespace) -> None:
    """Each sampling flag in its range (transformers checks some only after the model has loaded, others never:
    ``--top-p 2`` would sample from every token)."""
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens ({args.max_new_tokens}) must be a positive integer")
    if not 0.0 <= args.temperature < float("inf"):
        raise UsageError(f"--temperature ({args.temperature}) must be a finite number >= 0 (0: greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k ({args.top_k}) must be a positive integer")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p ({args.top_p}) must be in (0, 1]")
    sampled = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p)) if value is not None]
    if sampled and args.temperature == 0:
        raise UsageError(f"{' and '.join(sampled)} only apply to sampling: give --temperature above 0 as well "
                         "(0 is greedy)")


def run_generate_command(args: argparse.Namespace) -> int:
    """Continue prompts with a checkpoint, using its tokenizer. --engine hf uses transformers' generate(); --engine
    fast uses mlkv's static-cache engine (CUDA-graph decode on GPU)."""
    check_sampling(args)
    check_device(args.device)
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
