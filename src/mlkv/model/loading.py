"""Loading a model: any ``AutoModelForCausalLM`` checkpoint folder (mlkv's included) with its tokenizer, and the dtype
and device names the commands accept.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mlkv.checkpoints import require_checkpoint

#: Names accepted for a dtype on the command line and in settings.
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def parse_dtype(value: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; a ``torch.dtype`` passes through. ``what`` names the flag in the error."""
    if isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"{what} ({value!r}) must be one of {', '.join(sorted(DTYPES))}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_dir: str | os.PathLike, device: str | None = None, dtype: str | torch.dtype | None = None,
               tokenizer: str | os.PathLike | None = None, with_tokenizer: bool = True):
    """``(model, tokenizer)`` from a checkpoint folder (any ``AutoModelForCausalLM`` one, mlkv's included).

    ``dtype`` None means float32 on CPU and the checkpoint's own dtype elsewhere; ``tokenizer`` defaults to the
    checkpoint folder; ``with_tokenizer=False`` returns ``(model, None)``. The config and the tokenizer are read
    before the weights, so that a bad one is named before the weights load.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    import mlkv  # noqa: F401  (registers MLKVConfig / MLKVForCausalLM with the Auto classes)
    from mlkv.model.config_file import read_model_config

    model_dir = require_checkpoint(model_dir)
    read_model_config(model_dir / "config.json")
    config = AutoConfig.from_pretrained(model_dir)
    tok = _load_tokenizer(Path(tokenizer) if tokenizer else model_dir, config.eos_token_id) if with_tokenizer else None
    device = device or default_device()
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else "auto"
    elif dtype != "auto":
        dtype = parse_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype).to(device).eval()
    return model, tok


def _load_tokenizer(source: Path, eos: int | list[int] | None):
    from mlkv.data.tokenizer import TokenizerFileError, load_hf_tokenizer

    try:
        return load_hf_tokenizer(source, eos[0] if isinstance(eos, list) else eos)
    except TokenizerFileError:
        raise
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"no tokenizer found in {source} (save one with the checkpoint or pass --tokenizer): {exc}"
        ) from exc
