"""Several GPUs on one host: DDP and FSDP2 over NCCL, checked for exact gradients, then timed.

1. Gradients. One optimizer step in fp32 (TF32 off) of the Pythia-160M shape with a plan of L/2 producer layers x 1
   KV head (MLKV-6 on 12 layers, so shared K/V gradients cross the consumers), seq 512: N ranks x 2 sequences against
   one process with the same 2N sequences on one GPU. Reports the largest absolute and relative gradient difference
   over all parameters, and the loss of each.
2. Throughput. Pythia-160M shape (MHA), seq 2048, bf16 autocast, compiled, random tokens, the same global batch of
   16 x N sequences per step everywhere: N GPUs with DDP and with FSDP2 (micro-batch 16 per GPU, launched with
   ``torchrun`` exactly as users do) against one GPU taking all 16 x N sequences as one micro-batch (so more than
   2 GPUs need a card that holds micro-batch 16 x N). Reports tokens/s and the scaling efficiency (tokens/s of N
   GPUs over N x one GPU's).

    python benchmarks/ddp_nccl.py --out benchmarks/results/ddp_nccl_h200x2/ddp_nccl.json  # a host with >= 2 GPUs
    python benchmarks/ddp_nccl.py --device cpu --preset tiny-neox --out /tmp/d.json  # code path only (gloo)

Every run is a separate process (``torchrun`` for the several-GPU ones); this file is also their worker
(``--worker``). Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from report import finish  # noqa: E402
from mlkv import preset_config  # noqa: E402
from mlkv.data import PackedDataset  # noqa: E402
from mlkv.training import TrainConfig, TrainHooks, train  # noqa: E402

GRAD = {"plan": "half-layers x 1", "seq_len": 512, "per_rank": 2, "precision": "fp32"}
SPEED = {"plan": None, "seq_len": 2048, "per_rank": 16, "precision": "auto", "steps": 30, "warmup": 10}


def worker(role: str, layout: str, world: int, out: Path, preset: str, device: str) -> None:
    """One run: ``role`` grad or speed, ``layout`` single/ddp/fsdp; rank 0 writes ``out``."""
    spec = GRAD if role == "grad" else SPEED
    steps = 1 if role == "grad" else spec["steps"]
    batch = spec["per_rank"] * (world if layout == "single" else 1)  # single: the whole global batch at once
    shape = preset_config(preset)
    plan = f"{shape.num_hidden_layers // 2}x1" if role == "grad" else None
    vocab = shape.vocab_size
    tokens = np.random.default_rng(0).integers(0, vocab, size=(steps * spec["per_rank"] * world + 1) * spec["seq_len"])
    dataset = PackedDataset(tokens, spec["seq_len"], seed=0)
    rank = int(os.environ.get("RANK", "0"))
    run_dir = out.with_suffix("")  # shared by the ranks, like a real --out
    run_dir.mkdir(exist_ok=True)
    config = run_dir / f"config_{rank}.json"  # one per rank: no rank waits for another's file
    preset_config(preset, max_position_embeddings=2048).to_json_file(config)
    cfg = TrainConfig(model=str(config), plan=plan, out=str(run_dir / "run"), seq_len=spec["seq_len"],
                      micro_batch_size=batch, steps=steps, precision=spec["precision"],
                      compile=role == "speed" and device == "cuda", fsdp=layout == "fsdp", device=device,
                      log_every=max(steps, 1), eval_every=0, save_every=0, progress=False, tensorboard=False)
    grads = {}

    def grab(step, model):
        for name, p in model.named_parameters():  # full_tensor() is a collective: every rank calls it
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.removeprefix("module.")] = g.detach().double().cpu()

    hooks = TrainHooks(after_backward=grab if role == "grad" else None)
    summary = train(cfg, datasets=(dataset, None), hooks=hooks)
    if rank != 0:
        return
    if role == "grad":
        torch.save(grads, out.with_suffix(".pt"))
    times = summary["step_seconds"][SPEED["warmup"]:] if role == "speed" else summary["step_seconds"]
    record = {"layout": layout, "world": world if layout != "single" else 1, "first_loss": summary["losses"][0],
              "last_loss": summary["losses"][-1],
              "tokens_per_step": summary["tokens_per_step"],
              "tokens_per_s": summary["tokens_per_step"] * len(times) / sum(times),
              "step_ms": 1e3 * sum(times) / len(times),
              "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0}
    out.write_text(json.dumps(record))


def launch(role: str, layout: str, world: int, tmp: Path, preset: str, device: str) -> dict:
    out = tmp / f"{role}_{layout}.json"
    args = [str(Path(__file__).resolve()), "--worker", role, layout, str(world), str(out), preset, device]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    if layout == "single":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *args]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def compare(tmp: Path, layout: str) -> dict:
    ref = torch.load(tmp / "grad_single.pt", weights_only=True)
    got = torch.load(tmp / f"grad_{layout}.pt", weights_only=True)
    if ref.keys() != got.keys():
        raise SystemExit(f"{layout}: parameter names differ: {sorted(ref.keys() ^ got.keys())[:5]}")
    abs_diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
    scale = max(ref[k].abs().max().item() for k in ref)
    rel = max(((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)).item() for k in ref)
    return {"max_abs_diff": abs_diff, "max_abs_grad": scale, "max_rel_norm_diff": rel}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, help="processes (default: every visible GPU; 2 on CPU)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: gloo, a code-path check")
    parser.add_argument("--preset", default="pythia-160m", help="model shape")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ddp_nccl.json")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        role, layout, world, out, preset, device = args.worker
        return worker(role, layout, int(world), Path(out), preset, device)
    args.gpus = args.gpus or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if args.gpus < 2:
        raise SystemExit(f"need at least 2 GPUs, found {args.gpus}")
    cuda = args.device == "cuda"
    report = {"benchmark": "ddp_nccl", "device": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": args.gpus,
              "torch": torch.__version__, "preset": args.preset,
              "backend": "nccl " + ".".join(map(str, torch.cuda.nccl.version())) if cuda else "gloo",
              "gradient_check": dict(GRAD, global_batch=GRAD["per_rank"] * args.gpus), "grad": {}, "speed": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        single = launch("grad", "single", args.gpus, tmp, args.preset, args.device)
        for layout in ("ddp", "fsdp"):
            run = launch("grad", layout, args.gpus, tmp, args.preset, args.device)
            report["grad"][layout] = {**compare(tmp, layout), "loss": run["first_loss"],
                                    "loss_single": single["first_loss"]}
        if not args.skip_speed:
            report["speed_settings"] = SPEED
            for layout in ("single", "ddp", "fsdp"):
                report["speed"][layout] = launch("speed", layout, args.gpus, tmp, args.preset, args.device)
            base = report["speed"]["single"]["tokens_per_s"]
            for layout in ("ddp", "fsdp"):
                speed = report["speed"][layout]
                speed["scaling_efficiency"] = speed["tokens_per_s"] / (args.gpus * base)

    print(f"\n{report['device']} x{args.gpus}, {report['backend']}, {args.preset}")
    print(f"{'gradients vs 1 GPU':<20} {'max |dg|':>10} {'max |g|':>10} {'rel (norm)':>11} {'loss':>10} "
          f"{'loss 1 GPU':>11}")
    for layout, r in report["grad"].items():
        print(f"{layout:<20} {r['max_abs_diff']:>10.2e} {r['max_abs_grad']:>10.2e} {r['max_rel_norm_diff']:>11.2e} "
              f"{r['loss']:>10.6f} {r['loss_single']:>11.6f}")
    if report["speed"]:
        print(f"\n{'throughput':<20} {'GPUs':>5} {'tokens/s':>12} {'step ms':>9} {'scaling':>8} {'GiB':>6}")
        for layout, r in report["speed"].items():
            print(f"{layout:<20} {r['world']:>5} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>9.1f} "
                  f"{r.get('scaling_efficiency', 1.0):>8.1%} {r['max_memory_gib']:>6.1f}")
    return finish(report, args.out)


if __name__ == "__main__":
    main()
