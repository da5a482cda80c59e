"""What a run executes on: processes and devices, seeding, DDP/FSDP wrapping, the optimizer and its schedule,
mixed precision and the attention kernel, and the signals that stop a run.

* AdamW (``fused=True`` on CUDA). Weight decay applies to every parameter with 2 or more dimensions: the weight
  matrices, the token embedding and the output projection, as HF's Trainer (the paper's setup) and nanoGPT do;
  biases and norm gains (1-D) are not decayed.
* Learning rate: linear warmup over ``ceil(warmup_ratio * steps)`` steps (step ``s`` of the warmup uses
  ``lr * (s + 1) / warmup``; HF starts at 0), then cosine decay to ``min_lr_ratio * lr`` at the last step. The
  default ``min_lr_ratio=0.1`` is the common practice for pretraining (Chinchilla, Pythia); ``--min-lr-ratio 0``
  is HF Trainer's ``cosine`` schedule.
* bf16 autocast on CUDA with fp32 master weights (fp32 on CPU unless ``--precision bf16``).

Several GPUs: under ``torchrun`` the model is wrapped in DDP (or FSDP2 ``fully_shard`` with ``--fsdp``: each
decoder layer one unit, embeddings/final norm/output projection in the root unit); rank ``r`` of ``W`` reads the
``r``-th contiguous slice of each global batch (``PackedDataset.batches``), so the gradients equal those of one
process on the concatenated batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mlkv.training.config import TrainConfig
from mlkv.training.loss import LossModel, decoder_layers

logger = logging.getLogger(__name__)

__all__ = ["Dist", "setup_distributed", "seed_all", "make_optimizer", "WarmupCosine", "wrap_model",
           "autocast_dtype", "autocast_context", "gradient_sync", "StopRequest", "stop_on_signals"]


# ---- distributed ----------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place among the training processes (one unless run under ``torchrun``)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created_group: bool = False  # the run set up the process group, so it tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def setup_distributed(cfg: TrainConfig) -> tuple[Dist, torch.device]:
    """Join (or create) the process group under ``torchrun``, pick this rank's device, set TF32 by ``--precision``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = Dist()
    use_cuda = torch.cuda.is_available() and (cfg.device is None or cfg.device.startswith("cuda"))
    if world > 1 or dist.is_initialized():
        if not dist.is_initialized():
            local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))  # the GPU set_device picks below
            dist.init_process_group(backend="nccl" if use_cuda else "gloo",  # pinned: no NCCL guess, no hang
                                    device_id=torch.device("cuda", local) if use_cuda else None)
            ctx.created_group = True
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        ctx.local_rank = int(os.environ.get("LOCAL_RANK", ctx.rank))
    device = torch.device(cfg.device) if cfg.device else torch.device("cuda" if use_cuda else "cpu")
    if device.type == "cuda" and (device.index is None or ctx.world > 1):
        device = torch.device("cuda", ctx.local_rank)  # one GPU per rank
    if device.type == "cuda":
        torch.cuda.set_device(device)
        tf32 = cfg.precision != "fp32"  # --precision fp32 means fp32 matmuls, not TF32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return ctx, device


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def wrap_model(loss_model: LossModel, cfg: TrainConfig, ctx: Dist, device: torch.device) -> tuple[nn.Module, bool]:
    """``(step_fn, fsdp)``: the module a step calls (``loss_model``, FSDP-sharded in place, or in DDP) and whether
    it is sharded; ``--compile`` (default on CUDA) compiles the layers after wrapping."""
    if cfg.fsdp and ctx.world == 1:
        logger.warning("--fsdp needs several processes (torchrun); training one unsharded copy")
    fsdp = cfg.fsdp and ctx.world > 1
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (ctx.world,))
        mp = MixedPrecisionPolicy()
        if autocast_dtype(cfg.precision, device) == torch.bfloat16 and device.type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in decoder_layers(loss_model.model):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(loss_model, mesh=mesh, mp_policy=mp)  # root unit: embeddings, final norm, output projection
        step_fn = loss_model
    elif ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_fn = DDP(loss_model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        step_fn = loss_model
    if compile_enabled(cfg.compile, device):
        loss_model.compile_layers()
    return step_fn, fsdp


def compile_enabled(flag: bool | None, device: torch.device) -> bool:
    """``--compile`` as given, else on CUDA only: compiled layers fuse the chains of small elementwise kernels
    (norms, rotary, activations) that dominate thin shapes (benchmarks/train_throughput.py measures both ways); on
    a CPU the compile time outweighs the short runs made there."""
    return flag if flag is not None else device.type == "cuda"


def gradient_sync(step_fn: nn.Module, fsdp: bool, world: int, last_micro: bool) -> contextlib.AbstractContextManager:
    """No gradient all-reduce on accumulation micro-steps but the last."""
    if fsdp:
        step_fn.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()
    if world > 1 and not last_micro:
        return step_fn.no_sync()
    return contextlib.nullcontext()


# ---- optimizer and schedule -----------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on parameters with >= 2 dimensions only (matrices and embeddings, not biases/norms)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             fused=True if device.type == "cuda" else None)


class WarmupCosine:
    """LR multiplier for optimizer step ``s`` (0-based): linear warmup, then cosine to ``min_ratio``."""

    def __init__(self, total_steps: int, warmup_ratio: float, min_ratio: float):
        self.total = total_steps
        self.warmup = math.ceil(warmup_ratio * total_steps)
        self.min_ratio = min_ratio

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        decay_steps = max(1, self.total - 1 - self.warmup)
        progress = min(1.0, (s - self.warmup) / decay_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- precision and attention kernel ---------------------------------------------------------------------------------
def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 under ``--precision bf16``, and under ``auto`` on CUDA; else no autocast."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _attention_context(choice: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """Prefer one SDPA kernel on CUDA (the others stay as fallbacks); read when the step is traced/compiled."""
    if device.type != "cuda" or choice == "auto":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    order = [kinds[choice]] + [kind for name, kind in kinds.items() if name != choice]
    return lambda: sdpa_kernel(order, set_priority=True)


def autocast_context(cfg: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A fresh context for each forward: mixed precision (if any) and the SDPA kernel preference."""
    amp_dtype = autocast_dtype(cfg.precision, device)
    attention = _attention_context(cfg.sdpa_backend, device)

    @contextlib.contextmanager
    def autocast() -> Iterator[None]:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None), attention():
            yield

    return autocast


# ---- signals --------------------------------------------------------------------------------------------------------
@dataclass
class StopRequest:
    """The signal that asked the run to stop, if any."""

    signum: int | None = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGTERM/SIGINT ask for a checkpoint after the step in flight; a second signal stops at once."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.signum is not None:
            signal.signal(signum, previous[signum])
            raise KeyboardInterrupt(f"second signal {signum}")
        request.signum = signum
        logger.warning("signal %d: saving a checkpoint after the current step", signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
