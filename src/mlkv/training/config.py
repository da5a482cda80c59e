"""The settings of a training run: ``TrainConfig`` (one field per ``mlkv train`` flag, its help the docstring under
it), ``TrainHooks`` (callbacks for tests and tools), ``parse_tokens`` and ``check_config`` (the errors a user can fix,
raised before anything is loaded)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlkv.devices import check_device
from mlkv.errors import require_extra
from mlkv.settings import setting

if TYPE_CHECKING:
    from torch import nn

__all__ = ["TrainConfig", "TrainHooks", "parse_tokens", "check_config", "OBJECTIVES", "SDPA_BACKENDS", "PRECISIONS",
           "DEFAULT_CHUNK_TOKENS"]

OBJECTIVES = ("lm", "distill")
LM_LOSSES = ("torch", "liger")
#: ``--sdpa-backend``: the SDPA kernel tried first on CUDA (the others follow as fallbacks); ``auto`` keeps
#: PyTorch's order (cuDNN first on Hopper: 1.18 ms vs flash's 1.85 ms for a causal fwd+bwd of 16x12x2048x64 on H200).
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
PRECISIONS = ("auto", "bf16", "fp32")
#: Tokens per loss chunk for distillation when ``loss_chunk_tokens`` is not given, and always for evaluation.
DEFAULT_CHUNK_TOKENS = 16384
TOKEN_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}

DATA, BUDGET, OPTIMIZER, OBJECTIVE, EXECUTION, LOGGING = (
    "model and data", "budget and batch", "optimizer", "objective", "execution", "logging and checkpoints")


@dataclass
class TrainConfig:
    """Every setting of a training run; the CLI flags have the same names (``micro_batch_size`` is
    ``--micro-batch-size``). ``tokens`` may be a string with a K/M/B/T suffix."""

    # ---- model and data
    model: str = setting(group=DATA)
    """checkpoint dir (uptraining), config.json / dir with one, or the name of a preset in mlkv.PRESETS such as
    pythia-160m (pretraining, random init)"""
    out: str = setting(group=DATA)
    """output folder: metrics, checkpoint, final model"""
    data: list[str] = setting(default_factory=list, group=DATA)
    """training sources: files, folders, hf:<dataset>[@split]"""
    plan: str | None = setting(None, group=DATA)
    """K/V sharing plan for a random init (e.g. mlkv-6, gqa-48, mqa)"""
    tokenizer: str | None = setting(None, group=DATA)
    """tokenizer.json or a folder with one (default: the --model folder's)"""
    val_data: list[str] | None = setting(None, group=DATA)
    """validation sources (default: none, or --val-fraction)"""
    val_fraction: float = setting(0.0, group=DATA)
    """hold out this fraction of training documents for validation"""
    cache_dir: str | None = setting(None, group=DATA)
    """token cache folder (default $MLKV_CACHE or ~/.cache/mlkv/tokens)"""
    text_field: str = setting("text", group=DATA)
    """the field (JSON key, parquet or dataset column) that holds each document's text"""
    max_documents: int | None = setting(None, group=DATA)
    """read at most this many documents"""
    max_data_tokens: int | str | None = setting(None, group=DATA)
    """tokenize at most this many tokens (e.g. 50M)"""
    allow_bad_text: bool = setting(False, group=DATA)
    """train on what decodes of a .txt/.jsonl file of which more than 1 in 100 characters (lines) are undecodable
    or binary (default: such a file is an error naming it)"""

    # ---- budget and batch
    seq_len: int = setting(2048, group=BUDGET)
    """tokens per training sequence (the data is packed into sequences of this length)"""
    micro_batch_size: int = setting(8, aliases=("--batch-size",), group=BUDGET)
    """sequences per GPU per micro-step"""
    grad_accum: int = setting(1, group=BUDGET)
    """micro-steps per optimizer step"""
    tokens: int | str | None = setting(None, group=BUDGET)
    """training tokens, e.g. 20M, 1.5B (or --steps)"""
    steps: int | None = setting(None, group=BUDGET)
    """optimizer steps (or --tokens)"""
    stop_after_steps: int | None = setting(None, group=BUDGET)
    """stop with a checkpoint after this step, keeping the full run's schedule (resume later)"""

    # ---- optimizer
    lr: float = setting(6e-4, group=OPTIMIZER)
    """peak learning rate of AdamW, reached at the end of the warmup"""
    min_lr_ratio: float = setting(0.1, group=OPTIMIZER)
    """cosine floor as a fraction of --lr (0 = HF Trainer's cosine)"""
    warmup_ratio: float = setting(0.2, group=OPTIMIZER)
    """fraction of the optimizer steps spent in the linear warmup (ceil(ratio * steps) steps)"""
    weight_decay: float = setting(0.01, group=OPTIMIZER)
    """AdamW weight decay, on parameters with 2 or more dimensions (matrices and embeddings, not biases or norms)"""
    beta1: float = setting(0.9, group=OPTIMIZER)
    """AdamW beta1: decay of the gradient's running mean"""
    beta2: float = setting(0.95, group=OPTIMIZER)
    """AdamW beta2: decay of the squared gradient's running mean"""
    adam_eps: float = setting(1e-8, group=OPTIMIZER)
    """AdamW epsilon, added to the root of the squared gradient's mean"""
    grad_clip: float = setting(1.0, group=OPTIMIZER)
    """global gradient-norm clip (0 = off)"""

    # ---- objective
    objective: str = setting("lm", choices=OBJECTIVES, group=OBJECTIVE)
    """lm: next-token cross-entropy; distill: KL to the --teacher's distribution (see --distill-alpha)"""
    teacher: str | None = setting(None, group=OBJECTIVE)
    """distillation teacher: the original, unconverted checkpoint dir"""
    distill_temperature: float = setting(1.0, group=OBJECTIVE)
    """temperature T of the teacher's and the student's distributions in the KL"""
    distill_alpha: float = setting(1.0, group=OBJECTIVE)
    """loss = alpha * T^2 * KL + (1 - alpha) * lm [+ hidden * layer-wise distance]"""
    distill_hidden: float = setting(10.0, group=OBJECTIVE)  # benchmarks/results/distill_variants_h200
    """weight of the layer-wise hidden-state distance to the teacher (mean over layers of |h_s - h_t|^2 / |h_t|^2;
    default %(default)s); 0 = logits only"""
    loss_chunk_tokens: int | None = setting(None, group=OBJECTIVE)
    """tokens per logits/loss chunk (0 = whole batch; default 16384 for distill, 0 for lm)"""
    lm_loss: str = setting("torch", choices=LM_LOSSES, group=OBJECTIVE)
    """how the lm objective's cross-entropy is computed: torch (the LM head's logits, then cross-entropy, in
    --loss-chunk-tokens chunks) or liger (liger-kernel's fused linear cross-entropy: the logits are never held
    whole; CUDA only, pip install 'mlkv[liger]')"""

    # ---- execution
    precision: str = setting("auto", choices=PRECISIONS, group=EXECUTION)
    """auto: bf16 autocast on CUDA (fp32 matmuls outside autocast use TF32), fp32 on CPU; fp32 turns TF32 off"""
    sdpa_backend: str = setting("auto", choices=SDPA_BACKENDS, group=EXECUTION)
    """attention kernel preferred on CUDA (auto: PyTorch's order)"""
    compile: bool | None = setting(None, group=EXECUTION)
    """torch.compile each decoder layer (the teacher's too) and the loss (default: on CUDA, off on CPU)"""
    activation_checkpointing: bool = setting(False, group=EXECUTION)
    """recompute each decoder layer's activations in the backward pass (less memory, more compute)"""
    fsdp: bool = setting(False, group=EXECUTION)
    """FSDP2 fully_shard instead of DDP under torchrun"""
    device: str | None = setting(None, group=EXECUTION)
    """default: cuda:LOCAL_RANK if available, else cpu"""
    seed: int = setting(0, group=EXECUTION)
    """seed of the random init, the data order and split, and dropout"""
    peak_tflops: float | None = setting(None, group=EXECUTION)
    """per-GPU peak for MFU (default: known cards' dense bf16)"""

    # ---- logging and checkpoints
    log_every: int = setting(10, group=LOGGING)
    """write a metrics.jsonl record (means over the steps since the last one) every this many steps"""
    eval_every: int = setting(500, group=LOGGING)
    """evaluate on the validation data every this many steps (0 = only at the end)"""
    eval_batches: int | None = setting(100, group=LOGGING)
    """validation batches (of --micro-batch-size sequences per process) per evaluation, at most"""
    save_every: int = setting(1000, group=LOGGING)
    """write a checkpoint every this many steps (0 = only at the end / on a signal)"""
    resume: bool = setting(False, group=LOGGING)
    """continue from OUT/checkpoint (the newest intact one; every setting that defines the run must be the same)"""
    overwrite: bool = setting(False, group=LOGGING)
    """write the run into an OUT that holds another model, other files or an earlier run's checkpoint: the
    earlier checkpoint and metrics are removed at the start, an earlier model is replaced when this run's is saved"""
    progress: bool = setting(True, group=LOGGING)
    """show a progress bar (rank 0; --no-progress: none)"""
    tensorboard: bool | None = setting(None, group=LOGGING)
    """default: on when the tensorboard package is installed"""


@dataclass
class TrainHooks:
    """Callbacks for tests and tools. ``after_backward(step, model)``: gradients of optimizer step ``step``
    (1-based) are complete and synchronised across ranks, not yet clipped. ``after_step(step, model)``: after the
    optimizer step. ``model`` is the Hugging Face model (FSDP-sharded under ``--fsdp``)."""

    after_backward: Callable[[int, nn.Module], None] | None = None
    after_step: Callable[[int, nn.Module], None] | None = None


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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_config(cfg: TrainConfig, have_datasets: bool) -> None:
    """Errors a user can fix, raised before anything is loaded."""
    _check_finite(cfg)
    _check_objective(cfg)
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
    _check_optimizer(cfg)
    check_device(cfg.device)
    if not have_datasets and not cfg.data:
        raise ValueError("no training data: pass --data (files, folders or hf:<dataset> sources)")


def _check_finite(cfg: TrainConfig) -> None:
    """NaN or inf passes every range check below (each comparison is false), so refuse them first."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{_flag(f.name)} must be a finite number, got {value}")


def _check_objective(cfg: TrainConfig) -> None:
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
    _check_lm_loss(cfg)


def _check_lm_loss(cfg: TrainConfig) -> None:
    if cfg.lm_loss not in LM_LOSSES:
        raise ValueError(f"--lm-loss {cfg.lm_loss!r} is unknown; choose one of {LM_LOSSES}")
    if cfg.lm_loss == "torch":
        return
    if cfg.objective != "lm":
        raise ValueError(f"--lm-loss {cfg.lm_loss} computes the lm objective only; distill needs both models' "
                         "logits (use --lm-loss torch)")
    if (cfg.device is not None and not str(cfg.device).startswith("cuda")) or not _cuda_available():
        raise ValueError(f"--lm-loss {cfg.lm_loss} needs CUDA (liger-kernel's Triton kernels); use --lm-loss torch")
    require_extra("liger_kernel", f"--lm-loss {cfg.lm_loss}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_optimizer(cfg: TrainConfig) -> None:
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ValueError(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    for name in ("grad_clip", "weight_decay", "adam_eps"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"{_flag(name)} must be in [0, 1), got {getattr(cfg, name)}")
