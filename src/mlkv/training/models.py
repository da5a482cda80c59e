"""What a run trains and learns from: the student (``--model``: a checkpoint, a config or a preset), the teacher
of distillation, and the tokenizer, with the checks that they fit together.

``--model`` is a checkpoint directory (config.json + weights: uptraining, loaded through
``mlkv.model.loading.load_model``), a directory or file holding only a config.json, or a preset name of
``mlkv.PRESETS`` (random init from ``--seed``; ``--plan`` picks the K/V sharing plan).
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mlkv import PRESETS, MLKVConfig, preset_config
from mlkv.checkpoints import TOKENIZER_FILES, has_weights, require_checkpoint
from mlkv.model.config_file import read_model_config
from mlkv.errors import UsageError
from mlkv.model.loading import load_model
from mlkv.model.provenance import RECORDS

__all__ = ["load_student", "load_teacher", "load_trained", "model_config", "weight_bytes", "check_seq_len",
           "resolve_tokenizer", "check_vocab", "check_teacher_shape"]


#: Files that a saved model (or a run's output folder) holds beside config.json and a bare config does not.
SAVED_WITH_WEIGHTS = TOKENIZER_FILES + ("generation_config.json", "metrics.jsonl", "checkpoint") + RECORDS


class UnreadableModelError(UsageError):
    """A model folder whose config or weights cannot be read; the message names the files."""


#: What to do about a model folder that cannot be read.
REWRITE = "write it again with the command that made it"


def _unreadable(what: str, folder: Path, exc: Exception, fix: str) -> UnreadableModelError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, StrictDataclassError):  # its first line only names the field; the next says what is wrong
        reason = " ".join(str(exc).split())
    if type(exc).__name__ == "SafetensorError":
        files = ", ".join(sorted(p.name for p in folder.glob("*.safetensors")))
        return UnreadableModelError(f"{what} {folder}: its weights ({files}) cannot be read ({reason}): a file is "
                                    f"truncated or corrupt; {fix}")
    return UnreadableModelError(f"{what} {folder}: cannot be loaded ({type(exc).__name__}: {reason}); check its "
                                f"config.json and weights, or {fix}")


def _load(folder: str | Path, what: str, device: str | torch.device, dtype: torch.dtype,
          fix: str = REWRITE) -> nn.Module:
    """A checkpoint's model; a config or weights file that cannot be read is an ``UnreadableModelError`` naming
    ``what`` and the files, and saying ``fix``."""
    require_checkpoint(folder, what)
    try:
        return load_model(folder, device, dtype, with_tokenizer=False)[0]
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, StrictDataclassError) as exc:
        raise _unreadable(what, Path(folder), exc, fix) from exc
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":
            raise _unreadable(what, Path(folder), exc, fix) from exc
        raise


def load_trained(folder: str | Path, what: str = "--model", fix: str = REWRITE) -> nn.Module:
    """A checkpoint's model in float32 on the CPU (the weights training starts from)."""
    return _load(folder, what, "cpu", torch.float32, fix)


def model_config(spec: str):
    """The config of ``--model`` without its weights (a checkpoint or config folder, a config file, a preset), or
    None when ``spec`` is none of them (``load_student`` then says so)."""
    path = Path(spec).expanduser()
    if path.is_file() or (path / "config.json").is_file():
        read_model_config(path if path.is_file() else path / "config.json")  # no size: an error, not 768 wide
        try:
            return AutoConfig.from_pretrained(path)
        except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as exc:
            raise _unreadable("--model", path, exc, REWRITE) from exc
    return preset_config(spec) if spec in PRESETS else None


def weight_bytes(spec: str, plan: str | None = None) -> int | None:
    """Bytes of ``--model``'s weights in float32 (what a run saves), from its config alone (a model on the meta
    device: nothing allocated), or None when ``spec`` is no config, checkpoint or preset."""
    config = model_config(spec)
    if config is None:
        return None
    if plan is not None and isinstance(config, MLKVConfig):
        config = config.with_plan(plan)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return 4 * sum(p.numel() for p in model.parameters())


def check_seq_len(seq_len: int, spec: str) -> None:
    """``--seq-len`` must fit the model's positions (checked from its config, before anything is loaded)."""
    config = model_config(spec)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise UsageError(f"--seq-len {seq_len} is above the model's max_position_embeddings ({limit}, {spec}): "
                         f"use --seq-len {limit} or less")


def load_student(spec: str, plan: str | None = None, seed: int = 0) -> tuple[nn.Module, str]:
    """The model to train and how it was made: ``"checkpoint"`` (uptraining) or ``"random"`` (pretraining).

    A folder with a config.json but no weights is a config to pretrain from only when it holds nothing else of a
    model: with a tokenizer, generation or run files beside it, it is a checkpoint whose save was interrupted, an
    error (``mlkv.checkpoints.require_checkpoint``) rather than a random init."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {spec}: the directory has no config.json")
        if any((path / name).exists() for name in SAVED_WITH_WEIGHTS):
            require_checkpoint(path, "--model")
        if has_weights(path):
            if plan is not None:
                raise ValueError(f"--plan applies to a random init from a config or preset; {spec} is a trained "
                                 "checkpoint: change its sharing plan with `mlkv convert` first")
            return load_trained(path), "checkpoint"
        config = model_config(spec)
    elif path.is_file() or spec in PRESETS:
        config = model_config(spec)
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
    return _load(spec, "--teacher", device, dtype).eval().requires_grad_(False)


def resolve_tokenizer(tokenizer: str | None, model: str) -> str | None:
    """``--tokenizer`` if given (it must exist), else the ``--model`` folder if it holds a tokenizer.json; either
    read once, so that a corrupt one is a ``TokenizerFileError`` naming it before anything else loads."""
    from mlkv.data import load_tokenizer

    if tokenizer:
        path = Path(tokenizer).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no such file or directory")
        load_tokenizer(path)  # a corrupt file is named now, before the model loads
        return str(path)
    folder = Path(model).expanduser()
    if folder.is_dir() and (folder / "tokenizer.json").is_file():
        load_tokenizer(folder)
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


def check_teacher_shape(teacher: str, model: str, distill_hidden: float) -> None:
    """The hidden-state term (``--distill-hidden``) needs a teacher of the student's depth and width (checked from
    the two configs, before either model loads)."""
    configs = [model_config(spec) for spec in (teacher, model)]
    if not distill_hidden or None in configs:  # a missing model is named when it loads
        return
    shapes = [(c.num_hidden_layers, c.hidden_size) for c in configs]
    if shapes[0] != shapes[1]:
        raise ValueError(f"--distill-hidden {distill_hidden:g} needs a teacher of the student's depth and "
                         f"width: the teacher has {shapes[0][0]} layers of {shapes[0][1]}, the student "
                         f"{shapes[1][0]} of {shapes[1][1]} (use --distill-hidden 0 to distill from the logits "
                         "only)")
