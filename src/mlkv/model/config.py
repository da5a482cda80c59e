"""``MLKVConfig``: a transformers config for decoder models whose layers share K/V across layers.

Architecture families share one model definition; ``flavor`` picks one of ``mlkv.model.flavors.FLAVORS``, whose
entry supplies the defaults of the fields left ``None``:

* ``flavor="gpt_neox"`` (Pythia): parallel residual, partial rotary, LayerNorm with biases, GELU MLP.
* ``flavor="llama"`` (Llama, Qwen2, Mistral): sequential residual, RMSNorm, SwiGLU MLP, full rotary.

Sharing is one explicit list, ``kv_source_layers`` (see ``mlkv.model.sharing``), validated when the config is built.
"""

from __future__ import annotations

# First: on an unsupported transformers release this import fails with an error that names the supported range.
from mlkv.model.compat import SUPPORTED_TRANSFORMERS  # noqa: F401, I001

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from mlkv.model.flavors import Flavor, get_flavor
from mlkv.model.sharing import SharingPlan, resolve_plan, validate_sharing

#: Fields a saved ``config.json`` holds that are not ``MLKVConfig`` arguments.
SAVED_ONLY_FIELDS = ("model_type", "transformers_version", "architectures")


@strict
class MLKVConfig(PreTrainedConfig):
    """Configuration of an ``MLKVForCausalLM``. Field names follow transformers' Llama / GPT-NeoX configs."""

    model_type = "mlkv"
    keys_to_ignore_at_inference = ["past_key_values"]

    flavor: str = "llama"
    vocab_size: int = 50304
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    kv_source_layers: list[int] | None = None
    hidden_act: str | None = None
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    norm_eps: float = 1e-5
    use_parallel_residual: bool | None = None
    attention_bias: bool | None = None
    attention_out_bias: bool | None = None
    mlp_bias: bool | None = None
    attention_dropout: float | int = 0.0
    rope_parameters: RopeParameters | dict | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        flavor = get_flavor(self.flavor)
        for name, value in flavor.config_defaults().items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias  # as GPT-NeoX and Llama do; Qwen2 converts with False
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.kv_source_layers is None:
            self.kv_source_layers = list(range(self.num_hidden_layers))
        self.kv_source_layers = [int(s) for s in self.kv_source_layers]
        rope = dict(self.rope_parameters or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope.setdefault("rope_theta", 10000.0)
        rope.setdefault("partial_rotary_factor", flavor.partial_rotary_factor)
        self.rope_parameters = rope
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checked once when the config is built: shapes and the sharing map."""
        if self.flavor_spec.head_dim_from_hidden and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        validate_sharing(self.kv_source_layers, self.num_key_value_heads, self.num_attention_heads,
                         self.num_hidden_layers)

    # ---- derived values -------------------------------------------------------------------------------------------
    @property
    def flavor_spec(self) -> Flavor:
        """This config's architecture family (``mlkv.model.flavors``): norm, MLP, weight map, ..."""
        return get_flavor(self.flavor)

    @property
    def sharing(self) -> SharingPlan:
        return SharingPlan(tuple(self.kv_source_layers), self.num_key_value_heads, self.num_attention_heads)

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        """Read by transformers' caches: consumer layers get a ``DummyLayer`` that allocates nothing."""
        return self.sharing.kv_sharing_modes()

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))

    def kv_bytes_per_token(self, dtype="fp16") -> int:
        return self.sharing.kv_bytes_per_token(self.head_dim, dtype)

    def with_plan(self, plan: str | list[int] | SharingPlan) -> "MLKVConfig":
        """A copy of this config with another sharing plan (a name, an explicit list or a ``SharingPlan``)."""
        plan = resolve_plan(plan, self.num_hidden_layers, self.num_attention_heads)
        return self.replace(kv_source_layers=list(plan.kv_source_layers), num_key_value_heads=plan.num_key_value_heads)

    def replace(self, **changes) -> "MLKVConfig":
        """A copy of this config with ``changes`` applied (validated as a new config)."""
        data = self.to_dict()
        for key in SAVED_ONLY_FIELDS:
            data.pop(key, None)
        return MLKVConfig(**{**data, **changes})


# Presets: tiny shapes for tests, the paper's Pythia-160M shape and SmolLM2-135M's (benchmarks).
PRESETS: dict[str, dict] = {
    "pythia-160m": dict(flavor="gpt_neox", vocab_size=50304, hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=2048,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
    "pythia-mini": dict(flavor="gpt_neox", vocab_size=50304, hidden_size=384, intermediate_size=1536,
                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=2048,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
    # SmolLM2-135M (a Llama: 30 thin layers, 9 query / 3 K/V heads, tied 49,152-token vocabulary); shape only.
    "smollm2-135m": dict(flavor="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                         norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "tiny-neox": dict(flavor="gpt_neox", vocab_size=512, hidden_size=48, intermediate_size=96,
                      num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256),
    "tiny-llama": dict(flavor="llama", vocab_size=512, hidden_size=48, intermediate_size=96,
                       num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256, norm_eps=1e-6),
}


def preset_config(name: str, plan: str | list[int] | None = None, **overrides) -> MLKVConfig:
    """Build a config from a preset name, optionally with a sharing plan and field overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset ({name!r}) is unknown; choose one of {sorted(PRESETS)}")
    config = MLKVConfig(**{**PRESETS[name], **overrides})
    return config.with_plan(plan) if plan is not None else config
