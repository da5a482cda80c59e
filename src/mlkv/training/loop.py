"""Training loop for MLKV models: pretraining from a config/preset, uptraining from a checkpoint, distillation.

Usage (the ``mlkv train`` command; ``python -m mlkv.train`` takes the same flags)::

    mlkv train --model runs/pythia-160m-mlkv6 --data ../shared/data/corpus/gutenberg/ --out runs/up6 --tokens 20M
    mlkv train --model pythia-160m --plan mlkv-6 --tokenizer ../shared/data/tokenizers/gpt-neox-20b --data ... --out ...
    torchrun --nproc-per-node 8 -m mlkv.training.loop --model ... --data ... --out ... [--fsdp]

``--model`` is a checkpoint directory (config.json + weights: uptraining, loaded with
``AutoModelForCausalLM.from_pretrained``), a directory or file holding only a config.json, or a preset name of
``mlkv.model.config.PRESETS`` (random init from ``--seed``; ``--plan`` picks the K/V sharing plan).

Recipe (defaults follow the MLKV paper's uptraining: HF Trainer, AdamW 0.9/0.95, eps 1e-8, wd 0.01, lr 6e-4,
cosine, warmup ratio 0.2, sequence length 2048):

* AdamW (``fused=True`` on CUDA). Weight decay applies to every parameter with 2 or more dimensions: the weight
  matrices, the token embedding and the output projection, as HF's Trainer (the paper's setup) and nanoGPT do;
  biases and norm gains (1-D) are not decayed.
* Learning rate: linear warmup over ``ceil(warmup_ratio * steps)`` steps (step ``s`` of the warmup uses
  ``lr * (s + 1) / warmup``; HF starts at 0), then cosine decay to ``min_lr_ratio * lr`` at the last step. The
  default ``min_lr_ratio=0.1`` is the common practice for pretraining (Chinchilla, Pythia); ``--min-lr-ratio 0``
  is HF Trainer's ``cosine`` schedule.
* Gradient clipping at global norm 1.0, gradient accumulation (``--grad-accum``), bf16 autocast on CUDA with fp32
  master weights (fp32 on CPU unless ``--precision bf16``), optional activation checkpointing and ``--compile``
  (``torch.compile`` of each decoder layer and of the logits/loss; see ``LossModel.compile_layers``).
* Budget: ``--tokens 20M`` (suffixes K/M/B/T) gives ``ceil(tokens / (micro_batch * grad_accum * world * seq_len))``
  optimizer steps, or ``--steps N``. ``--stop-after-steps K`` stops (with a checkpoint) after step K while keeping
  the schedule of the whole run, so a later ``--resume`` continues it.

Objectives: ``lm`` (next-token cross-entropy, mean over all ``B * (T - 1)`` predicted tokens) and ``distill``:
``alpha * tau^2 * KL(teacher || student) + (1 - alpha) * lm`` with the temperature-``tau`` distributions of the
teacher (``--teacher``, e.g. the original unconverted model; same process, eval mode, no grad, bf16 on CUDA) and of
the student, averaged over all ``B * T`` positions, plus ``--distill-hidden`` times a layer-wise hidden-state distance
to the teacher (``hidden_distance``: the mean over decoder layers of ``|h_s - h_t|^2 / |h_t|^2``; default 10, 0 =
logits only; it needs a teacher of the student's depth and width, as the unconverted model is). On a converted
MLKV-6 at equal tokens the hidden term took distillation from 9% to 36% of the base-to-LM perplexity gap closed
(``benchmarks/distill_variants.py``).
The logits and the KL are computed in chunks over the sequence (``--loss-chunk-tokens``, default 16384 tokens for
distillation), each chunk recomputed in the backward pass, so no ``(B, T, vocab)`` tensor is ever held whole.

Throughput: tokens/s count every token of each optimizer step over its wall time. MFU uses the PaLM-style model
FLOPs per token, ``6 * N + 12 * L * d_attn * T``: ``N`` = parameters that take part in matrix products (all
parameters but the input embedding, which is a lookup; the output projection is counted, a fifth of the work at
the Pythia-160M shape), ``L`` layers, ``d_attn = heads * head_dim``, ``T`` the sequence length (attention scores
and values, forward and backward, full ``T x T`` as PaLM counts them although the causal kernel skips half).
Recomputation (activation checkpointing, chunked loss) and the teacher's forward are not counted. The peak is
``--peak-tflops`` or a table of dense bf16 peaks of known cards; ``benchmarks/train_throughput.py`` measures it.

Output folder (``--out``)::

    metrics.jsonl          one JSON object per logged step and per evaluation
    tensorboard/           if the ``tensorboard`` package is installed
    checkpoint/            the last good checkpoint: config.json + model.safetensors (save_pretrained), tokenizer
                           files, optimizer.pt (optimizer + scheduler), rng_rank{r}.pt (python, numpy, torch, cuda),
                           trainer_state.json (step, data position, config)
    config.json, model.safetensors, tokenizer.json ...   the final model, written when training completes

Checkpoints are written every ``--save-every`` steps, at the end, at ``--stop-after-steps`` and on SIGTERM/SIGINT
(after the step in flight; a second signal stops at once). Each is written to ``checkpoint.tmp`` and swapped in with
``os.replace`` (``checkpoint`` -> ``checkpoint.old`` -> removed), so a crash leaves the previous one readable;
``--resume`` also finds ``checkpoint.old``. ``torch.save`` holds only optimizer/scheduler/RNG state, loaded back with
``weights_only=True``; model weights go through safetensors. Resuming restores weights, optimizer, scheduler, RNG
states and the data position (samples consumed), so on CPU in fp32 a resumed run repeats the per-step losses of an
uninterrupted one. A NaN/inf loss or gradient norm stops the run with ``NonFiniteLossError`` naming the step; the
last good checkpoint stays. (Each step's loss is read on the host one step late, while the next step runs, so the
GPU never waits for the host; the read happens at once before any evaluation or checkpoint.)

Several GPUs: under ``torchrun`` the model is wrapped in DDP (or FSDP2 ``fully_shard`` with ``--fsdp``: each
decoder layer one unit, embeddings/final norm/output projection in the root unit); rank ``r`` of ``W`` reads the
``r``-th contiguous slice of each global batch (``PackedDataset.batches``), so the gradients equal those of one
process on the concatenated batch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from mlkv.model.config import PRESETS, MLKVConfig, preset_config

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainHooks", "NonFiniteLossError", "LossModel", "train", "parse_tokens", "model_flops_per_token",
           "add_train_arguments", "config_from_args", "run_train_command", "main"]

OBJECTIVES = ("lm", "distill")
#: ``--sdpa-backend``: the SDPA kernel tried first on CUDA (the others follow as fallbacks); ``auto`` keeps
#: PyTorch's order (cuDNN first on Hopper: 1.18 ms vs flash's 1.85 ms for a causal fwd+bwd of 16x12x2048x64 on H200).
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
PRECISIONS = ("auto", "bf16", "fp32")
CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
METRICS_FILE = "metrics.jsonl"
#: Tokens per loss chunk for distillation when ``loss_chunk_tokens`` is not given, and always for evaluation.
DEFAULT_CHUNK_TOKENS = 16384
#: Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, first match wins; ``--peak-tflops`` overrides.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
                   ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12))
IGNORE = -100  # target of the last position, which predicts nothing
TOKEN_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


# ---- configuration --------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every setting of a training run; the CLI flags have the same names (``micro_batch_size`` is
    ``--micro-batch-size``). ``tokens`` may be a string with a K/M/B/T suffix."""

    model: str
    out: str
    data: list[str] = field(default_factory=list)
    plan: str | None = None
    tokenizer: str | None = None
    val_data: list[str] | None = None
    val_fraction: float = 0.0
    cache_dir: str | None = None
    text_field: str = "text"
    max_documents: int | None = None
    max_data_tokens: int | str | None = None
    seq_len: int = 2048
    micro_batch_size: int = 8
    grad_accum: int = 1
    tokens: int | str | None = None
    steps: int | None = None
    stop_after_steps: int | None = None
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.2
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    objective: str = "lm"
    teacher: str | None = None
    distill_temperature: float = 1.0
    distill_alpha: float = 1.0
    distill_hidden: float = 10.0  # with --objective distill; benchmarks/results/distill_variants_h200
    loss_chunk_tokens: int | None = None
    precision: str = "auto"
    sdpa_backend: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False
    device: str | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int | None = 100
    save_every: int = 1000
    resume: bool = False
    progress: bool = True
    tensorboard: bool | None = None
    peak_tflops: float | None = None


@dataclass
class TrainHooks:
    """Callbacks for tests and tools. ``after_backward(step, model)``: gradients of optimizer step ``step``
    (1-based) are complete and synchronised across ranks, not yet clipped. ``after_step(step, model)``: after the
    optimizer step. ``model`` is the Hugging Face model (FSDP-sharded under ``--fsdp``)."""

    after_backward: Callable[[int, nn.Module], None] | None = None
    after_step: Callable[[int, nn.Module], None] | None = None


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN/inf; the run stopped and wrote no checkpoint after it."""


def parse_tokens(value: int | float | str | None) -> int | None:
    """``"20M"`` -> 20_000_000. Accepts ints, ``1.5B``, ``2e9``, ``500_000``, ``300k``; suffixes K/M/B(G)/T."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        result = value
    else:
        text = str(value).strip().replace("_", "").replace(",", "")
        suffix = text[-1:].upper() if text[-1:].isalpha() else ""
        number = text[: len(text) - len(suffix)]
        try:
            if suffix not in TOKEN_SUFFIXES:
                raise ValueError
            result = float(number) * TOKEN_SUFFIXES[suffix]
        except ValueError:
            raise ValueError(f"bad token count {value!r}: expected a number with an optional K/M/B/T suffix, "
                             f"e.g. 20M or 1.5B") from None
        if not math.isfinite(result) or result != int(result):
            raise ValueError(f"bad token count {value!r}: not a whole number of tokens")
        result = int(result)
    if result is not None and result <= 0:
        raise ValueError(f"bad token count {value!r}: must be positive")
    return result


def _check_config(cfg: TrainConfig, have_datasets: bool) -> None:
    """Errors a user can fix, raised before anything is loaded."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective {cfg.objective!r} is unknown; choose one of {OBJECTIVES}")
    if cfg.objective == "distill" and not cfg.teacher:
        raise ValueError("objective 'distill' needs --teacher DIR (the original, unconverted model)")
    if cfg.teacher and cfg.objective != "distill":
        raise ValueError("--teacher is only used with --objective distill")
    if not 0.0 <= cfg.distill_alpha <= 1.0:
        raise ValueError(f"--distill-alpha must be in [0, 1], got {cfg.distill_alpha}")
    if cfg.distill_hidden < 0:
        raise ValueError(f"--distill-hidden must be >= 0, got {cfg.distill_hidden}")
    if cfg.distill_temperature <= 0:
        raise ValueError(f"--distill-temperature must be positive, got {cfg.distill_temperature}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision {cfg.precision!r} is unknown; choose one of {PRECISIONS} "
                         "(fp16 is not supported: use bf16)")
    if cfg.sdpa_backend not in SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend {cfg.sdpa_backend!r} is unknown; choose one of {SDPA_BACKENDS}")
    if (cfg.tokens is None) == (cfg.steps is None):
        raise ValueError("give the training budget as --tokens (e.g. 20M) or --steps, exactly one of them")
    parse_tokens(cfg.tokens)
    parse_tokens(cfg.max_data_tokens)
    for name in ("seq_len", "micro_batch_size", "grad_accum", "steps", "stop_after_steps", "log_every",
                 "loss_chunk_tokens", "max_documents", "eval_batches"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < (0 if name == "loss_chunk_tokens" else 1)):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("eval_every", "save_every"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0 (0 = only at the end), got {getattr(cfg, name)}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ValueError(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    for name in ("grad_clip", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not have_datasets and not cfg.data:
        raise ValueError("no training data: pass --data (files, folders or hf:<dataset> sources)")


# ---- model loading --------------------------------------------------------------------------------------------------
def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def load_student(spec: str, plan: str | None = None, seed: int = 0) -> tuple[nn.Module, str]:
    """The model to train and how it was made: ``"checkpoint"`` (uptraining) or ``"random"`` (pretraining)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {spec}: the directory has no config.json")
        if _has_weights(path):
            if plan is not None:
                raise ValueError(f"--plan applies to a random init from a config or preset; {spec} is a trained "
                                 "checkpoint: change its sharing plan with `mlkv convert` first")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            return model, "checkpoint"
        config = AutoConfig.from_pretrained(path)
    elif path.is_file():
        config = AutoConfig.from_pretrained(path)
    elif spec in PRESETS:
        config = preset_config(spec)
    else:
        raise FileNotFoundError(f"--model {spec!r}: no such checkpoint directory or config file, and not a preset "
                                f"(presets: {', '.join(sorted(PRESETS))})")
    if plan is not None:
        if not isinstance(config, MLKVConfig):
            raise ValueError(f"--plan needs an MLKV config; {spec} is a {type(config).__name__}")
        config = config.with_plan(plan)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32), "random"


def load_teacher(spec: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    path = Path(spec).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file() and _has_weights(path)):
        raise FileNotFoundError(f"--teacher {spec}: not a checkpoint directory (config.json + weights)")
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return teacher.eval().requires_grad_(False)


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, ``6 * N + 12 * L * d_attn * T`` (see the module docstring)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    n = sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel())
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 6.0 * n + 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq_len


def _peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


# ---- the loss -------------------------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (classes named in ``_no_split_modules``)."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in classes]


class LossModel(nn.Module):
    """Wraps the model so that DDP/FSDP see one forward that returns the loss.

    ``forward(input_ids)`` -> ``(loss, lm, kl, hidden)``: ``lm`` the mean over the ``B * (T - 1)`` predicted tokens,
    ``kl`` the mean over all ``B * T`` positions (the teacher's last-position distribution is a target too; 0 without
    a teacher), ``hidden`` the layer-wise hidden-state distance (see ``hidden_distance``; 0 unless ``hidden_weight``),
    all three detached; ``forward(input_ids, evaluate=True)`` -> ``(sum of lm losses, tokens)``. The teacher is kept
    outside the module tree, so it is never wrapped, sharded or saved.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module | None = None, temperature: float = 1.0,
                 alpha: float = 1.0, chunk_tokens: int = 0, hidden_weight: float = 0.0):
        super().__init__()
        self.model = model
        self._teacher = (teacher,)
        self.temperature, self.alpha, self.chunk_tokens = temperature, alpha, chunk_tokens
        self.hidden_weight = hidden_weight if teacher is not None else 0.0
        self._loss_chunk = self._chunk

    def compile_layers(self, **kwargs) -> None:
        """``torch.compile`` each decoder layer (in place: parameter names stay) and the logits/loss chunk.

        Not the whole forward: transformers' ``create_causal_mask`` builds an explicit mask when traced by dynamo,
        which turns SDPA's causal kernel into a masked, non-causal one (2-3x slower attention at seq 2048); eager, it
        returns ``None`` and attention stays ``is_causal``.
        """
        for layer in decoder_layers(self.model):
            layer.compile(**kwargs)
        self._loss_chunk = torch.compile(self._chunk, **kwargs)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    def forward(self, input_ids: torch.Tensor, evaluate: bool = False):
        layers = self.hidden_weight > 0 and not evaluate
        out = self.model.base_model(input_ids=input_ids, use_cache=False, output_hidden_states=layers)
        # Logits at all T positions (whole-tile GEMM shapes, no strided copy); the last has no target.
        hidden = out.last_hidden_state  # (B, T, H)
        targets = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE)  # (B, T)
        predicted = input_ids.shape[0] * (input_ids.shape[1] - 1)
        if evaluate:
            return self._sums(hidden, targets, None, DEFAULT_CHUNK_TOKENS, recompute=False)[0], predicted
        teacher_out = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_out = self.teacher.base_model(input_ids=input_ids, use_cache=False,
                                                      output_hidden_states=layers)
        teacher_last = None if teacher_out is None else teacher_out.last_hidden_state  # (B, T, H)
        ce, kl = self._sums(hidden, targets, teacher_last, self.chunk_tokens, recompute=True)
        ce, kl = ce / predicted, kl / input_ids.numel()
        zero = torch.zeros_like(ce).detach()
        if self.teacher is None:
            return ce, ce.detach(), zero, zero
        loss = self.alpha * self.temperature**2 * kl + (1.0 - self.alpha) * ce
        dist_h = zero
        if layers:
            dist_h = hidden_distance(out.hidden_states, teacher_out.hidden_states)
            loss = loss + self.hidden_weight * dist_h
        return loss, ce.detach(), kl.detach(), dist_h.detach()

    def _sums(self, hidden, targets, teacher_hidden, chunk_tokens: int, recompute: bool):
        """Summed cross-entropy and KL over chunks of ``chunk_tokens`` tokens (whole sequence if 0)."""
        B, T = targets.shape
        chunk = T if not chunk_tokens else max(1, chunk_tokens // B)
        if chunk >= T:
            return self._loss_chunk(hidden, targets, teacher_hidden)
        ce = kl = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, T, chunk):
            args = (hidden[:, s:s + chunk], targets[:, s:s + chunk],
                    None if teacher_hidden is None else teacher_hidden[:, s:s + chunk])
            if recompute and torch.is_grad_enabled():
                c_ce, c_kl = activation_checkpoint(self._loss_chunk, *args, use_reentrant=False)
            else:
                c_ce, c_kl = self._loss_chunk(*args)
            ce, kl = ce + c_ce, kl + c_kl
        return ce, kl

    def _chunk(self, hidden, targets, teacher_hidden):
        logits = self.model.get_output_embeddings()(hidden).float()  # (B, C, V)
        if teacher_hidden is None:
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE)
            return ce, logits.new_zeros(())
        with torch.no_grad():
            teacher_logits = self.teacher.get_output_embeddings()(teacher_hidden).float()  # (B, C, V)
            teacher_logp = F.log_softmax(teacher_logits / self.temperature, dim=-1)
        student_logp = F.log_softmax(logits / self.temperature, dim=-1)  # (B, C, V)
        # KL(teacher || student) = sum_v p_t (log p_t - log p_s), summed over the chunk's tokens.
        kl = F.kl_div(student_logp.flatten(0, 1), teacher_logp.flatten(0, 1), reduction="sum", log_target=True)
        # The cross-entropy from the same log-probabilities at temperature 1 (one pass over the (B, C, V) logits
        # fewer), and without a gradient when alpha = 1, where it is only reported.
        needs_grad = torch.is_grad_enabled() and self.alpha < 1.0
        if self.temperature == 1.0:
            logp = student_logp if needs_grad else student_logp.detach()
        else:
            with torch.set_grad_enabled(needs_grad):
                logp = F.log_softmax(logits, dim=-1)  # (B, C, V)
        ce = F.nll_loss(logp.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE)
        return ce, kl


def hidden_distance(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Layer-wise hidden-state distillation: the mean over layers of ``|h_s - h_t|^2 / |h_t|^2`` (means over all
    ``B * T * hidden`` elements of the micro-batch), for the output of every decoder layer (the last one after the
    final norm). The embedding output is skipped: a converted student shares it with its teacher. Relative, so every
    layer counts alike whatever the scale of its residual stream. The normaliser is the micro-batch's own, so
    splitting a batch differently (ranks, ``--grad-accum``) changes the objective slightly (gradients differ by
    ~3e-4 relative between 1 x 4 and 2 x 2 sequences), unlike the KL and cross-entropy terms. Each layer's term is
    recomputed in the backward pass instead of keeping a float32 copy of the difference."""
    if len(student) != len(teacher) or student[-1].shape != teacher[-1].shape:
        raise ValueError(f"hidden-state distillation needs a teacher of the student's shape: {len(teacher) - 1} "
                         f"layers of {teacher[-1].shape[-1]} against {len(student) - 1} of {student[-1].shape[-1]} "
                         "(use --distill-hidden 0 to distill from the logits only)")
    terms = []
    for s, t in zip(student[1:], teacher[1:]):
        if torch.is_grad_enabled() and s.requires_grad:
            terms.append(activation_checkpoint(_relative_distance, s, t.detach(), use_reentrant=False))
        else:
            terms.append(_relative_distance(s, t.detach()))
    return torch.stack(terms).mean()


def _relative_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    return (s.float() - t).square().mean() / t.square().mean().clamp_min(1e-12)


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


# ---- distributed ----------------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def _setup(cfg: TrainConfig) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = _Dist()
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


# ---- RNG state ------------------------------------------------------------------------------------------------------
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict:
    """Python, numpy, torch and CUDA generator states in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def find_checkpoint(out: str | Path) -> Path | None:
    """The last complete checkpoint under ``out`` (``checkpoint/``, else ``checkpoint.old/`` left by a crash)."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        folder = Path(out) / name
        if (folder / STATE_FILE).is_file():
            return folder
    return None


def _tokenizer_files(tokenizer: str | None) -> list[Path]:
    if not tokenizer:
        return []
    from mlkv.data.pipeline import TOKENIZER_FILES

    path = Path(tokenizer).expanduser()
    if path.is_file():
        return [path]
    return [path / name for name in TOKENIZER_FILES if (path / name).is_file()]


def _copy_tokenizer(files: list[Path], folder: Path) -> None:
    for f in files:
        shutil.copyfile(f, folder / ("tokenizer.json" if f.suffix == ".json" and len(files) == 1 else f.name))


def _full_model_state(engine: nn.Module, fsdp: bool) -> dict[str, torch.Tensor] | None:
    """Unsharded model weights under FSDP (every rank takes part; rank 0 gets them), else ``None``."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(engine, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}


def _save_model(model: nn.Module, folder: Path, state: dict | None, tokenizer_files: list[Path]) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
    try:
        model.save_pretrained(folder, state_dict=state)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    _copy_tokenizer(tokenizer_files, folder)


def _save_checkpoint(run: "_Run", step: int) -> Path:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    out, ctx = Path(run.cfg.out), run.ctx
    final, tmp, old = out / CHECKPOINT, out / (CHECKPOINT + ".tmp"), out / (CHECKPOINT + ".old")
    model_state = _full_model_state(run.engine, run.fsdp)
    optim_state = get_optimizer_state_dict(run.engine, run.optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _save_model(run.model, tmp, model_state, run.tokenizer_files)
        torch.save({"optimizer": optim_state, "scheduler": run.scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
        state = {"step": step, "samples_seen": run.samples_seen, "tokens_seen": run.tokens_seen,
                 "total_steps": run.total_steps, "world_size": ctx.world, "config": dataclasses.asdict(run.cfg)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    ctx.barrier()
    torch.save(_rng_state(run.device), tmp / f"rng_rank{ctx.rank}.pt")
    ctx.barrier()
    if ctx.main:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    run.last_checkpoint = (step, final)
    return final


#: The loss settings a resumed run must keep, with the value a checkpoint written before the setting existed had.
OBJECTIVE_SETTINGS = {"objective": "lm", "distill_temperature": 1.0, "distill_alpha": 1.0, "distill_hidden": 0.0}


def _check_resumed_objective(saved: dict, cfg: TrainConfig, out: Path) -> None:
    """Refuse to continue a run under another loss than the one it started with (a changed default included)."""
    changed = [f"--{k.replace('_', '-')} {saved.get(k, old)!r} -> {getattr(cfg, k)!r}"
               for k, old in OBJECTIVE_SETTINGS.items() if saved.get(k, old) != getattr(cfg, k)]
    if changed:
        raise ValueError(f"{out} was started with another loss ({', '.join(changed)}); resume it with the flags it "
                         "started with, or train into another --out")


def _load_checkpoint(run: "_Run", folder: Path) -> dict:
    """Optimizer, scheduler, this rank's RNG; returns the trainer state. Model weights were loaded already."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = json.loads((folder / STATE_FILE).read_text())
    saved = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(run.engine, run.optimizer, optim_state_dict=saved["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    run.scheduler.load_state_dict(saved["scheduler"])
    rng_file = folder / f"rng_rank{run.ctx.rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True), run.device)
    else:
        logger.warning("%s missing (resuming on more ranks than saved): RNG streams start fresh", rng_file.name)
    return state


# ---- metrics --------------------------------------------------------------------------------------------------------
class _Metrics:
    """metrics.jsonl (+ TensorBoard when installed), rank 0 only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None, tensorboard: bool | None):
        self.file = None
        self.writer = None
        if not enabled:
            return
        path = out / METRICS_FILE
        kept = []
        if resume_step is not None and path.is_file():  # drop records past the checkpoint being resumed
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line + "\n")
        self.file = path.open("w")
        self.file.writelines(kept)
        self.file.flush()
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                if tensorboard:
                    logger.warning("TensorBoard requested but the tensorboard package is not installed")

    def log(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


# ---- the run --------------------------------------------------------------------------------------------------------
@dataclass
class _Run:
    cfg: TrainConfig
    ctx: _Dist
    device: torch.device
    model: nn.Module = None  # the Hugging Face model
    engine: LossModel = None  # wraps model (+ teacher); FSDP root under --fsdp
    step_fn: nn.Module = None  # engine, or engine in DDP
    optimizer: torch.optim.Optimizer = None
    scheduler: torch.optim.lr_scheduler.LambdaLR = None
    tokenizer_files: list[Path] = field(default_factory=list)
    total_steps: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    last_checkpoint: tuple[int, Path] | None = None
    stop_signal: int | None = None
    fsdp: bool = False  # --fsdp with several processes


def _resolve_tokenizer(cfg: TrainConfig) -> str | None:
    if cfg.tokenizer:
        path = Path(cfg.tokenizer).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--tokenizer {cfg.tokenizer}: no such file or directory")
        return str(path)
    folder = Path(cfg.model).expanduser()
    if folder.is_dir() and (folder / "tokenizer.json").is_file():
        return str(folder)
    return None


def _prepare_datasets(cfg: TrainConfig, ctx: _Dist, tokenizer: str | None):
    if tokenizer is None:
        raise ValueError(f"no tokenizer: --model {cfg.model} has no tokenizer.json; pass --tokenizer "
                         "(a tokenizer.json or a folder with one)")
    from mlkv.data.pipeline import prepare_data

    cache_dir = cfg.cache_dir or os.environ.get("MLKV_CACHE") or str(Path.home() / ".cache" / "mlkv" / "tokens")
    kwargs = dict(train_sources=cfg.data, tokenizer_path=tokenizer, cache_dir=cache_dir, seq_len=cfg.seq_len,
                  val_sources=cfg.val_data or None, val_fraction=cfg.val_fraction, seed=cfg.seed,
                  text_field=cfg.text_field, max_documents=cfg.max_documents,
                  max_tokens=parse_tokens(cfg.max_data_tokens), progress=cfg.progress and ctx.main)
    if ctx.world > 1 and not ctx.main:
        ctx.barrier()  # rank 0 tokenizes and fills the cache first
    train_ds, val_ds, stats = prepare_data(**kwargs)
    if ctx.world > 1 and ctx.main:
        ctx.barrier()
    return train_ds, val_ds, stats


def _check_vocab(model: nn.Module, tokenizer: str | None, teacher: nn.Module | None) -> None:
    vocab = model.get_output_embeddings().weight.shape[0]
    if tokenizer is not None:
        from mlkv.data.pipeline import load_tokenizer

        size = load_tokenizer(tokenizer).get_vocab_size(with_added_tokens=True)
        if size > vocab:
            raise ValueError(f"the tokenizer has {size} tokens but the model's vocab_size is {vocab}")
    if teacher is not None and teacher.get_output_embeddings().weight.shape[0] != vocab:
        raise ValueError(f"teacher vocab ({teacher.get_output_embeddings().weight.shape[0]}) differs from the "
                         f"student's ({vocab})")


def _wrap(run: _Run, engine: LossModel) -> nn.Module:
    cfg, device = run.cfg, run.device
    if cfg.fsdp and run.ctx.world == 1:
        logger.warning("--fsdp needs several processes (torchrun); training one unsharded copy")
    run.fsdp = cfg.fsdp and run.ctx.world > 1
    if run.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (run.ctx.world,))
        mp = MixedPrecisionPolicy()
        if _autocast_dtype(cfg, device) == torch.bfloat16 and device.type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in decoder_layers(run.model):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(engine, mesh=mesh, mp_policy=mp)  # root unit: embeddings, final norm, output projection
        step_fn = engine
    elif run.ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_fn = DDP(engine, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        step_fn = engine
    if cfg.compile:
        engine.compile_layers()
    return step_fn


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
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


def _sync_context(run: _Run, last_micro: bool):
    """No gradient all-reduce on accumulation micro-steps but the last."""
    if run.fsdp:
        run.engine.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()
    if run.ctx.world > 1 and not last_micro:
        return run.step_fn.no_sync()
    return contextlib.nullcontext()


def _evaluate(run: _Run, val_ds, autocast) -> dict:
    cfg, ctx = run.cfg, run.ctx
    batch = cfg.micro_batch_size
    drop_last = ctx.world > 1  # every rank runs the same number of forwards (FSDP gathers in each)
    n = val_ds.num_batches(batch, drop_last=drop_last, world_size=ctx.world)
    if cfg.eval_batches:
        n = min(n, cfg.eval_batches)
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)
    run.engine.eval()
    with torch.no_grad():
        batches = val_ds.batches(batch, 0, loop=False, drop_last=drop_last, rank=ctx.rank, world_size=ctx.world)
        for _, ids in zip(range(n), batches):
            with autocast():
                ce_sum, count = run.engine(ids.to(run.device), evaluate=True)
            totals += torch.stack([ce_sum.double(), torch.tensor(float(count), dtype=torch.float64,
                                                                 device=run.device)])
    run.engine.train()
    if ctx.world > 1:
        dist.all_reduce(totals)
    loss_sum, count = totals.tolist()
    if count == 0:
        return {}
    loss = loss_sum / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(count)}


@contextlib.contextmanager
def _stop_on_signals(run: _Run):
    """SIGTERM/SIGINT ask for a checkpoint after the step in flight; a second signal stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if run.stop_signal is not None:
            signal.signal(signum, previous[signum])
            raise KeyboardInterrupt(f"second signal {signum}")
        run.stop_signal = signum
        logger.warning("signal %d: saving a checkpoint after the current step", signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig, *, datasets: tuple | None = None, hooks: TrainHooks | None = None) -> dict:
    """Run (or resume) a training run; returns a summary dict (steps, tokens, losses, val loss, throughput).

    ``datasets``: prebuilt ``(train, val_or_None)`` ``PackedDataset``s instead of ``cfg.data`` (benchmarks, tests).
    Raises ``NonFiniteLossError`` when the loss or the gradient norm is NaN/inf.
    """
    _check_config(cfg, datasets is not None)
    hooks = hooks or TrainHooks()
    out = Path(cfg.out)
    ctx, device = _setup(cfg)
    try:
        return _train(cfg, ctx, device, out, datasets, hooks)
    finally:
        if ctx.created_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ctx: _Dist, device: torch.device, out: Path, datasets, hooks: TrainHooks) -> dict:
    started = time.perf_counter()
    run = _Run(cfg, ctx, device)
    resume_from = find_checkpoint(out) if cfg.resume else None
    if not cfg.resume and find_checkpoint(out) is not None:
        raise FileExistsError(f"{out} already holds a checkpoint: pass --resume to continue it or choose another "
                              "--out")
    if cfg.resume and resume_from is None and ctx.main:
        logger.warning("--resume: no checkpoint in %s, starting from the beginning", out)
    if resume_from is not None:
        _check_resumed_objective(json.loads((resume_from / STATE_FILE).read_text()).get("config", {}), cfg, out)

    # Model: the checkpoint being resumed, else --model.
    tokenizer = _resolve_tokenizer(cfg)
    run.tokenizer_files = _tokenizer_files(tokenizer)
    if resume_from is not None:
        run.model = AutoModelForCausalLM.from_pretrained(resume_from, dtype=torch.float32)
        origin = "resumed"
    else:
        run.model, origin = load_student(cfg.model, cfg.plan, cfg.seed)
    amp_dtype = _autocast_dtype(cfg, device)
    teacher = None
    if cfg.objective == "distill":
        teacher = load_teacher(cfg.teacher, amp_dtype or torch.float32, device)
    _check_vocab(run.model, tokenizer, teacher)
    if teacher is not None and cfg.distill_hidden:
        shapes = [(m.config.num_hidden_layers, m.config.hidden_size) for m in (teacher, run.model)]
        if shapes[0] != shapes[1]:
            raise ValueError(f"--distill-hidden {cfg.distill_hidden:g} needs a teacher of the student's depth and "
                             f"width: the teacher has {shapes[0][0]} layers of {shapes[0][1]}, the student "
                             f"{shapes[1][0]} of {shapes[1][1]} (use --distill-hidden 0 to distill from the logits "
                             "only)")
    if datasets is None:
        train_ds, val_ds, data_stats = _prepare_datasets(cfg, ctx, tokenizer)
    else:
        (train_ds, val_ds), data_stats = datasets, {}
    if train_ds.seq_len != cfg.seq_len:
        raise ValueError(f"the training data has seq_len {train_ds.seq_len}, the config {cfg.seq_len}")

    run.model.to(device).train()
    if cfg.activation_checkpointing:
        run.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    chunk = cfg.loss_chunk_tokens if cfg.loss_chunk_tokens is not None else (
        DEFAULT_CHUNK_TOKENS if teacher is not None else 0)
    run.engine = LossModel(run.model, teacher, cfg.distill_temperature, cfg.distill_alpha, chunk, cfg.distill_hidden)
    flops_per_token = model_flops_per_token(run.model, cfg.seq_len)  # before sharding
    run.step_fn = _wrap(run, run.engine)
    run.optimizer = make_optimizer(run.engine, cfg, device)

    per_rank = cfg.micro_batch_size * cfg.grad_accum
    tokens_per_step = per_rank * ctx.world * cfg.seq_len
    run.total_steps = cfg.steps or math.ceil(parse_tokens(cfg.tokens) / tokens_per_step)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, WarmupCosine(run.total_steps, cfg.warmup_ratio, cfg.min_lr_ratio))
    start_step = 0
    if resume_from is not None:
        state = _load_checkpoint(run, resume_from)
        start_step, run.samples_seen, run.tokens_seen = state["step"], state["samples_seen"], state["tokens_seen"]
        if state["total_steps"] != run.total_steps:
            logger.warning("resuming a run of %d steps as one of %d steps", state["total_steps"], run.total_steps)
        run.last_checkpoint = (start_step, resume_from)
    else:
        _seed_all(cfg.seed * 1000 + ctx.rank)  # dropout streams differ between ranks
    end_step = min(run.total_steps, cfg.stop_after_steps or run.total_steps)

    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    metrics = _Metrics(out, ctx.main, start_step if resume_from is not None else None, cfg.tensorboard)
    peak = _peak_flops(device, cfg.peak_tflops)
    attention = _attention_context(cfg.sdpa_backend, device)

    @contextlib.contextmanager
    def autocast():  # mixed precision (if any) and the SDPA kernel preference
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None), attention():
            yield
    if ctx.main:
        logger.info("model (%s): %.1fM parameters, %.3g FLOPs/token; %d steps of %d tokens (%s); data %s", origin,
                    sum(p.numel() for p in run.model.parameters()) / 1e6, flops_per_token, run.total_steps,
                    tokens_per_step, f"from step {start_step}" if start_step else "from scratch", data_stats)
        epochs = run.total_steps * per_rank * ctx.world / len(train_ds)
        if epochs > 1:
            logger.warning("the budget covers the training data %.2f times", epochs)

    summary = {"out": str(out), "origin": origin, "start_step": start_step, "total_steps": run.total_steps,
               "tokens_per_step": tokens_per_step, "flops_per_token": flops_per_token, "losses": [],
               "step_seconds": [], "interrupted": False, "data": data_stats}
    bar = tqdm(total=run.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and ctx.main))
    batches = train_ds.batches(per_rank, run.samples_seen, loop=True, drop_last=True, rank=ctx.rank,
                               world_size=ctx.world)
    params = [p for p in run.engine.parameters() if p.requires_grad]
    interval = {"loss": 0.0, "lm": 0.0, "kl": 0.0, "hidden": 0.0, "steps": 0, "seconds": 0.0}
    # Step time: on CUDA, between the GPU completions of consecutive steps (an event recorded after each step), so that
    # reading a step late, or two at once before an evaluation or the end, does not skew it; elsewhere, wall time
    # between reads (the CPU runs synchronously).
    clock = {"last": time.perf_counter(), "event": None, "ema": None}

    def finish(done: dict) -> bool:
        """Read one step's statistics (waits for its GPU work), stop on NaN/inf, log; True if a stop was asked.

        Called one step late (after the next step is queued) so that the GPU never waits for the host, and at
        once where the loop must agree on state: evaluation, checkpoints, the last step.
        """
        loss_v, lm_v, kl_v, hidden_v, norm_v, stop_v = done["packed"].tolist()
        step_done = done["step"]
        if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
            where = (f"the last good checkpoint (step {run.last_checkpoint[0]}) is {run.last_checkpoint[1]}"
                     if run.last_checkpoint else "no checkpoint was written")
            raise NonFiniteLossError(f"non-finite loss {loss_v} (gradient norm {norm_v}) at step {step_done}; "
                                     f"training stopped; {where}")
        now, event = time.perf_counter(), done["event"]
        if event is not None and clock["event"] is not None:
            event.synchronize()
            seconds = clock["event"].elapsed_time(event) / 1000.0
        else:
            seconds = now - clock["last"]
        clock["last"], clock["event"] = now, event
        summary["losses"].append(loss_v)
        summary["step_seconds"].append(seconds)
        for key, value in (("loss", loss_v), ("lm", lm_v), ("kl", kl_v), ("hidden", hidden_v), ("steps", 1),
                           ("seconds", seconds)):
            interval[key] += value
        rate = tokens_per_step / seconds
        clock["ema"] = rate if clock["ema"] is None else 0.9 * clock["ema"] + 0.1 * rate
        postfix = {"loss": f"{loss_v:.4f}", "tok/s": f"{clock['ema']:,.0f}"}
        if peak:
            postfix["mfu"] = f"{flops_per_token * clock['ema'] / (peak * ctx.world):.1%}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if step_done % cfg.log_every == 0 or step_done == end_step:
            n = interval["steps"]
            rate = n * tokens_per_step / interval["seconds"]
            record = {"step": step_done, "loss": interval["loss"] / n, "lm_loss": interval["lm"] / n,
                      "lr": done["lr"], "grad_norm": norm_v, "tokens": done["tokens"], "tokens_per_s": rate,
                      "mfu": flops_per_token * rate / (peak * ctx.world) if peak else None}
            if teacher is not None:
                record["kl"] = interval["kl"] / n
            if run.engine.hidden_weight:
                record["hidden"] = interval["hidden"] / n
            metrics.log(record)
            interval.update(dict.fromkeys(interval, 0.0))
        return bool(stop_v)

    step, pending = start_step, None
    try:
        with _stop_on_signals(run):
            while step < end_step:
                batch = next(batches)  # (per_rank, T)
                if device.type == "cuda":  # a copy from pinned memory does not wait for the queued GPU work
                    batch = batch.pin_memory()
                batch = batch.to(device, non_blocking=True)
                totals = torch.zeros(4, device=device)  # loss, lm, kl, hidden of this step
                for i, micro in enumerate(batch.split(cfg.micro_batch_size)):
                    last = i == cfg.grad_accum - 1
                    with _sync_context(run, last), autocast():
                        loss, lm, kl, dist_h = run.step_fn(micro)
                    (loss / cfg.grad_accum).backward()
                    totals += torch.stack([loss.detach(), lm, kl, dist_h]).float() / cfg.grad_accum
                if hooks.after_backward:
                    hooks.after_backward(step + 1, run.model)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                flag = torch.tensor([float(run.stop_signal is not None)], device=device)
                packed = torch.cat([totals, grad_norm.detach().float().reshape(1).to(device), flag])
                if ctx.world > 1:
                    dist.all_reduce(packed)
                    packed[:5] /= ctx.world  # means of loss, lm, kl, hidden, gradient norm; the stop flag sums
                lr = run.optimizer.param_groups[0]["lr"]
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
                event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
                if event is not None:
                    event.record()  # this step's GPU work is done when the stream reaches it
                step += 1
                run.samples_seen += per_rank * ctx.world
                run.tokens_seen += tokens_per_step
                if hooks.after_step:
                    hooks.after_step(step, run.model)

                stop = finish(pending) if pending is not None else False
                stop = stop or (ctx.world == 1 and run.stop_signal is not None)  # several ranks: agreed flag only
                pending = {"step": step, "packed": packed, "lr": lr, "tokens": run.tokens_seen, "event": event}
                evaluate = val_ds is not None and (step == run.total_steps or
                                                   (cfg.eval_every and step % cfg.eval_every == 0))
                save = stop or step == end_step or (cfg.save_every and step % cfg.save_every == 0)
                if evaluate or save:
                    stop = finish(pending) or stop  # every rank reads the same all-reduced flag
                    pending = None
                    save = save or stop
                if evaluate:
                    result = _evaluate(run, val_ds, autocast)
                    if result:
                        metrics.log({"step": step, **result})
                        summary.update(result)
                        if ctx.main:
                            (bar.write if cfg.progress else logger.info)(
                                f"step {step}: val loss {result['val_loss']:.4f}, ppl {result['val_ppl']:.2f}")
                if save:
                    _save_checkpoint(run, step)
                if stop:
                    summary["interrupted"] = True
                    summary["stop_signal"] = run.stop_signal
                    break
    finally:
        bar.close()
        metrics.close()

    summary.update(steps=step, tokens=run.tokens_seen, final_loss=summary["losses"][-1] if summary["losses"] else None,
                   checkpoint=str(run.last_checkpoint[1]) if run.last_checkpoint else None)
    if step < run.total_steps:
        summary["interrupted"] = True
        if ctx.main:
            logger.warning("stopped after step %d of %d; continue with --resume", step, run.total_steps)
    else:
        model_state = _full_model_state(run.engine, run.fsdp)
        if ctx.main:
            _save_model(run.model, out, model_state, run.tokenizer_files)
        ctx.barrier()
    summary["seconds"] = time.perf_counter() - started
    steady = summary["step_seconds"][min(len(summary["step_seconds"]) - 1, 3):] if summary["step_seconds"] else []
    if steady:
        summary["tokens_per_s"] = tokens_per_step * len(steady) / sum(steady)
        peak_all = peak * ctx.world if peak else None
        summary["mfu"] = flops_per_token * summary["tokens_per_s"] / peak_all if peak_all else None
    return summary


# ---- command line ---------------------------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``mlkv train`` (dest names = ``TrainConfig`` fields)."""
    d = TrainConfig(model="", out="")
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", required=True,
                   help="checkpoint dir (uptraining), config.json / dir with one, or preset "
                        f"({', '.join(sorted(PRESETS))}) (pretraining, random init)")
    g.add_argument("--plan", help="K/V sharing plan for a random init (e.g. mlkv-6, gqa-48, mqa)")
    g.add_argument("--data", nargs="+", default=[], help="training sources: files, folders, hf:<dataset>[@split]")
    g.add_argument("--val-data", nargs="+", help="validation sources (default: none, or --val-fraction)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="hold out this fraction of training documents for validation")
    g.add_argument("--tokenizer", help="tokenizer.json or a folder with one (default: the --model folder's)")
    g.add_argument("--cache-dir", help="token cache folder (default $MLKV_CACHE or ~/.cache/mlkv/tokens)")
    g.add_argument("--text-field", default=d.text_field)
    g.add_argument("--max-documents", type=int, help="read at most this many documents")
    g.add_argument("--max-data-tokens", help="tokenize at most this many tokens (e.g. 50M)")
    g.add_argument("--out", required=True, help="output folder: metrics, checkpoint, final model")
    g = parser.add_argument_group("budget and batch")
    g.add_argument("--tokens", help="training tokens, e.g. 20M, 1.5B (or --steps)")
    g.add_argument("--steps", type=int, help="optimizer steps (or --tokens)")
    g.add_argument("--stop-after-steps", type=int,
                   help="stop with a checkpoint after this step, keeping the full run's schedule (resume later)")
    g.add_argument("--seq-len", type=int, default=d.seq_len)
    g.add_argument("--micro-batch-size", "--batch-size", type=int, default=d.micro_batch_size,
                   help="sequences per GPU per micro-step")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-steps per optimizer step")
    g = parser.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="cosine floor as a fraction of --lr (0 = HF Trainer's cosine)")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--beta1", type=float, default=d.beta1)
    g.add_argument("--beta2", type=float, default=d.beta2)
    g.add_argument("--adam-eps", type=float, default=d.adam_eps)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="global gradient-norm clip (0 = off)")
    g = parser.add_argument_group("objective")
    g.add_argument("--objective", choices=OBJECTIVES, default=d.objective)
    g.add_argument("--teacher", help="distillation teacher: the original, unconverted checkpoint dir")
    g.add_argument("--distill-temperature", type=float, default=d.distill_temperature)
    g.add_argument("--distill-alpha", type=float, default=d.distill_alpha,
                   help="loss = alpha * T^2 * KL + (1 - alpha) * lm [+ hidden * layer-wise distance]")
    g.add_argument("--distill-hidden", type=float, default=d.distill_hidden,
                   help="weight of the layer-wise hidden-state distance to the teacher (mean over layers of "
                        "|h_s - h_t|^2 / |h_t|^2; default %(default)s); 0 = logits only")
    g.add_argument("--loss-chunk-tokens", type=int,
                   help=f"tokens per logits/loss chunk (0 = whole batch; default {DEFAULT_CHUNK_TOKENS} for "
                        "distill, 0 for lm)")
    g = parser.add_argument_group("execution")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto: bf16 autocast on CUDA (fp32 matmuls outside autocast use TF32), fp32 on CPU; "
                        "fp32 turns TF32 off")
    g.add_argument("--sdpa-backend", choices=SDPA_BACKENDS, default=d.sdpa_backend,
                   help="attention kernel preferred on CUDA (auto: PyTorch's order)")
    g.add_argument("--compile", action="store_true", help="torch.compile each decoder layer and the loss")
    g.add_argument("--activation-checkpointing", action="store_true")
    g.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP under torchrun")
    g.add_argument("--device", help="default: cuda:LOCAL_RANK if available, else cpu")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--peak-tflops", type=float, help="per-GPU peak for MFU (default: known cards' dense bf16)")
    g = parser.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="0 = only at the end")
    g.add_argument("--eval-batches", type=int, default=d.eval_batches)
    g.add_argument("--save-every", type=int, default=d.save_every, help="0 = only at the end / on a signal")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on when the tensorboard package is installed")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                          if hasattr(args, f.name)})


def run_train_command(args: argparse.Namespace) -> int:
    """Train a model (pretraining from a config/preset, uptraining or distillation from a checkpoint).

    The ``mlkv train`` command: prints a JSON summary on rank 0 and returns the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = train(config_from_args(args))
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        brief = {k: v for k, v in summary.items() if k not in ("losses", "step_seconds", "data")}
        print(json.dumps(brief))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlkv train", description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    return run_train_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
