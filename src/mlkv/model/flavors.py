"""Architecture families: everything that differs between GPT-NeoX and Llama-style models, one entry each.

An entry (``Flavor``) says how the shared decoder is built (norm, MLP gating, residual layout), what an
``MLKVConfig`` of that family defaults to, how a Hugging Face checkpoint of the family maps onto mlkv's weight names,
which HF architectures it converts, and the family's terms in the closed-form parameter count. ``MLKVConfig``,
``MLKVForCausalLM`` and ``mlkv.model.convert`` read these entries and hold no per-family branches.

* ``gpt_neox`` (Pythia): parallel residual, partial rotary, LayerNorm with biases, GELU MLP, fused QKV in checkpoints.
* ``llama`` (Llama, Qwen2, Mistral): sequential residual, RMSNorm, SwiGLU MLP, full rotary. Qwen2 (biased Q/K/V,
  unbiased output) and Mistral (a sliding window, which must be off) are variants of this entry.

Adding a family is one entry in ``FLAVORS`` plus a parity test against its transformers model (tests/model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: ``architectures[0]`` of an mlkv checkpoint: converted as it is, with no weight renaming.
NATIVE_ARCHITECTURE = "MLKVForCausalLM"


@dataclass(frozen=True)
class Variant:
    """One Hugging Face architecture a family converts, with what sets it apart from the family's base."""

    architecture: str
    fixed: dict[str, Any] = field(default_factory=dict)
    """``MLKVConfig`` fields this architecture always has, whatever its HF config says (Qwen2's biases)."""
    reject: Callable[[dict], str | None] | None = None
    """The reason an HF config of this architecture cannot be converted (e.g. a sliding window), or ``None``."""


@dataclass(frozen=True)
class FusedQKV:
    """Checkpoint tensors that hold Q, K and V in one matrix, and how to split one into q, k and v."""

    keys: dict[str, str]
    """Source name -> mlkv name, with ``{i}`` the layer and ``{qkv}`` one of ``q``, ``k``, ``v``."""
    split: Callable[[Any, int, int], tuple]
    """``split(tensor, num_heads, head_dim) -> (q, k, v)``."""


@dataclass(frozen=True)
class Flavor:
    """One architecture family (see the module docstring)."""

    name: str
    """The ``MLKVConfig.flavor`` value."""
    norm: str
    """``"layernorm"`` (weight and bias) or ``"rmsnorm"`` (weight only, computed in fp32)."""
    gated_mlp: bool
    """``down(act(gate(x)) * up(x))`` (SwiGLU: three matrices) or ``down(act(up(x)))`` (two)."""
    parallel_residual: bool
    """Default residual layout: attention and MLP both read the block input (parallel) or run in sequence."""
    defaults: dict[str, Any]
    """Other ``MLKVConfig`` fields a config of this family gets when left ``None``."""
    partial_rotary_factor: float
    """Fraction of each head's channels that rotary rotates, unless the config's ``rope_parameters`` says."""
    head_dim_from_hidden: bool
    """The family has no ``head_dim`` of its own: ``hidden_size`` must be divisible by ``num_attention_heads``."""
    variants: tuple[Variant, ...]
    """The HF architectures this entry converts."""
    hf_fields: Callable[[dict], dict[str, Any]]
    """The family's ``MLKVConfig`` fields (norm, activation, biases, rotary, ...) read from an HF ``config.json``;
    the fields all families share (sizes, vocabulary, special tokens) are read by ``mlkv.model.convert``."""
    global_keys: dict[str, str]
    """HF weight name -> mlkv name, for tensors outside the layers."""
    layer_keys: dict[str, str]
    """HF weight name -> mlkv name for each layer (``{i}`` is the layer index)."""
    fused_qkv: FusedQKV | None = None
    """Q, K and V stored as one tensor per layer, split on conversion."""
    ignored_layer_keys: tuple[str, ...] = ()
    """Per-layer buffers that older checkpoints carry and that are recomputed, not loaded."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Another name a checkpoint may use for a tensor -> the name in ``global_keys``."""

    def config_defaults(self) -> dict[str, Any]:
        """Values for the ``MLKVConfig`` fields left ``None``."""
        return {"use_parallel_residual": self.parallel_residual, **self.defaults}

    # ---- parameter-count terms ----------------------------------------------------------------------------------
    @property
    def norm_parameters(self) -> int:
        """Parameters of one norm per hidden channel: 2 (LayerNorm: weight and bias) or 1 (RMSNorm)."""
        return 2 if self.norm == "layernorm" else 1

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of one MLP, each ``hidden x intermediate``: 3 when gated, else 2."""
        return 3 if self.gated_mlp else 2

    # ---- the weight map -----------------------------------------------------------------------------------------
    def weight_names(self, num_layers: int) -> dict[str, str]:
        """Every HF weight name -> mlkv name for a model of ``num_layers`` layers (fused QKV excluded)."""
        names = dict(self.global_keys)
        for i in range(num_layers):
            names.update({src.format(i=i): dst.format(i=i) for src, dst in self.layer_keys.items()})
        return names

    def ignored_names(self, num_layers: int) -> set[str]:
        return {key.format(i=i) for i in range(num_layers) for key in self.ignored_layer_keys}


def _hf_rope(hf: dict) -> dict[str, Any]:
    """A copy of the HF config's rope settings (``rope_parameters``, or ``rope_scaling`` in older configs)."""
    return dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})


# ---- GPT-NeoX (Pythia) ----------------------------------------------------------------------------------------------
def split_neox_qkv(fused, num_heads: int, head_dim: int) -> tuple:
    """GPT-NeoX's fused rows are [heads, 3, head_dim]; returns q, k, v with rows [heads, head_dim]."""
    rest = fused.shape[1:]
    per_head = fused.reshape(num_heads, 3, head_dim, *rest)  # (H, 3, D, [hidden])
    return tuple(per_head[:, j].reshape(num_heads * head_dim, *rest) for j in range(3))  # (H*D, [hidden])


def _neox_fields(hf: dict) -> dict[str, Any]:
    rope = _hf_rope(hf)
    rope.setdefault("rope_theta", hf.get("rotary_emb_base", hf.get("rope_theta", 10000.0)))
    rope.setdefault("partial_rotary_factor", hf.get("rotary_pct", hf.get("partial_rotary_factor", 0.25)))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    return dict(norm_eps=hf.get("layer_norm_eps", 1e-5), hidden_act=hf.get("hidden_act", "gelu"),
                use_parallel_residual=hf.get("use_parallel_residual", True),
                attention_bias=hf.get("attention_bias", True), attention_out_bias=hf.get("attention_bias", True),
                mlp_bias=True, rope_parameters=rope)


GPT_NEOX = Flavor(
    name="gpt_neox",
    norm="layernorm",
    gated_mlp=False,
    parallel_residual=True,
    defaults={"hidden_act": "gelu", "attention_bias": True, "mlp_bias": True},
    partial_rotary_factor=0.25,
    head_dim_from_hidden=True,
    variants=(Variant("GPTNeoXForCausalLM"),),
    hf_fields=_neox_fields,
    global_keys={
        "gpt_neox.embed_in.weight": "model.embed_tokens.weight",
        "gpt_neox.final_layer_norm.weight": "model.norm.weight",
        "gpt_neox.final_layer_norm.bias": "model.norm.bias",
        "embed_out.weight": "lm_head.weight",
    },
    layer_keys={
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
    },
    fused_qkv=FusedQKV(
        keys={
            "gpt_neox.layers.{i}.attention.query_key_value.weight": "model.layers.{i}.self_attn.{qkv}_proj.weight",
            "gpt_neox.layers.{i}.attention.query_key_value.bias": "model.layers.{i}.self_attn.{qkv}_proj.bias",
        },
        split=split_neox_qkv,
    ),
    ignored_layer_keys=("gpt_neox.layers.{i}.attention.bias", "gpt_neox.layers.{i}.attention.masked_bias",
                        "gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"),
    aliases={"lm_head.weight": "embed_out.weight"},  # transformers >= 5 may save GPT-NeoX's head as lm_head.weight
)


# ---- Llama (and Qwen2, Mistral) -------------------------------------------------------------------------------------
def _llama_fields(hf: dict) -> dict[str, Any]:
    rope = _hf_rope(hf)
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("partial_rotary_factor", 1.0)
    heads = hf["num_attention_heads"]
    return dict(norm_eps=hf.get("rms_norm_eps", 1e-6), hidden_act=hf.get("hidden_act", "silu"),
                use_parallel_residual=False, attention_bias=hf.get("attention_bias", False),
                attention_out_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads, rope_parameters=rope)


def _mistral_window(hf: dict) -> str | None:
    if hf.get("sliding_window") is not None:
        return (f"sliding_window ({hf['sliding_window']}) must be null: MLKV models use full attention, so only "
                "Mistral checkpoints without a sliding window can be converted")
    return None


def _qwen2_window(hf: dict) -> str | None:
    if hf.get("use_sliding_window"):
        return "use_sliding_window (True) must be false: MLKV models use full attention"
    return None


LLAMA = Flavor(
    name="llama",
    norm="rmsnorm",
    gated_mlp=True,
    parallel_residual=False,
    defaults={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
    partial_rotary_factor=1.0,
    head_dim_from_hidden=False,
    variants=(
        Variant("LlamaForCausalLM"),
        Variant("Qwen2ForCausalLM", fixed={"attention_bias": True, "attention_out_bias": False},
                reject=_qwen2_window),
        Variant("MistralForCausalLM", reject=_mistral_window),
    ),
    hf_fields=_llama_fields,
    global_keys={
        "model.embed_tokens.weight": "model.embed_tokens.weight",
        "model.norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
    layer_keys={
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
    },
    ignored_layer_keys=("model.layers.{i}.self_attn.rotary_emb.inv_freq",),
)


# ---- the registry ---------------------------------------------------------------------------------------------------
FLAVORS: dict[str, Flavor] = {f.name: f for f in (GPT_NEOX, LLAMA)}

#: ``architectures[0]`` values ``mlkv convert`` accepts, in the order error messages list them.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(
    v.architecture for f in FLAVORS.values() for v in f.variants) + (NATIVE_ARCHITECTURE,)


def get_flavor(name: str) -> Flavor:
    """The entry for ``MLKVConfig.flavor``; a ``ValueError`` names the known ones."""
    if name not in FLAVORS:
        raise ValueError(f"flavor ({name!r}) must be one of {tuple(FLAVORS)}")
    return FLAVORS[name]


def for_architecture(architecture: str) -> tuple[Flavor, Variant]:
    """The family and variant that convert an HF ``architectures[0]`` (a ``KeyError`` when none does)."""
    for flavor in FLAVORS.values():
        for variant in flavor.variants:
            if variant.architecture == architecture:
                return flavor, variant
    raise KeyError(architecture)
