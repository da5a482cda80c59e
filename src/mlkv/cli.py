"""``mlkv <command>``: one entry point; each command's help is its function's docstring."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """A plain aligned text table."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


# ---- plan -----------------------------------------------------------------------------------------------------------
def cmd_plan(args) -> int:
    """Show sharing plans and their KV-cache cost: bytes per token and per sequence, and the reduction against MHA
    and MQA. With the paper's shape (12 layers x 12 heads) the default list is the paper's grid."""
    from mlkv.model.sharing import PAPER_PRESETS, PAPER_SHAPE, resolve_plan

    names = args.plans or (PAPER_PRESETS if (args.layers, args.heads) == PAPER_SHAPE else ["mha", "mqa"])
    mha = resolve_plan("mha", args.layers, args.heads).kv_bytes_per_token(args.head_dim, args.dtype)
    mqa = resolve_plan("mqa", args.layers, args.heads).kv_bytes_per_token(args.head_dim, args.dtype)
    rows = []
    for name in names:
        plan = resolve_plan(name, args.layers, args.heads)
        per_token = plan.kv_bytes_per_token(args.head_dim, args.dtype)
        rows.append({"plan": plan.name or name, "structure": plan.structure, "producers": plan.num_producers,
                     "kv_heads": plan.total_kv_heads, "bytes_per_token": per_token,
                     f"MiB_per_seq@{args.context}": round(per_token * args.context / 2**20, 3),
                     "vs_mha": f"{mha / per_token:.1f}x", "vs_mqa": f"{mqa / per_token:.2f}x",
                     "kv_source_layers": ",".join(map(str, plan.kv_source_layers))})
    print(f"KV cache for {args.layers} layers x {args.heads} heads, head_dim {args.head_dim}, {args.dtype}")
    print_table(rows)
    print(json.dumps({"layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
                      "dtype": args.dtype, "context": args.context, "plans": rows}))
    return 0


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=12, help="num_hidden_layers (default 12)")
    p.add_argument("--heads", type=int, default=12, help="num_attention_heads (default 12)")
    p.add_argument("--head-dim", type=int, default=64, help="head_dim (default 64)")
    p.add_argument("--dtype", default="fp16", help="cache dtype: fp16, bf16, fp32, fp8 (default fp16)")
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence for the per-sequence column")
    p.add_argument("--plans", nargs="*", help="plan names (default: the paper's grid on 12x12, else mha mqa)")


# ---- convert --------------------------------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    """Convert a Hugging Face checkpoint (GPTNeoX/Pythia, Llama, Qwen2, Mistral) to an MLKV checkpoint: K/V heads are
    mean-pooled within groups, and consumer layers' K/V folded into their producer (--init mean|pairwise|first).
    --keep-params widens the MLPs to restore the parameter count (new neurons have zero output weights, so the
    converted model's output is unchanged)."""
    from mlkv.model.convert import convert_checkpoint

    dst = convert_checkpoint(args.src, args.dst, plan=args.plan, init=args.init, keep_params=args.keep_params,
                             seed=args.seed, overwrite=args.overwrite)
    meta = json.loads((dst / "mlkv_conversion.json").read_text())
    print(f"wrote {dst}: plan {meta['structure']} (producers {sorted(set(meta['kv_source_layers']))}), "
          f"{meta['kv_bytes_per_token_fp16']} KV bytes/token in fp16, {meta['parameters']:,} parameters")
    print(json.dumps(meta))
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    from mlkv.model.convert import DEFAULT_INIT, INITS

    p.add_argument("src", help="Hugging Face checkpoint directory (config.json + safetensors or .bin)")
    p.add_argument("dst", help="output directory (written to a temporary directory, then renamed)")
    p.add_argument("--plan", required=True, help="sharing plan: e.g. mlkv-6, 6x1, 4x12, mqa, gqa-48, cla-2, 0,0,2,2")
    p.add_argument("--init", default=DEFAULT_INIT, choices=INITS,
                   help=f"how a producer's K/V combine the layers it serves (default {DEFAULT_INIT}, the best "
                        "measured: see docs/results)")
    p.add_argument("--keep-params", action="store_true", help="widen MLPs to keep the parameter count")
    p.add_argument("--seed", type=int, default=0, help="seed for the new MLP neurons of --keep-params")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


# ---- generate -------------------------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    """Continue prompts with a checkpoint, using its tokenizer. --engine hf uses transformers' generate(); --engine
    fast uses mlkv's static-cache engine (CUDA-graph decode on GPU)."""
    import torch

    from mlkv.evaluation.evaluate import load_model

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("give at least one --prompt or a --prompts-file")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(args.model, device, args.dtype, args.tokenizer)
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
    """Left-padded batch through transformers' ``generate()``; returns the new tokens of each prompt."""
    import torch

    torch.manual_seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
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


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="mlkv (or any transformers causal LM) checkpoint directory")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a file with one prompt per line")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["hf", "fast"], default="hf")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, the checkpoint's dtype on GPU")


# ---- commands that live in their own modules ------------------------------------------------------------------------
# name -> (module, function adding the arguments, function running the command)
MODULE_COMMANDS = {
    "train": ("mlkv.training.loop", "add_train_arguments", "run_train_command"),
    "eval": ("mlkv.evaluation.evaluate", "add_eval_arguments", "run_eval_command"),
    "bench": ("mlkv.inference.bench.run", "add_bench_arguments", "run_bench_command"),
    "reproduce": ("mlkv.reproduce.pipeline", "add_reproduce_arguments", "run_reproduce_command"),
}
LOCAL_COMMANDS = {"plan": (_plan_args, cmd_plan), "convert": (_convert_args, cmd_convert),
                  "generate": (_generate_args, cmd_generate)}


def _doc(fn) -> str:
    return (fn.__doc__ or "").strip()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, run) in LOCAL_COMMANDS.items():
        p = sub.add_parser(name, help=_doc(run).split(".")[0], description=_doc(run))
        add(p)
        p.set_defaults(func=run)
    for name, (module, add_name, run_name) in MODULE_COMMANDS.items():
        if only not in (None, name):  # import heavy modules only for the command being run
            sub.add_parser(name, help=f"see: mlkv {name} --help")
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        run = getattr(mod, run_name)
        p = sub.add_parser(name, help=_doc(run).split(".")[0], description=_doc(run))
        getattr(mod, add_name)(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in MODULE_COMMANDS else "")
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"mlkv {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
