"""What an evaluation records about its model: name, type, dtype, parameters, device and KV cache size.

``describe_model`` fills the model fields of a result's ``"mlkv"`` section; ``kv_cache_info`` gives the KV cache
size of any Hugging Face config (MLKV's shared layers included), which is what the paper's tables compare.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlkv.model.sharing import SharingPlan

if TYPE_CHECKING:
    import torch


def model_device(model) -> torch.device:
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device


def kv_cache_info(config, dtype: str | torch.dtype = "fp16") -> dict[str, Any]:
    """KV cache size of a model config: producer layers x KV heads x head_dim x 2 (K and V) x bytes per value.

    MLKV configs give ``kv_source_layers`` (layers that read another layer's KV cost nothing); any other HF config
    counts every layer, with ``num_key_value_heads`` (default: all heads) and ``head_dim`` (default:
    ``hidden_size / num_attention_heads``).
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    sources = getattr(config, "kv_source_layers", None) or list(range(config.num_hidden_layers))
    plan = SharingPlan(tuple(sources), kv_heads, heads)
    return {
        "layers": plan.num_layers,
        "kv_layers": plan.num_producers,
        "kv_heads_per_layer": kv_heads,
        "total_kv_heads": plan.total_kv_heads,
        "head_dim": head_dim,
        "structure": plan.structure,
        "dtype": str(dtype),
        "bytes_per_token": plan.kv_bytes_per_token(head_dim, dtype),
    }


def describe_model(model, source: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``"mlkv"`` section's model fields: name, path, type, dtype, parameters and KV cache size."""
    path = str(source) if source is not None else getattr(model, "name_or_path", "") or ""
    name = (Path(path).resolve().name if Path(path).exists() else Path(path).name) if path else ""
    return {
        "model": path,
        "name": name or type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "dtype": str(getattr(model, "dtype", "")).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "kv_cache": kv_cache_info(model.config),
    }
