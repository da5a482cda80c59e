"""Training throughput: mlkv's loop vs transformers' ``Trainer``, bf16, one GPU, for one shape and several variants.

Both sides train the same shape on the same random tokens (uniform ids; throughput does not depend on the text)
with the same recipe (AdamW fused 0.9/0.95, lr 6e-4, cosine, warmup 0.2, wd 0.01, clip 1.0, bf16 autocast, SDPA
attention, the same micro-batch): ours is ``mlkv.training.train`` on ``MLKVForCausalLM`` (``--preset``, default
``pythia-160m``; ``smollm2-135m`` is SmolLM2's Llama shape), once per ``--variants`` entry (``VARIANTS``: eager or
compiled, ``lm`` or ``distill`` from a teacher of the preset's own shape, the loss in chunks, whole or fused by
liger-kernel); the baseline
is ``Trainer`` on transformers' own model of the shape (``GPTNeoXForCausalLM`` or ``LlamaForCausalLM``) with its
defaults (no compile unless ``--hf-compile``). ``--seq-lens`` repeats everything per sequence length. The MFU denominator is this card's own bf16 matmul rate, measured in the same
call (8192^3, mean of 10 after 3 warm-ups). Model FLOPs per token: ``6 * N + 12 * L * d_attn * T`` with ``N`` the
parameters in matrix products (all but the input embedding; ``mlkv.training.model_flops_per_token``); the JSON also
gives ``mfu_kaplan`` with ``N`` = non-embedding parameters only (no output projection).

    python benchmarks/train_throughput.py                      # GPU, Pythia-160M, ~3-5 minutes
    python benchmarks/train_throughput.py --preset smollm2-135m --seq-lens 1024 2048 --micro-batch 32 \
        --variants eager compile compile-chunked compile-liger distill-eager distill --plan 6x1   # SmolLM2 (issue 20)
    python benchmarks/train_throughput.py --quick --device cpu  # tiny shape on CPU (< 1 minute), code path only

GPU runs write ``benchmarks/results/train_throughput.json``, CPU runs ``train_throughput_cpu.json``.

Prints a table, writes the JSON report and ends with it on one line.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import finish  # noqa: E402
from mlkv import PRESETS  # noqa: E402
from mlkv.data import PackedDataset  # noqa: E402
from mlkv.training import TrainConfig, TrainHooks, model_flops_per_token, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"  # CPU runs: train_throughput_cpu.json


def measure_matmul(device: torch.device, quick: bool) -> float:
    """FLOP/s of a square matmul: bf16 8192^3 on CUDA, fp32 (512 or 2048)^3 on CPU."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 10
    else:
        n, dtype, reps = (512 if quick else 2048), torch.float32, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def kaplan_flops_per_token(model, seq_len: int) -> float:
    """``6 * N_non_embedding + 12 * L * d_attn * T`` (input and output embeddings both excluded)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    out = model.get_output_embeddings()
    if out is not None and out.weight is not model.get_input_embeddings().weight:
        n -= out.weight.numel()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 6.0 * n + 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq_len


def random_tokens(vocab: int, sequences: int, seq_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=sequences * seq_len, dtype=np.int64)


def profiler_hooks(args, device) -> TrainHooks | None:
    """``--profile N``: a torch.profiler kernel table of N steps after the warm-up steps."""
    if not args.profile:
        return None
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)

    def after_step(step, model):
        if step == args.warmup:
            prof.start()
        elif step == args.warmup + args.profile:
            if device.type == "cuda":
                torch.cuda.synchronize()
            prof.stop()
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70), flush=True)

    return TrainHooks(after_step=after_step)


#: Our side's variants: TrainConfig fields per name. ``distill`` trains the ``--plan`` student against a teacher of
#: the preset's shape (KL + hidden-state distance, the defaults), the way ``mlkv reproduce`` distils a conversion.
VARIANTS: dict[str, dict] = {
    "eager": dict(compile=False),
    "compile": dict(compile=True),
    "compile-chunked": dict(compile=True, loss_chunk_tokens=8192),
    "compile-liger": dict(compile=True, lm_loss="liger"),  # liger-kernel's fused linear cross-entropy (CUDA)
    "distill-eager": dict(compile=False, objective="distill"),
    "distill": dict(compile=True, objective="distill"),
    "distill-whole": dict(compile=True, objective="distill", loss_chunk_tokens=0),
}


def save_teacher(config, folder: Path) -> str:
    """A random model of the preset's own shape (no sharing), saved as safetensors, as the distillation teacher."""
    from mlkv import MLKVForCausalLM

    torch.manual_seed(1)
    MLKVForCausalLM(config).save_pretrained(folder)
    return str(folder)


def run_ours(args, device, shape: dict, peak: float, seq_len: int, variant: str) -> dict:
    from transformers import AutoModelForCausalLM

    from mlkv import preset_config

    tokens = random_tokens(shape["vocab_size"], args.steps * args.micro_batch + 1, seq_len)
    dataset = PackedDataset(tokens, seq_len, seed=0)
    fields = dict(VARIANTS[variant])
    with tempfile.TemporaryDirectory() as tmp:
        config = preset_config(args.preset, max_position_embeddings=max(seq_len, 128))
        if fields.get("objective") == "distill":
            fields["teacher"] = save_teacher(config, Path(tmp) / "teacher")
        student = config.with_plan(args.plan) if args.plan and fields.get("objective") == "distill" else config
        config_path = Path(tmp) / "config.json"
        student.to_json_file(config_path)
        cfg = TrainConfig(model=str(config_path), out=str(Path(tmp) / "run"), seq_len=seq_len,
                          micro_batch_size=args.micro_batch, steps=args.steps, sdpa_backend=args.sdpa_backend,
                          device=str(device), log_every=args.steps, eval_every=0, save_every=0, progress=False,
                          tensorboard=False, peak_tflops=peak / 1e12, **fields)
        summary = train(cfg, datasets=(dataset, None), hooks=profiler_hooks(args, device))
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "run")
    times = summary["step_seconds"][args.warmup:]
    tokens_per_step = summary["tokens_per_step"]
    result = {"variant": variant, "seq_len": seq_len, "tokens_per_s": tokens_per_step * len(times) / sum(times),
              "step_ms": 1e3 * sum(times) / len(times), "compile": cfg.compile, "objective": cfg.objective,
              "plan": args.plan if fields.get("objective") == "distill" else None,
              "loss_chunk_tokens": cfg.loss_chunk_tokens, "lm_loss": cfg.lm_loss, "sdpa_backend": args.sdpa_backend,
              "first_step_s": summary["step_seconds"][0], "flops_per_token": summary["flops_per_token"],
              "flops_per_token_kaplan": kaplan_flops_per_token(model, seq_len),
              "final_loss": summary["final_loss"], "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def hf_model(shape: dict, seq_len: int):
    """transformers' own model of the preset's shape, random init (seed 0), SDPA attention."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                  num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
                  intermediate_size=shape["intermediate_size"], max_position_embeddings=max(seq_len, 128),
                  tie_word_embeddings=shape.get("tie_word_embeddings", False))
    rope = shape.get("rope_parameters", {})
    if shape["flavor"] == "llama":
        config = LlamaConfig(num_key_value_heads=shape.get("num_key_value_heads", shape["num_attention_heads"]),
                             rms_norm_eps=shape.get("norm_eps", 1e-5),
                             rope_parameters={"rope_type": "default", "rope_theta": rope.get("rope_theta", 1e4)},
                             **common)
        cls = LlamaForCausalLM
    else:
        config = GPTNeoXConfig(rotary_pct=rope.get("partial_rotary_factor", 0.25), **common)
        cls = GPTNeoXForCausalLM
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(config)


def run_hf(args, device, shape: dict, seq_len: int) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = hf_model(shape, seq_len)
    tokens = torch.from_numpy(random_tokens(shape["vocab_size"], args.steps * args.micro_batch, seq_len, 1))
    tokens = tokens.view(-1, seq_len)  # (sequences, T)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(tokens)

        def __getitem__(self, i):
            return {"input_ids": tokens[i], "labels": tokens[i]}

    class Timer(TrainerCallback):
        start = end = None

        def on_step_end(self, targs, state, control, **kw):
            if state.global_step in (args.warmup, args.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if state.global_step == args.warmup:
                    Timer.start = time.perf_counter()
                else:
                    Timer.end = time.perf_counter()

    params = inspect.signature(TrainingArguments.__init__).parameters
    warmup = {"warmup_ratio": 0.2} if "warmup_ratio" in params else {"warmup_steps": 0.2}
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.micro_batch, max_steps=args.steps, learning_rate=6e-4,
            weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, lr_scheduler_type="cosine",
            max_grad_norm=1.0, bf16=device.type == "cuda", use_cpu=device.type != "cuda",
            optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch", torch_compile=args.hf_compile,
            logging_steps=args.steps, save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, seed=0, **warmup)
        trainer = Trainer(model=model, args=targs, train_dataset=Data(), callbacks=[Timer()])
        trainer.train()
    tokens_per_step = args.micro_batch * seq_len
    seconds = Timer.end - Timer.start
    result = {"variant": "hf_trainer", "seq_len": seq_len,
              "tokens_per_s": tokens_per_step * (args.steps - args.warmup) / seconds,
              "step_ms": 1e3 * seconds / (args.steps - args.warmup), "compile": args.hf_compile, "objective": "lm",
              "sdpa_backend": "PyTorch default", "flops_per_token": model_flops_per_token(model, seq_len),
              "flops_per_token_kaplan": kaplan_flops_per_token(model, seq_len),
              "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def fresh_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_all(args, device, shape: dict, peak: float) -> list[dict]:
    """Every variant (and the Trainer baseline) at every sequence length; a failed variant is recorded, not fatal."""
    rows = []
    for seq_len in args.seq_lens:
        jobs = [(v, lambda v=v: run_ours(args, device, shape, peak, seq_len, v)) for v in args.variants]
        if not args.skip_hf:
            jobs.append(("hf_trainer", lambda: run_hf(args, device, shape, seq_len)))
        for name, job in jobs:
            fresh_memory(device)
            try:
                row = job()
            except Exception as exc:  # noqa: BLE001 - one variant's failure (e.g. out of memory) must not lose the rest
                row = {"variant": name, "seq_len": seq_len, "error": f"{type(exc).__name__}: {exc}"[:500]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for r in rows:
        if "tokens_per_s" in r:
            r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak
            r["mfu_kaplan"] = r["flops_per_token_kaplan"] * r["tokens_per_s"] / peak
    return rows


def ratios(rows: list[dict]) -> dict:
    """Per sequence length: each variant's tokens/s over the Trainer's and over eager lm, and distill over lm."""
    out = {}
    for seq_len in sorted({r["seq_len"] for r in rows}):
        by = {r["variant"]: r.get("tokens_per_s") for r in rows if r["seq_len"] == seq_len}
        entry = {}
        for name, tps in by.items():
            if tps and by.get("hf_trainer") and name != "hf_trainer":
                entry[f"{name}_vs_hf"] = tps / by["hf_trainer"]
        # Time per token of the first over the second: distill's cost against lm, and eager's against compiled.
        for slow, fast in (("distill", "compile"), ("distill-eager", "eager"), ("eager", "compile")):
            if by.get(slow) and by.get(fast):
                entry[f"{slow}_time_per_token_vs_{fast}"] = by[fast] / by[slow]
        out[str(seq_len)] = entry
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer steps (and a tiny shape on CPU)")
    parser.add_argument("--preset", help="model shape (default pythia-160m; tiny-neox with --quick on CPU)")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths (default 2048; 128 with --quick on CPU)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="our side's variants (default: compile "
                        "on CUDA, eager on CPU)")
    parser.add_argument("--plan", help="the distill variants' student plan, e.g. 6x1 (default: the preset's own)")
    parser.add_argument("--micro-batch", type=int, help="sequences per step, both sides (default 16 on GPU)")
    parser.add_argument("--steps", type=int, help="optimizer steps per side (default 40; 16 with --quick)")
    parser.add_argument("--warmup", type=int, help="steps left out of the timing (default 10; 4 with --quick)")
    parser.add_argument("--hf-compile", action="store_true", help="also torch.compile the HF Trainer side")
    parser.add_argument("--sdpa-backend", default="auto", help="our side's preferred SDPA kernel (mlkv.training)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print a profiler table of N of our steps after the warm-up")
    parser.add_argument("--out", type=Path, help=f"JSON report (default {RESULTS}, *_cpu.json on CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cpu_quick = device.type == "cpu" and args.quick
    args.preset = args.preset or ("tiny-neox" if cpu_quick else "pythia-160m")
    args.seq_lens = args.seq_lens or [128 if cpu_quick else 2048]
    args.variants = args.variants or (["compile"] if device.type == "cuda" else ["eager"])
    args.micro_batch = args.micro_batch or (4 if device.type == "cpu" else 16)
    args.steps = args.steps or (16 if args.quick else 40)
    args.warmup = args.warmup if args.warmup is not None else (4 if args.quick else 10)
    if not 0 <= args.warmup < args.steps or args.warmup + args.profile > args.steps:
        parser.error("need --warmup < --steps and --warmup + --profile <= --steps")
    args.out = args.out or (RESULTS if device.type == "cuda" else RESULTS.with_name(RESULTS.stem + "_cpu.json"))
    shape = PRESETS[args.preset]

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = measure_matmul(device, args.quick)
    print(f"{card}: matmul {peak / 1e12:.4g} TFLOP/s ({'bf16 8192^3' if device.type == 'cuda' else 'fp32'})",
          flush=True)
    rows = run_all(args, device, shape, peak)
    report = {"benchmark": "train_throughput", "device": card, "torch": torch.__version__,
              "matmul_tflops": peak / 1e12, "preset": args.preset, "micro_batch": args.micro_batch,
              "steps": args.steps, "timed_steps": args.steps - args.warmup, "plan": args.plan,
              "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
              "data": "random uniform token ids", "runs": rows, "ratios": ratios(rows)}
    print(f"\n{args.preset}, micro-batch {args.micro_batch}, {args.steps - args.warmup} timed steps of {args.steps}, "
          f"random tokens, {report['precision']}, {card}")
    print(f"{'variant':<16} {'seq':>5} {'tokens/s':>12} {'step ms':>9} {'MFU':>7} {'MFU (6N non-emb)':>17} "
          f"{'mem GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<16} {r['seq_len']:>5} failed: {r['error'][:80]}")
            continue
        print(f"{r['variant']:<16} {r['seq_len']:>5} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>9.1f} {r['mfu']:>7.1%} "
              f"{r['mfu_kaplan']:>17.1%} {r.get('max_memory_gib', 0):>8.1f}")
    for seq_len, entry in report["ratios"].items():
        print(f"seq {seq_len}: " + ", ".join(f"{k} {v:.2f}x" for k, v in entry.items()))
    return finish(report, args.out)


if __name__ == "__main__":
    main()
