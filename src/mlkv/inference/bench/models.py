"""Which model the benchmark times: a preset, a checkpoint or config folder, a GGUF file, or a given model, and the
model of each sharing plan built from it (the loaded weights for the source's own plan, else random weights).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mlkv.checkpoints import has_weights
from mlkv.model.config import PRESETS, MLKVConfig, preset_config
from mlkv.model.loading import load_model
from mlkv.model.modeling import MLKVForCausalLM

__all__ = ["resolve_model", "gguf_model", "build_model", "plan_label"]


def resolve_model(model_or_preset) -> tuple[MLKVConfig, MLKVForCausalLM | Path | None, str]:
    """``(config, loaded, description)`` from a preset name, a directory, a ``.gguf`` file or known GGUF name
    (``smollm2``), a config or a model; ``loaded`` is the given or converted model, a checkpoint folder with
    weights, or ``None`` (random weights of the config's shape)."""
    if isinstance(model_or_preset, MLKVForCausalLM):
        return model_or_preset.config, model_or_preset, "given model"
    if isinstance(model_or_preset, MLKVConfig):
        return model_or_preset, None, "given config"
    name = str(model_or_preset)
    if name in PRESETS:
        return preset_config(name), None, f"preset {name}"
    from mlkv.model.gguf import is_gguf

    if is_gguf(name):
        return gguf_model(name)
    path = Path(name)
    if path.is_dir():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        if not isinstance(config, MLKVConfig):
            raise ValueError(f"{path} holds a {type(config).__name__}, not an mlkv model: convert it first")
        if not has_weights(path):  # a config alone: its shape, random weights (speed does not care)
            return config, None, f"config {path} (no weights: random)"
        return config, path, f"checkpoint {path}"
    raise ValueError(f"model ({name!r}) is neither a preset ({', '.join(sorted(PRESETS))}), a .gguf file or known "
                     f"GGUF name (smollm2), nor a directory")


def gguf_model(spec: str) -> tuple[MLKVConfig, MLKVForCausalLM, str]:
    """A GGUF model (a ``.gguf`` path or a known name such as ``smollm2``) converted in memory as it is: dequantized
    into a Hugging Face folder (``mlkv.model.convert.hf_source``: the cache, or a temporary folder), then
    ``convert_state`` with its own plan (``mha`` keeps the source's K/V heads: 30x3 on SmolLM2), so that the
    benchmark times the real weights."""
    import tempfile

    from mlkv.model.convert import build_model as build_converted
    from mlkv.model.convert import convert_state, hf_source

    with tempfile.TemporaryDirectory(prefix="mlkv-bench-gguf-") as tmp, hf_source(spec, Path(tmp)) as folder:
        state, config = convert_state(folder, "mha")
    model = build_converted(state, config).eval()
    return config, model, f"GGUF {spec} (dequantized, converted as it is: {config.sharing.structure})"


def plan_label(plan) -> str:
    return plan.name or plan.structure


def build_model(config: MLKVConfig, loaded, plan, device, dtype, seed: int) -> tuple[MLKVForCausalLM, str]:
    """``(model, weights description)`` for ``plan``: the loaded weights when the plan is the checkpoint's own,
    else random weights (transformers' init, seeded). Set up for fixed-length generation (no eos)."""
    same = tuple(config.kv_source_layers) == plan.kv_source_layers and config.num_key_value_heads == \
        plan.num_key_value_heads
    if isinstance(loaded, MLKVForCausalLM) and same:
        model, weights = loaded.to(device=device, dtype=dtype), "given model"
    elif isinstance(loaded, Path) and same:
        model, _ = load_model(loaded, device, dtype, with_tokenizer=False)
        weights = f"checkpoint {loaded}"
    else:
        torch.manual_seed(seed)
        with torch.device(device):
            model = MLKVForCausalLM(config.with_plan(plan)).to(dtype)
        weights = "random (transformers init)"
    model.eval()
    model.generation_config.eos_token_id = None  # fixed-length generation for timing
    model.generation_config.pad_token_id = 0
    return model, weights
