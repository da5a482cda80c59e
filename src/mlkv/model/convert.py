"""Convert a trained Hugging Face checkpoint (GPT-NeoX/Pythia, Llama, Qwen2, Mistral) to an MLKV checkpoint.

Steps (the uptraining initialisation of the MLKV paper):

1. Rename every source tensor to mlkv's names (weight maps below, as dict literals). GPT-NeoX's fused
   ``query_key_value`` is laid out per head as [heads, 3, head_dim, hidden] and is split into q/k/v.
2. In-layer pooling: each group of K/V heads that becomes one head is replaced by the group's mean.
3. Cross-layer folding: each producer's K/V becomes a combination of the layers it serves (``init``):
   ``pairwise`` (default: the reference code's running average in layer order: for layers p, p+1, p+2 it gives
   W_p/4 + W_{p+1}/4 + W_{p+2}/2), ``mean`` (uniform mean) or ``first`` (the producer's own pooled K/V).
4. Optionally (``keep_params``) widen every MLP to give back the removed K/V parameters, as the paper did. The new
   neurons get random input weights and *zero* output weights, so the converted model computes exactly the same
   function before training (the paper copied neurons, which changed the output).

Every source key is accounted for: unknown, missing or mis-shaped tensors raise an error that lists them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from mlkv.model.config import MLKVConfig
from mlkv.model.sharing import SharingPlan, resolve_plan

INITS = ("mean", "pairwise", "first")
#: The default conversion init. Measured (docs/results/reproduce-h200-run2): after equal LM uptraining, pairwise was
#: best for MLKV-2 (Gutenberg val ppl 122.4 vs mean 126.1, first 128.9; two data orders each) and level with mean for
#: MLKV-6 within the data-order spread (117.8 vs 117.7; first 113.7); first wins MLKV-6 but is worst for MLKV-2.
DEFAULT_INIT = "pairwise"
SUPPORTED_ARCHITECTURES = ("GPTNeoXForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM",
                           "MLKVForCausalLM")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "generation_config.json")

# ---- weight maps: source name -> mlkv name ({i} is the layer index) ----------------------------------------------
GPT_NEOX_GLOBAL = {
    "gpt_neox.embed_in.weight": "model.embed_tokens.weight",
    "gpt_neox.final_layer_norm.weight": "model.norm.weight",
    "gpt_neox.final_layer_norm.bias": "model.norm.bias",
    "embed_out.weight": "lm_head.weight",
}
GPT_NEOX_LAYER = {
    "gpt_neox.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "gpt_neox.layers.{i}.input_layernorm.bias": "model.layers.{i}.input_layernorm.bias",
    "gpt_neox.layers.{i}.post_attention_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "gpt_neox.layers.{i}.post_attention_layernorm.bias": "model.layers.{i}.post_attention_layernorm.bias",
    "gpt_neox.layers.{i}.attention.dense.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "gpt_neox.layers.{i}.attention.dense.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight": "model.layers.{i}.mlp.up_proj.weight",
    "gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias": "model.layers.{i}.mlp.up_proj.bias",
    "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight": "model.layers.{i}.mlp.down_proj.weight",
    "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias": "model.layers.{i}.mlp.down_proj.bias",
}
GPT_NEOX_FUSED_QKV = {  # split by _split_neox_qkv
    "gpt_neox.layers.{i}.attention.query_key_value.weight": "model.layers.{i}.self_attn.{qkv}_proj.weight",
    "gpt_neox.layers.{i}.attention.query_key_value.bias": "model.layers.{i}.self_attn.{qkv}_proj.bias",
}
# Buffers that older GPT-NeoX / Llama checkpoints carry and that are recomputed, not loaded.
IGNORED_LAYER_KEYS = (
    "gpt_neox.layers.{i}.attention.bias", "gpt_neox.layers.{i}.attention.masked_bias",
    "gpt_neox.layers.{i}.attention.rotary_emb.inv_freq", "model.layers.{i}.self_attn.rotary_emb.inv_freq",
)
LLAMA_GLOBAL = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
LLAMA_LAYER = {
    "model.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "model.layers.{i}.self_attn.o_proj.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "model.layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.gate_proj.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "model.layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.up_proj.bias": "model.layers.{i}.mlp.up_proj.bias",
    "model.layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "model.layers.{i}.mlp.down_proj.bias": "model.layers.{i}.mlp.down_proj.bias",
}
# transformers >= 5 may save GPT-NeoX's head as lm_head.weight
GPT_NEOX_ALIASES = {"lm_head.weight": "embed_out.weight"}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message lists the offending keys or fields."""


# ---- reading a source checkpoint ------------------------------------------------------------------------------------
def read_hf_config(src: str | Path) -> dict:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} not found: SRC_DIR must be a Hugging Face checkpoint directory")
    config = json.loads(path.read_text())
    archs = config.get("architectures") or []
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"architectures ({archs}) is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if archs[0] == "MistralForCausalLM" and config.get("sliding_window") is not None:
        raise ConversionError(
            f"sliding_window ({config['sliding_window']}) must be null: MLKV models use full attention, so only "
            "Mistral checkpoints without a sliding window can be converted"
        )
    if archs[0] == "Qwen2ForCausalLM" and config.get("use_sliding_window"):
        raise ConversionError("use_sliding_window (True) must be false: MLKV models use full attention")
    return config


def read_hf_state(src: str | Path) -> dict[str, torch.Tensor]:
    """Load weights from safetensors (single or sharded by its index), else ``pytorch_model.bin`` (single or
    sharded) with ``weights_only=True``."""
    src = Path(src)
    for index_name, single, loader in (
            ("model.safetensors.index.json", "model.safetensors", lambda f: load_file(str(f))),
            ("pytorch_model.bin.index.json", "pytorch_model.bin",
             lambda f: torch.load(f, map_location="cpu", weights_only=True))):
        # The index (or the single file) names the weights; other files in the folder (e.g. Mistral's
        # consolidated.safetensors, adapters) are not part of the checkpoint.
        if (src / index_name).is_file():
            files = sorted(set(json.loads((src / index_name).read_text())["weight_map"].values()))
        elif (src / single).is_file():
            files = [single]
        else:
            continue
        state = {}
        for f in files:
            state.update(loader(src / f))
        return state
    raise ConversionError(f"no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found in {src}")


def mlkv_config_from_hf(hf: dict) -> MLKVConfig:
    """The MHA (no sharing) ``MLKVConfig`` equivalent to a supported HF config."""
    arch = hf["architectures"][0]
    if arch == "MLKVForCausalLM":
        config = MLKVConfig(**{k: v for k, v in hf.items() if k not in ("model_type", "transformers_version",
                                                                        "architectures")})
        if config.sharing.consumers:
            raise ConversionError(
                f"kv_source_layers ({config.kv_source_layers}) already shares K/V across layers; convert from the "
                "model before sharing (every layer a producer)"
            )
        return config
    L, H, hidden = hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"]
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    common = dict(vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=hf["intermediate_size"],
                  num_hidden_layers=L, num_attention_heads=H,
                  max_position_embeddings=hf.get("max_position_embeddings", 2048),
                  initializer_range=hf.get("initializer_range", 0.02),
                  tie_word_embeddings=hf.get("tie_word_embeddings", False),
                  bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                  pad_token_id=hf.get("pad_token_id"))
    if arch == "GPTNeoXForCausalLM":
        rope.setdefault("rope_theta", hf.get("rotary_emb_base", hf.get("rope_theta", 10000.0)))
        rope.setdefault("partial_rotary_factor", hf.get("rotary_pct", hf.get("partial_rotary_factor", 0.25)))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        return MLKVConfig(flavor="gpt_neox", norm_eps=hf.get("layer_norm_eps", 1e-5), hidden_act=hf.get("hidden_act", "gelu"),
                          use_parallel_residual=hf.get("use_parallel_residual", True),
                          attention_bias=hf.get("attention_bias", True), attention_out_bias=hf.get("attention_bias", True),
                          mlp_bias=True, rope_parameters=rope, **common)
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("partial_rotary_factor", 1.0)
    head_dim = hf.get("head_dim") or hidden // H
    qkv_bias = True if arch == "Qwen2ForCausalLM" else hf.get("attention_bias", False)
    out_bias = False if arch == "Qwen2ForCausalLM" else hf.get("attention_bias", False)
    return MLKVConfig(flavor="llama", norm_eps=hf.get("rms_norm_eps", 1e-6), hidden_act=hf.get("hidden_act", "silu"),
                      use_parallel_residual=False, attention_bias=qkv_bias, attention_out_bias=out_bias,
                      mlp_bias=hf.get("mlp_bias", False), head_dim=head_dim,
                      num_key_value_heads=hf.get("num_key_value_heads") or H, rope_parameters=rope, **common)


def _split_neox_qkv(fused: torch.Tensor, num_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """GPT-NeoX's fused rows are [heads, 3, head_dim]; returns q, k, v with rows [heads, head_dim]."""
    rest = fused.shape[1:]
    per_head = fused.reshape(num_heads, 3, head_dim, *rest)  # (H, 3, D, [hidden])
    return tuple(per_head[:, j].reshape(num_heads * head_dim, *rest) for j in range(3))  # (H*D, [hidden])


def rename_state(hf: dict, state: dict[str, torch.Tensor], config: MLKVConfig) -> dict[str, torch.Tensor]:
    """Source tensors -> mlkv names for the MHA model; raises listing unknown, missing and mis-shaped keys."""
    arch = hf["architectures"][0]
    if arch == "MLKVForCausalLM":
        return _check_keys(arch, dict(state), set(state) - set(expected_shapes(config)), config)
    neox = arch == "GPTNeoXForCausalLM"
    state = dict(state)
    if neox:
        for new, old in GPT_NEOX_ALIASES.items():
            if new in state and old not in state:
                state[old] = state.pop(new)
    global_map, layer_map = (GPT_NEOX_GLOBAL, GPT_NEOX_LAYER) if neox else (LLAMA_GLOBAL, LLAMA_LAYER)
    out, used = {}, set()

    def take(src: str, dst: str):
        if src in state:
            out[dst] = state[src]
            used.add(src)

    for src, dst in global_map.items():
        take(src, dst)
    for i in range(config.num_hidden_layers):
        for src, dst in layer_map.items():
            take(src.format(i=i), dst.format(i=i))
        for key in IGNORED_LAYER_KEYS:
            if key.format(i=i) in state:
                used.add(key.format(i=i))
        if neox:
            for src, dst in GPT_NEOX_FUSED_QKV.items():
                src = src.format(i=i)
                if src in state:
                    used.add(src)
                    for part, tensor in zip("qkv", _split_neox_qkv(state[src], config.num_attention_heads,
                                                                    config.head_dim)):
                        out[dst.format(i=i, qkv=part)] = tensor
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return _check_keys(arch, out, set(state) - used, config)


def _check_keys(arch: str, out: dict[str, torch.Tensor], unused: set[str], config: MLKVConfig):
    """Raise listing unknown (unused source), missing and mis-shaped tensors; else return ``out``."""
    if config.tie_word_embeddings:
        unused.discard("lm_head.weight")
        out.pop("lm_head.weight", None)
    unknown = sorted(unused)
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(out))
    misshaped = sorted(f"{k}: {tuple(v.shape)} (expected {expected[k]})" for k, v in out.items()
                       if k in expected and tuple(v.shape) != expected[k])
    if unknown or missing or misshaped:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                 for name, keys in (("unknown", unknown), ("missing", missing), ("mis-shaped", misshaped)) if keys]
        raise ConversionError(f"checkpoint keys do not match {arch}: " + "; ".join(parts))
    return out


def expected_shapes(config: MLKVConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of an ``MLKVForCausalLM`` built from ``config`` (no allocation)."""
    from mlkv.model.modeling import MLKVForCausalLM

    with torch.device("meta"):
        model = MLKVForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


# ---- applying a sharing plan ----------------------------------------------------------------------------------------
def pool_heads(w: torch.Tensor, src_heads: int, dst_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a K/V weight or bias regrouped from ``src_heads`` to ``dst_heads`` heads.

    Fewer heads: the mean of each group of ``src_heads // dst_heads`` adjacent heads (GQA/MQA pooling). More heads
    (e.g. ``mha`` on a GQA source): each head repeated, which computes exactly the same attention.
    """
    rest = w.shape[1:]
    heads = w.reshape(src_heads, head_dim, *rest)  # (H_src, D, [hidden])
    if dst_heads >= src_heads and dst_heads % src_heads == 0:
        return heads.repeat_interleave(dst_heads // src_heads, dim=0).reshape(dst_heads * head_dim, *rest)
    if src_heads % dst_heads:
        raise ConversionError(
            f"num_key_value_heads ({dst_heads}) must divide, or be a multiple of, the source model's K/V heads "
            f"({src_heads})"
        )
    grouped = heads.reshape(dst_heads, src_heads // dst_heads, head_dim, *rest)  # (H_kv, group, D, [hidden])
    return grouped.float().mean(dim=1).reshape(dst_heads * head_dim, *rest).to(w.dtype)  # (H_kv*D, [hidden])


def fold_layers(tensors: list[torch.Tensor], init: str) -> torch.Tensor:
    """Combine one producer's tensor with those of the consumers it serves (producer first, layer order)."""
    if init == "first":
        return tensors[0]
    if init == "mean":
        return torch.stack([t.float() for t in tensors]).mean(0).to(tensors[0].dtype)
    if init == "pairwise":  # the reference code: W_p = mean([W_i, W_p]) for each consumer i in turn
        acc = tensors[0].float()
        for t in tensors[1:]:
            acc = (t.float() + acc) / 2
        return acc.to(tensors[0].dtype)
    raise ConversionError(f"init ({init!r}) must be one of {INITS}")


def widened_intermediate(config: MLKVConfig, plan: SharingPlan) -> int:
    """MLP width that gives back the K/V parameters removed by ``plan`` (same for every layer, as in the paper)."""
    h, d = config.hidden_size, config.head_dim
    kv_params = lambda heads: 2 * heads * d * (h + (1 if config.attention_bias else 0))  # noqa: E731
    removed = config.num_hidden_layers * kv_params(config.num_key_value_heads) - plan.num_producers * kv_params(
        plan.num_key_value_heads)
    per_neuron = (3 if config.flavor == "llama" else 2) * h + (1 + (1 if config.flavor == "llama" else 0)
                                                               if config.mlp_bias else 0)
    return config.intermediate_size + round(removed / (config.num_hidden_layers * per_neuron))


def apply_plan(state: dict[str, torch.Tensor], config: MLKVConfig, plan: SharingPlan, init: str = DEFAULT_INIT,
               keep_params: bool = False, seed: int = 0) -> tuple[dict[str, torch.Tensor], MLKVConfig]:
    """Turn an MHA/GQA state dict (mlkv names, every layer with K/V) into one for ``plan``."""
    if init not in INITS:
        raise ConversionError(f"init ({init!r}) must be one of {INITS}")
    src_heads, d = config.num_key_value_heads, config.head_dim
    new_config = config.with_plan(plan)
    out = {k: v for k, v in state.items() if ".k_proj." not in k and ".v_proj." not in k}
    for p in plan.producers:
        for proj in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                key = f"model.layers.{{i}}.self_attn.{proj}.{kind}"
                if key.format(i=p) not in state:
                    continue
                served = [pool_heads(state[key.format(i=i)], src_heads, plan.num_key_value_heads, d)
                          for i in plan.served_by(p)]
                out[key.format(i=p)] = fold_layers(served, init)
    if keep_params:
        new_config, out = widen_mlps(out, new_config, widened_intermediate(config, plan), seed)
    return out, new_config


def widen_mlps(state: dict[str, torch.Tensor], config: MLKVConfig, width: int, seed: int = 0):
    """Add ``width - intermediate_size`` neurons to every MLP: random inputs, zero outputs (function unchanged)."""
    extra = width - config.intermediate_size
    if extra <= 0:
        return config, state
    gen = torch.Generator().manual_seed(seed)
    state = dict(state)
    for i in range(config.num_hidden_layers):
        for name in ("gate_proj", "up_proj"):
            key = f"model.layers.{i}.mlp.{name}"
            if f"{key}.weight" not in state:
                continue
            w = state[f"{key}.weight"]  # (I, hidden)
            new_rows = torch.randn(extra, w.shape[1], generator=gen) * config.initializer_range
            state[f"{key}.weight"] = torch.cat([w, new_rows.to(w.dtype)])  # (I + extra, hidden)
            if f"{key}.bias" in state:
                b = state[f"{key}.bias"]
                state[f"{key}.bias"] = torch.cat([b, b.new_zeros(extra)])
        down = state[f"model.layers.{i}.mlp.down_proj.weight"]  # (hidden, I)
        state[f"model.layers.{i}.mlp.down_proj.weight"] = torch.cat([down, down.new_zeros(down.shape[0], extra)], 1)
    data = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        data.pop(key, None)
    data["intermediate_size"] = width
    return MLKVConfig(**data), state


# ---- the whole conversion -------------------------------------------------------------------------------------------
def convert_state(src: str | Path, plan: str | list[int] | SharingPlan = "mha", init: str = DEFAULT_INIT,
                  keep_params: bool = False, seed: int = 0):
    """Read an HF checkpoint directory and return ``(state_dict, MLKVConfig)`` for ``plan``."""
    hf = read_hf_config(src)
    base = mlkv_config_from_hf(hf)
    state = rename_state(hf, read_hf_state(src), base)
    plan = resolve_plan(plan, base.num_hidden_layers, base.num_attention_heads)
    return apply_plan(state, base, plan, init, keep_params, seed)


def build_model(state: dict[str, torch.Tensor], config: MLKVConfig, dtype: torch.dtype | None = None):
    """An ``MLKVForCausalLM`` holding exactly ``state`` (strict: every parameter must be present)."""
    from mlkv.model.modeling import MLKVForCausalLM

    model = MLKVForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConversionError(f"state does not fit the model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype) if dtype is not None else model


def convert_checkpoint(src: str | Path, dst: str | Path, plan: str = "mha", init: str = DEFAULT_INIT,
                       keep_params: bool = False, seed: int = 0, overwrite: bool = False) -> Path:
    """Convert ``src`` to an mlkv checkpoint in ``dst``, written to a temporary directory and then renamed."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    state, config = convert_state(src, plan, init, keep_params, seed)
    model = build_model(state, config)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file():
                shutil.copy2(Path(src) / name, tmp / name)
        (tmp / "mlkv_conversion.json").write_text(json.dumps(
            {"source": str(src), "plan": plan, "structure": config.sharing.structure, "init": init,
             "keep_params": keep_params, "kv_source_layers": config.kv_source_layers,
             "num_key_value_heads": config.num_key_value_heads, "intermediate_size": config.intermediate_size,
             "kv_bytes_per_token_fp16": config.kv_bytes_per_token("fp16"),
             "parameters": sum(p.numel() for p in model.parameters())}, indent=2))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def parameter_count(config: MLKVConfig) -> int:
    """Closed-form parameter count of an ``MLKVForCausalLM`` (tested against ``model.parameters()``)."""
    h, d, L, V, I = config.hidden_size, config.head_dim, config.num_hidden_layers, config.vocab_size, \
        config.intermediate_size
    H, Hkv, P = config.num_attention_heads, config.num_key_value_heads, config.sharing.num_producers
    norm = 2 * h if config.flavor == "gpt_neox" else h
    qkv_b = 1 if config.attention_bias else 0
    attn = L * (H * d * (h + qkv_b) + H * d * h + (h if config.attention_out_bias else 0))
    attn += P * 2 * Hkv * d * (h + qkv_b)
    mlp_mats = 3 if config.flavor == "llama" else 2
    mlp = L * (mlp_mats * h * I + ((mlp_mats - 1) * I + h if config.mlp_bias else 0))
    embed = V * h * (1 if config.tie_word_embeddings else 2)
    return embed + attn + mlp + L * 2 * norm + norm

