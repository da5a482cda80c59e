"""A run's checkpoint: written, found and read back for ``--resume``, with every rank's RNG state and a checksum
of every file.

Output folder (``--out``)::

    metrics.jsonl          one JSON object per logged step and per evaluation
    tensorboard/           if the ``tensorboard`` package is installed
    checkpoint/            the last checkpoint: config.json + model.safetensors (save_pretrained), tokenizer and
                           generation files, optimizer.pt (optimizer + scheduler), rng_rank{r}.pt (python, numpy,
                           torch, cuda), trainer_state.json (step, data position, config, the settings that define
                           the run, and the sha256 of every other file; written last)
    checkpoint.old/        the one before it, kept while the run goes on
    config.json, model.safetensors, tokenizer.json ...   the final model, written when training completes

Checkpoints are written every ``--save-every`` steps, at the end, at ``--stop-after-steps`` and on SIGTERM/SIGINT
(after the step in flight; a second signal stops at once). Each is written to ``checkpoint.tmp`` (removed if the
write fails, e.g. on a full disk) and swapped in with ``os.replace`` (``checkpoint`` -> ``checkpoint.old``), so a
crash leaves the previous one readable. ``--resume`` verifies the checksums of the newest and falls back to
``checkpoint.old`` with a warning when a file is missing or corrupt; an unreadable file without a fallback is a
``CorruptCheckpointError`` naming it. ``torch.save`` holds only optimizer/scheduler/RNG state, loaded back with
``weights_only=True``; model weights go through safetensors. Resuming restores weights, optimizer, scheduler, RNG
states and the data position (samples consumed), so on CPU in fp32 a resumed run repeats the per-step losses of an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mlkv.checkpoints import copy_companions
from mlkv.errors import UsageError
from mlkv.files import atomic_json, sha256_file
from mlkv.training.outdir import CHECKPOINT, STATE_FILE, fsync_files, staging
from mlkv.training.runtime import Dist

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT", "STATE_FILE", "OPTIMIZER_FILE", "CorruptCheckpointError", "read_state", "file_digests",
           "checkpoint_problem", "select_checkpoint", "rng_state", "set_rng_state", "full_model_state", "save_model",
           "save_checkpoint", "load_checkpoint"]

OPTIMIZER_FILE = "optimizer.pt"
#: What to do about a corrupt checkpoint that has no intact one before it.
NO_FALLBACK = ("no intact earlier checkpoint (checkpoint.old) to fall back to: restore the file, or start the run "
               "again with --overwrite")


class CorruptCheckpointError(UsageError):
    """A checkpoint file is missing, unreadable or fails its checksum; the message names it and what to do."""


# ---- finding one ----------------------------------------------------------------------------------------------------
def read_state(folder: Path) -> dict:
    """The trainer state of a checkpoint: step, samples and tokens seen, total steps, world size, config, the run's
    settings (``run``) and the checksums of its files (``files``)."""
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: cannot be read ({exc})") from exc
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CorruptCheckpointError(f"{path}: not a trainer state (no step)")
    return state


def file_digests(folder: Path) -> dict[str, str]:
    """``{file name: sha256}`` of every file of a checkpoint folder but the trainer state."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != STATE_FILE}


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (an unreadable state, a missing file, a checksum that differs), or
    None. A checkpoint written before checksums were recorded is checked for its state only."""
    try:
        state = read_state(folder)
    except CorruptCheckpointError as exc:
        return str(exc)
    for name, digest in state.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != digest:
            return f"{path} is corrupt: its sha256 differs from the one recorded when it was written"
    return None


def select_checkpoint(out: Path) -> Path | None:
    """The newest intact checkpoint of ``out``, made ``out/checkpoint`` (rank 0, holding the folder's lock).

    ``checkpoint/`` is verified first; when it is corrupt (or missing after a crash between the two renames of a
    save), ``checkpoint.old/`` is verified and takes its place, with a warning. Raises ``CorruptCheckpointError`` when
    none is intact; returns None when there is none."""
    newest, old = out / CHECKPOINT, out / (CHECKPOINT + ".old")
    problems = []
    for folder in (newest, old):
        if not folder.is_dir() or (folder == old and not (old / STATE_FILE).is_file()):
            continue  # an old checkpoint without its state was being deleted
        problem = checkpoint_problem(folder)
        if problem is None:
            break
        problems.append(problem)
    else:
        if problems:
            raise CorruptCheckpointError(f"{problems[0]}; {NO_FALLBACK}")
        return None
    if folder == old:
        if problems:
            logger.warning("%s; resuming from the checkpoint before it (%s, step %d)", problems[0], old,
                           read_state(old)["step"])
        shutil.rmtree(newest, ignore_errors=True)
        os.replace(old, newest)
    return newest


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


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk surfaces as the ``OSError`` it is."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(out: Path, state: dict, *, loss_model, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, ctx: Dist, device: torch.device, fsdp: bool,
                    companions: dict[str, Path]) -> Path:
    """Write ``out/checkpoint`` (every rank takes part): the model of ``loss_model``, the optimizer and scheduler,
    each rank's RNG state and the trainer ``state`` with the files' checksums, written last; returns its folder."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    final, tmp, old = out / CHECKPOINT, out / (CHECKPOINT + ".tmp"), out / (CHECKPOINT + ".old")
    model_state = full_model_state(loss_model, fsdp)
    optim_state = get_optimizer_state_dict(loss_model, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.main:
        shutil.rmtree(old, ignore_errors=True)  # the newest two are kept: the last one and the one being written
    with staging(tmp, final) if ctx.main else contextlib.nullcontext():
        if ctx.main:
            save_model(loss_model.model, tmp, model_state, companions)
            _torch_save({"optimizer": optim_state, "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
        ctx.barrier()
        _torch_save(rng_state(device), tmp / f"rng_rank{ctx.rank}.pt")
        ctx.barrier()
        if ctx.main:
            fsync_files(tmp)
            atomic_json(tmp / STATE_FILE, {**state, "files": file_digests(tmp)}, indent=1)
    if ctx.main:
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    ctx.barrier()
    return final


# ---- reading back ---------------------------------------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    """``torch.load`` (``weights_only``) of a checkpoint file; an unreadable one is a ``CorruptCheckpointError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (truncated zip, bad pickle, I/O error: all mean the file is unusable)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptCheckpointError(f"{path}: cannot be read ({reason}); the file is truncated or corrupt: "
                                     f"{NO_FALLBACK}") from exc


def load_checkpoint(folder: Path, *, loss_model, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int, device: torch.device) -> dict:
    """Optimizer, scheduler, this rank's RNG; returns the trainer state. Model weights were loaded already."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = read_state(folder)
    saved = _torch_load(folder / OPTIMIZER_FILE)
    try:
        set_optimizer_state_dict(loss_model, optimizer, optim_state_dict=saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(saved["scheduler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(f"{folder / OPTIMIZER_FILE}: does not hold this model's optimizer state "
                                     f"({type(exc).__name__}: {exc}); {NO_FALLBACK}") from exc
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        rng = _torch_load(rng_file)
        try:
            set_rng_state(rng, device)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CorruptCheckpointError(f"{rng_file}: not a random-generator state ({exc}); {NO_FALLBACK}") from exc
    else:
        logger.warning("%s missing (resuming on more ranks than saved): RNG streams start fresh", rng_file.name)
    return state
