"""``MLKVConfig``: a transformers config for decoder models whose layers share K/V across layers.

Architecture families share one model definition; ``flavor`` picks one of ``mlkv.model.flavors.FLAVORS``, whose
entry supplies the defaults of the fields left ``None``:

* ``flavor="gpt_neox"`` (Pythia): parallel residual, partial rotary, LayerNorm with biases, GELU MLP.
* ``flavor="llama"`` (Llama, Qwen2, Mistral): sequential residual, RMSNorm, SwiGLU MLP, full rotary.

Sharing is one explicit list, ``kv_source_layers`` (see ``mlkv.model.sharing``), validated when the config is built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from mlkv.errors import UsageError
from mlkv.model.flavors import Flavor, get_flavor
from mlkv.model.sharing import SharingPlan, resolve_plan, validate_sharing

#: Fields a saved ``config.json`` holds that are not ``MLKVConfig`` arguments.
SAVED_ONLY_FIELDS = ("model_type", "transformers_version", "architectures")
#: The fields that give a model its size: a ``config.json`` must name each that its config class has, as a positive
#: integer; left out, transformers would quietly build the class's default size (768 wide for GPT-NeoX).
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
#: Size fields that may be left out (derived or defaulted) but, where given, must be positive integers.
OPTIONAL_SIZE_FIELDS = ("num_key_value_heads", "head_dim", "max_position_embeddings")


class ModelConfigError(UsageError):
    """A model ``config.json`` that cannot be read, names no size or gives one that is not a positive integer."""


def read_model_config(path: str | os.PathLike) -> dict:
    """The JSON object of a model's ``config.json``, its size fields checked (``check_size_fields``) under the
    names its config class uses (GPT-2's ``n_embd`` for ``hidden_size``), then every field's type by the class
    itself; a ``model_type`` transformers does not know is left for transformers to name."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"{path}: cannot be read ({exc}); download or copy the checkpoint again") from None
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path}: not a model config (a JSON {type(config).__name__}, not an object)")
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        cls = CONFIG_MAPPING[model_type]
        declared = {name for klass in cls.__mro__ for name in getattr(klass, "__annotations__", {})}
        check_size_fields(config, path, getattr(cls, "attribute_map", {}), declared)
        try:
            cls.from_dict(config)  # the class's own checks of every field's type
        except (StrictDataclassError, TypeError) as exc:
            raise ModelConfigError(f"{path}: {' '.join(str(exc).split())}") from None
    return config


def check_size_fields(config: dict, path: str | os.PathLike, aliases: dict[str, str] | None = None,
                      declared: set[str] | None = None) -> None:
    """Raise ``ModelConfigError`` naming ``path`` and the field for a size field (``SIZE_FIELDS``) that ``config``
    leaves out, or one (``OPTIONAL_SIZE_FIELDS`` too) that is not a positive integer. ``aliases``: the config
    class's own name for a field; ``declared``: the fields the class has (others are not checked)."""
    for name in SIZE_FIELDS + OPTIONAL_SIZE_FIELDS:
        key = (aliases or {}).get(name, name)
        if declared is not None and key not in declared:
            continue
        value = config.get(key)
        if value is None and name in SIZE_FIELDS:
            raise ModelConfigError(f"{path}: no {key}: a model config must give its size ({', '.join(SIZE_FIELDS)}) "
                                   "as positive integers")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelConfigError(f"{path}: {key} ({value!r}) must be a positive integer")


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


# Presets: tiny shapes for tests and the paper's Pythia-160M shape.
PRESETS: dict[str, dict] = {
    "pythia-160m": dict(flavor="gpt_neox", vocab_size=50304, hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=2048,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
    "pythia-mini": dict(flavor="gpt_neox", vocab_size=50304, hidden_size=384, intermediate_size=1536,
                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=2048,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
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
