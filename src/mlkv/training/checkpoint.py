"""A run's checkpoint: written, found and read back for ``--resume``, with every rank's RNG state.

Output folder (``--out``)::

    metrics.jsonl          one JSON object per logged step and per evaluation
    tensorboard/           if the ``tensorboard`` package is installed
    checkpoint/            the last good checkpoint: config.json + model.safetensors (save_pretrained), tokenizer
                           and generation files, optimizer.pt (optimizer + scheduler), rng_rank{r}.pt (python, numpy,
                           torch, cuda), trainer_state.json (step, data position, config)
    config.json, model.safetensors, tokenizer.json ...   the final model, written when training completes

Checkpoints are written every ``--save-every`` steps, at the end, at ``--stop-after-steps`` and on SIGTERM/SIGINT
(after the step in flight; a second signal stops at once). Each is written to ``checkpoint.tmp`` and swapped in with
``os.replace`` (``checkpoint`` -> ``checkpoint.old`` -> removed), so a crash leaves the previous one readable;
``--resume`` also finds ``checkpoint.old``. ``torch.save`` holds only optimizer/scheduler/RNG state, loaded back with
``weights_only=True``; model weights go through safetensors. Resuming restores weights, optimizer, scheduler, RNG
states and the data position (samples consumed), so on CPU in fp32 a resumed run repeats the per-step losses of an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlkv.checkpoints import atomic_json, copy_companions
from mlkv.training.config import TrainConfig
from mlkv.training.runtime import Dist

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT", "STATE_FILE", "OPTIMIZER_FILE", "OBJECTIVE_SETTINGS", "find_checkpoint", "read_state",
           "check_resumed_objective", "rng_state", "set_rng_state", "full_model_state", "save_model",
           "save_checkpoint", "load_checkpoint"]

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
#: The loss settings a resumed run must keep, with the value a checkpoint written before the setting existed had.
OBJECTIVE_SETTINGS = {"objective": "lm", "distill_temperature": 1.0, "distill_alpha": 1.0, "distill_hidden": 0.0}


# ---- finding one ----------------------------------------------------------------------------------------------------
def find_checkpoint(out: str | os.PathLike) -> Path | None:
    """The last complete checkpoint under ``out`` (``checkpoint/``, else ``checkpoint.old/`` left by a crash)."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        folder = Path(out) / name
        if (folder / STATE_FILE).is_file():
            return folder
    return None


def read_state(folder: Path) -> dict:
    """The trainer state of a checkpoint: step, samples and tokens seen, total steps, world size, config."""
    return json.loads((folder / STATE_FILE).read_text())


def check_resumed_objective(saved: dict, cfg: TrainConfig, out: Path) -> None:
    """Refuse to continue a run under another loss than the one it started with (a changed default included)."""
    changed = [f"--{k.replace('_', '-')} {saved.get(k, old)!r} -> {getattr(cfg, k)!r}"
               for k, old in OBJECTIVE_SETTINGS.items() if saved.get(k, old) != getattr(cfg, k)]
    if changed:
        raise ValueError(f"{out} was started with another loss ({', '.join(changed)}); resume it with the flags it "
                         "started with, or train into another --out")


# ---- RNG state ------------------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    """Python, numpy, torch and CUDA generator states in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- writing --------------------------------------------------------------------------------------------------------
def full_model_state(loss_model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor] | None:
    """Unsharded model weights under FSDP (every rank takes part; rank 0 gets them), else ``None``."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(loss_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}


def save_model(model: nn.Module, folder: Path, state: dict | None, companions: dict[str, Path]) -> None:
    """``save_pretrained`` (with ``state`` as the weights if given) plus the tokenizer and generation files."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
    try:
        model.save_pretrained(folder, state_dict=state)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    copy_companions(companions, folder)


def save_checkpoint(out: Path, state: dict, *, loss_model, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, ctx: Dist, device: torch.device, fsdp: bool,
                    companions: dict[str, Path]) -> Path:
    """Write ``out/checkpoint`` (every rank takes part): the model of ``loss_model``, the optimizer and scheduler,
    each rank's RNG state and the trainer ``state``; returns its folder."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    final, tmp, old = out / CHECKPOINT, out / (CHECKPOINT + ".tmp"), out / (CHECKPOINT + ".old")
    model_state = full_model_state(loss_model, fsdp)
    optim_state = get_optimizer_state_dict(loss_model, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(loss_model.model, tmp, model_state, companions)
        torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
        atomic_json(tmp / STATE_FILE, state, indent=1)
    ctx.barrier()
    torch.save(rng_state(device), tmp / f"rng_rank{ctx.rank}.pt")
    ctx.barrier()
    if ctx.main:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


# ---- reading back ---------------------------------------------------------------------------------------------------
def load_checkpoint(folder: Path, *, loss_model, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int, device: torch.device) -> dict:
    """Optimizer, scheduler, this rank's RNG; returns the trainer state. Model weights were loaded already."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = read_state(folder)
    saved = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(loss_model, optimizer, optim_state_dict=saved["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved["scheduler"])
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True), device)
    else:
        logger.warning("%s missing (resuming on more ranks than saved): RNG streams start fresh", rng_file.name)
    return state
