"""What a run trains and learns from: the student (``--model``: a checkpoint, a config or a preset), the teacher
of distillation, and the tokenizer, with the checks that they fit together.

``--model`` is a checkpoint directory (config.json + weights: uptraining, loaded through
``mlkv.checkpoints.load_model``), a directory or file holding only a config.json, or a preset name of
``mlkv.PRESETS`` (random init from ``--seed``; ``--plan`` picks the K/V sharing plan).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mlkv import PRESETS, MLKVConfig, preset_config
from mlkv.checkpoints import has_weights, load_model, require_checkpoint

__all__ = ["load_student", "load_teacher", "load_trained", "resolve_tokenizer", "check_vocab", "check_teacher_shape"]


def load_trained(folder: str | Path) -> nn.Module:
    """A checkpoint's model in float32 on the CPU (the weights training starts from)."""
    return load_model(folder, "cpu", torch.float32, with_tokenizer=False)[0]


def load_student(spec: str, plan: str | None = None, seed: int = 0) -> tuple[nn.Module, str]:
    """The model to train and how it was made: ``"checkpoint"`` (uptraining) or ``"random"`` (pretraining)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {spec}: the directory has no config.json")
        if has_weights(path):
            if plan is not None:
                raise ValueError(f"--plan applies to a random init from a config or preset; {spec} is a trained "
                                 "checkpoint: change its sharing plan with `mlkv convert` first")
            return load_trained(path), "checkpoint"
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
    """The distillation teacher on ``device`` in ``dtype``, frozen and in eval mode."""
    require_checkpoint(spec, "--teacher")
    teacher = load_model(spec, device, dtype, with_tokenizer=False)[0]
    return teacher.eval().requires_grad_(False)


def resolve_tokenizer(tokenizer: str | None, model: str) -> str | None:
    """``--tokenizer`` if given (it must exist), else the ``--model`` folder if it holds a tokenizer.json."""
    if tokenizer:
        path = Path(tokenizer).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no such file or directory")
        return str(path)
    folder = Path(model).expanduser()
    if folder.is_dir() and (folder / "tokenizer.json").is_file():
        return str(folder)
    return None


def check_vocab(model: nn.Module, tokenizer: str | None, teacher: nn.Module | None) -> None:
    """The tokenizer's ids fit the model's vocabulary, and the teacher's vocabulary is the student's."""
    vocab = model.get_output_embeddings().weight.shape[0]
    if tokenizer is not None:
        from mlkv.data import load_tokenizer

        size = load_tokenizer(tokenizer).get_vocab_size(with_added_tokens=True)
        if size > vocab:
            raise ValueError(f"the tokenizer has {size} tokens but the model's vocab_size is {vocab}")
    if teacher is not None and teacher.get_output_embeddings().weight.shape[0] != vocab:
        raise ValueError(f"teacher vocab ({teacher.get_output_embeddings().weight.shape[0]}) differs from the "
                         f"student's ({vocab})")


def check_teacher_shape(teacher: nn.Module, model: nn.Module, distill_hidden: float) -> None:
    """The hidden-state term (``--distill-hidden``) needs a teacher of the student's depth and width."""
    shapes = [(m.config.num_hidden_layers, m.config.hidden_size) for m in (teacher, model)]
    if distill_hidden and shapes[0] != shapes[1]:
        raise ValueError(f"--distill-hidden {distill_hidden:g} needs a teacher of the student's depth and "
                         f"width: the teacher has {shapes[0][0]} layers of {shapes[0][1]}, the student "
                         f"{shapes[1][0]} of {shapes[1][1]} (use --distill-hidden 0 to distill from the logits "
                         "only)")
