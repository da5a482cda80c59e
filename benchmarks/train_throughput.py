"""Training throughput: mlkv's loop vs transformers' ``Trainer``, Pythia-160M shape, seq 2048, bf16, one GPU.

Both sides train the same shape on the same random tokens (uniform ids; throughput does not depend on the text)
with the same recipe (AdamW fused 0.9/0.95, lr 6e-4, cosine, warmup 0.2, wd 0.01, clip 1.0, bf16 autocast, SDPA
attention, the same micro-batch): ours is ``mlkv.training.train`` on ``MLKVForCausalLM`` (preset ``pythia-160m``,
MHA plan), compiled with ``torch.compile``; the baseline is ``Trainer`` on ``GPTNeoXForCausalLM`` with its defaults
(no compile unless ``--hf-compile``). The MFU denominator is this card's own bf16 matmul rate, measured in the same
call (8192^3, mean of 10 after 3 warm-ups). Model FLOPs per token: ``6 * N + 12 * L * d_attn * T`` with ``N`` the
parameters in matrix products (all but the input embedding; ``mlkv.training.model_flops_per_token``); the JSON also
gives ``mfu_kaplan`` with ``N`` = non-embedding parameters only (no output projection).

    python benchmarks/train_throughput.py                      # GPU, ~3-5 minutes
    python benchmarks/train_throughput.py --quick --device cpu  # tiny shape on CPU (< 1 minute), code path only

GPU runs write ``benchmarks/results/train_throughput.json``, CPU runs ``train_throughput_cpu.json``.

Prints a table, writes the JSON report and ends with it on one line.
"""

from __future__ import annotations

import argparse
import gc
import inspect
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


def run_ours(args, device, shape: dict, peak: float) -> dict:
    from transformers import AutoModelForCausalLM

    from mlkv import preset_config

    tokens = random_tokens(shape["vocab_size"], args.steps * args.micro_batch + 1, args.seq_len)
    dataset = PackedDataset(tokens, args.seq_len, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.json"
        preset_config(args.preset, **({"max_position_embeddings": max(args.seq_len, 128)})).to_json_file(config_path)
        cfg = TrainConfig(model=str(config_path), out=str(Path(tmp) / "run"), seq_len=args.seq_len,
                          micro_batch_size=args.micro_batch, steps=args.steps, compile=args.compile,
                          sdpa_backend=args.sdpa_backend,
                          device=str(device), log_every=args.steps, eval_every=0, save_every=0, progress=False,
                          tensorboard=False, peak_tflops=peak / 1e12)
        summary = train(cfg, datasets=(dataset, None), hooks=profiler_hooks(args, device))
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "run")
    times = summary["step_seconds"][args.warmup:]
    tokens_per_step = summary["tokens_per_step"]
    result = {"tokens_per_s": tokens_per_step * len(times) / sum(times), "step_ms": 1e3 * sum(times) / len(times),
              "compile": args.compile, "sdpa_backend": args.sdpa_backend, "first_step_s": summary["step_seconds"][0],
              "flops_per_token": summary["flops_per_token"],
              "flops_per_token_kaplan": kaplan_flops_per_token(model, args.seq_len),
              "final_loss": summary["final_loss"], "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def run_hf(args, device, shape: dict) -> dict:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainerCallback, TrainingArguments

    rotary = shape.get("rope_parameters", {}).get("partial_rotary_factor", 0.25)
    config = GPTNeoXConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                           num_hidden_layers=shape["num_hidden_layers"],
                           num_attention_heads=shape["num_attention_heads"],
                           intermediate_size=shape["intermediate_size"], rotary_pct=rotary,
                           max_position_embeddings=max(args.seq_len, 128), tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    tokens = torch.from_numpy(random_tokens(shape["vocab_size"], args.steps * args.micro_batch, args.seq_len, 1))
    tokens = tokens.view(-1, args.seq_len)

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
    tokens_per_step = args.micro_batch * args.seq_len
    seconds = Timer.end - Timer.start
    result = {"tokens_per_s": tokens_per_step * (args.steps - args.warmup) / seconds,
              "step_ms": 1e3 * seconds / (args.steps - args.warmup), "compile": args.hf_compile,
              "sdpa_backend": "PyTorch default",
              "flops_per_token": model_flops_per_token(model, args.seq_len),
              "flops_per_token_kaplan": kaplan_flops_per_token(model, args.seq_len),
              "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer steps (and a tiny shape on CPU)")
    parser.add_argument("--preset", help="model shape (default pythia-160m; tiny-neox with --quick on CPU)")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--micro-batch", type=int, help="sequences per step, both sides (default 16 on GPU)")
    parser.add_argument("--steps", type=int, help="optimizer steps per side (default 40; 16 with --quick)")
    parser.add_argument("--warmup", type=int, help="steps left out of the timing (default 10; 4 with --quick)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None)
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
    args.seq_len = args.seq_len or (128 if cpu_quick else 2048)
    args.micro_batch = args.micro_batch or (4 if device.type == "cpu" else 16)
    args.steps = args.steps or (16 if args.quick else 40)
    args.warmup = args.warmup if args.warmup is not None else (4 if args.quick else 10)
    args.compile = args.compile if args.compile is not None else device.type == "cuda"
    if not 0 <= args.warmup < args.steps or args.warmup + args.profile > args.steps:
        parser.error("need --warmup < --steps and --warmup + --profile <= --steps")
    args.out = args.out or (RESULTS if device.type == "cuda" else RESULTS.with_name(RESULTS.stem + "_cpu.json"))
    shape = PRESETS[args.preset]

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = measure_matmul(device, args.quick)
    print(f"{card}: matmul {peak / 1e12:.4g} TFLOP/s ({'bf16 8192^3' if device.type == 'cuda' else 'fp32'})",
          flush=True)
    results = {"ours": run_ours(args, device, shape, peak)}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if not args.skip_hf:
        results["hf_trainer"] = run_hf(args, device, shape)
    for r in results.values():
        r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak
        r["mfu_kaplan"] = r["flops_per_token_kaplan"] * r["tokens_per_s"] / peak

    report = {"benchmark": "train_throughput", "device": card, "torch": torch.__version__,
              "matmul_tflops": peak / 1e12, "preset": args.preset, "seq_len": args.seq_len,
              "micro_batch": args.micro_batch, "tokens_per_step": args.micro_batch * args.seq_len,
              "steps": args.steps, "timed_steps": args.steps - args.warmup,
              "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
              "data": "random uniform token ids", **results}
    if "hf_trainer" in results:
        report["speedup_vs_hf"] = results["ours"]["tokens_per_s"] / results["hf_trainer"]["tokens_per_s"]
    report["targets"] = {"mfu>=0.50": results["ours"]["mfu"] >= 0.5,
                         "speedup>=1.3": report.get("speedup_vs_hf", 0.0) >= 1.3}

    print(f"\n{args.preset}, seq {args.seq_len}, micro-batch {args.micro_batch}, "
          f"{args.steps - args.warmup} timed steps of {args.steps}, random tokens, {report['precision']}")
    print(f"{'':<12} {'tokens/s':>12} {'step ms':>9} {'MFU':>7} {'MFU (6N non-emb)':>17} {'compile':>8}")
    for name, r in results.items():
        print(f"{name:<12} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>9.1f} {r['mfu']:>7.1%} {r['mfu_kaplan']:>17.1%} "
              f"{str(r['compile']):>8}")
    if "speedup_vs_hf" in report:
        print(f"speedup vs HF Trainer: {report['speedup_vs_hf']:.2f}x")
    return finish(report, args.out)


if __name__ == "__main__":
    main()
