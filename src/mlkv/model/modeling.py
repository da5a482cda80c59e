"""``MLKVForCausalLM``: one decoder definition for GPT-NeoX (Pythia) and Llama-family models with K/V shared across
layers. What differs between the families (norm, MLP gating, residual layout) comes from the config's flavor entry
(``mlkv.model.flavors``).

Producer layers project keys and values, rotate the keys, write them to the cache and hand them on; consumer layers
own no K/V weights and attend with their own (rotated) queries to their producer's *rotated* keys. Rotary is applied
once, in the producer: every layer sees the same positions, so the rotated keys are valid for all of its consumers,
and cached and uncached paths agree (the reference MLKV code shared un-rotated keys in training but rotated cached
keys in generation).

Attention runs through ``F.scaled_dot_product_attention`` with grouped K/V (``enable_gqa``); ``eager_attention`` is
the plain reference that tests compare the fast path against (``attn_implementation="eager"``). A cache may bring
its own attention (``cache.attention``, the signature of these two): the inference engine's static cache does, to
read its own layout (per-row column ranges, a decode kernel). The model then attends through it in every layer and
passes the caller's mask to it as given. The engine's stored fused Q/K/V weights come in the same way, as data:
the ``qkv_weights`` argument of ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from mlkv.model.config import MLKVConfig


# ---- rotary ---------------------------------------------------------------------------------------------------------
class MLKVRotaryEmbedding(nn.Module):
    """cos/sin tables for the first ``rotary_dim`` channels of each head (partial rotary for GPT-NeoX)."""

    def __init__(self, config: MLKVConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[
            self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: MLKVConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        base, dim = config.rope_parameters["rope_theta"], config.rotary_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (B, T, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, R)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` (B, H, T, D); cos/sin are (B, T, R)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, R)
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat(((x_rot * cos) + (rotate_half(x_rot) * sin), x_pass), dim=-1)


# ---- attention kernels ----------------------------------------------------------------------------------------------
# Masks come from transformers' ``create_causal_mask``. It returns ``None`` only where causal attention aligned at the
# top left is right (no padding; q_len == 1, q_len == kv_len, or a prefill into an empty static cache).
def _top_left_causal(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bool mask (T, S), True = attend: query i sees keys 0..i."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()


def eager_attention(q, k, v, mask, scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Reference attention: K/V heads repeated explicitly, fp32 softmax. Returns (B, T, H, D)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    v = v.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling  # (B, H, T, S)
    if mask is None and q.shape[2] > 1:
        mask = _top_left_causal(q.shape[2], k.shape[2], q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, v).transpose(1, 2)  # (B, T, H, D)


def sdpa_attention(q, k, v, mask, scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Fused attention with grouped K/V heads read in place (no repeat). Returns (B, T, H, D)."""
    is_causal = mask is None and q.shape[2] > 1
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout if training else 0.0, scale=scaling, is_causal=is_causal,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # (B, H, T, D)
    return out.transpose(1, 2)  # (B, T, H, D)


ATTENTION_FUNCTIONS: dict[str, Callable] = {"eager": eager_attention, "sdpa": sdpa_attention}

# transformers 5.24 renamed ``past_key_values`` to ``cache`` (arguments and output fields); accept both, return the
# installed version's name.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# ---- blocks ---------------------------------------------------------------------------------------------------------
class MLKVRMSNorm(nn.Module):
    """RMSNorm computed in fp32, as Llama's."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


NORMS: dict[str, Callable[[int, float], nn.Module]] = {
    "layernorm": lambda hidden_size, eps: nn.LayerNorm(hidden_size, eps=eps),
    "rmsnorm": MLKVRMSNorm,
}


def make_norm(config: MLKVConfig) -> nn.Module:
    """The flavor's norm: LayerNorm with bias (GPT-NeoX) or RMSNorm (Llama)."""
    return NORMS[config.flavor_spec.norm](config.hidden_size, config.norm_eps)


class MLKVMLP(nn.Module):
    """GELU MLP (GPT-NeoX) or SwiGLU (Llama), as the flavor's ``gated_mlp`` says."""

    def __init__(self, config: MLKVConfig):
        super().__init__()
        self.gated = config.flavor_spec.gated_mlp
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        if self.gated:
            self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


class MLKVAttention(nn.Module):
    """Self-attention whose K/V come from this layer (producer) or from an earlier producer (consumer)."""

    def __init__(self, config: MLKVConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.source = config.kv_source_layers[layer_idx]
        self.is_producer = self.source == layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=config.attention_bias)
        if self.is_producer:
            self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
            self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.attention_out_bias)

    def fused_qkv(self, out: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The producer's Q, K and V weights (and biases) concatenated: ``((H + 2 H_kv) D, hidden)``, a copy (written
        into ``out``, an earlier result, when given)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        out_w, out_b = out if out is not None else (None, None)
        weight = torch.cat([p.weight for p in projs], out=out_w)  # ((H + 2 H_kv) D, hidden)
        bias = torch.cat([p.bias for p in projs], out=out_b) if self.q_proj.bias is not None else None
        return weight, bias

    def project(self, x: torch.Tensor, qkv_weights: tuple[torch.Tensor, torch.Tensor | None] | None = None):
        """Q (B, H, T, D) and, for a producer, K and V (B, H_kv, T, D), none of them rotated yet.

        A producer runs its three projections as one matmul over the concatenated weights, as GPT-NeoX's fused
        ``query_key_value`` does. The concatenation copies the weights on every call: negligible next to a training
        step's matmuls, but at one decoded token it costs more than the matmul itself, so the decoding engine passes
        ``qkv_weights``, a stored copy of ``fused_qkv()`` that it keeps in step with the parameters.
        """
        B, T, _ = x.shape
        H, H_kv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if not self.is_producer:
            return self.q_proj(x).view(B, T, H, D).transpose(1, 2), None, None  # (B, H, T, D)
        weight, bias = qkv_weights if qkv_weights is not None else self.fused_qkv()
        q, k, v = F.linear(x, weight, bias).split([H * D, H_kv * D, H_kv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H_kv, D).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, H_kv, D).transpose(1, 2)  # (B, H_kv, T, D)
        return q, k, v

    def forward(self, x, kv: tuple[torch.Tensor, torch.Tensor] | None, position_embeddings, attention_mask,
                past_key_values: Cache | None = None, attention: Callable | None = None,
                qkv_weights: tuple[torch.Tensor, torch.Tensor | None] | None = None):
        """``kv`` is the producer's (K, V) for a consumer and ``None`` for a producer. Returns (out, K, V).

        A producer rotates its keys once and appends them to the cache; consumers receive those rotated keys.
        ``attention``: the function to attend with (the cache's own), else the config's; ``qkv_weights``: see
        ``project``.
        """
        B, T, _ = x.shape
        cos, sin = position_embeddings
        q, k, v = self.project(x, qkv_weights)
        q = apply_rotary(q, cos, sin)
        if self.is_producer:
            k = apply_rotary(k, cos, sin)
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, self.layer_idx)  # (B, H_kv, S, D)
        else:
            k, v = kv
        attend = attention or ATTENTION_FUNCTIONS.get(self.config._attn_implementation, sdpa_attention)
        dropout = self.config.attention_dropout if self.training else 0.0
        out = attend(q, k, v, attention_mask, self.scaling, dropout, self.training)  # (B, T, H, D)
        out = self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))  # (B, T, hidden)
        return out, k, v


class MLKVDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block with parallel (GPT-NeoX) or sequential (Llama) residual."""

    def __init__(self, config: MLKVConfig, layer_idx: int):
        super().__init__()
        self.parallel = config.use_parallel_residual
        self.input_layernorm = make_norm(config)
        self.post_attention_layernorm = make_norm(config)
        self.self_attn = MLKVAttention(config, layer_idx)
        self.mlp = MLKVMLP(config)

    def forward(self, hidden_states, shared_k=None, shared_v=None, *, attention_mask=None,
                position_embeddings=None, past_key_values: Cache | None = None, attention: Callable | None = None,
                qkv_weights: tuple | None = None, **kwargs):
        # Shared K/V travel as positional arguments so that gradient checkpointing passes their gradients on.
        kv = None if shared_k is None else (shared_k, shared_v)
        attn, k, v = self.self_attn(self.input_layernorm(hidden_states), kv, position_embeddings, attention_mask,
                                    past_key_values, attention, qkv_weights)
        if self.parallel:
            hidden_states = hidden_states + attn + self.mlp(self.post_attention_layernorm(hidden_states))
        else:
            hidden_states = hidden_states + attn
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, k, v


# ---- models ---------------------------------------------------------------------------------------------------------
class MLKVPreTrainedModel(PreTrainedModel):
    config_class = MLKVConfig
    config: MLKVConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MLKVDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = True
    _supports_attention_backend = False


class MLKVModel(MLKVPreTrainedModel):
    def __init__(self, config: MLKVConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MLKVDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = make_norm(config)
        self.rotary_emb = MLKVRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                past_key_values: Cache | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, cache: Cache | None = None,
                qkv_weights: dict[int, tuple] | None = None, **kwargs) -> BaseModelOutputWithPast:
        """``qkv_weights``: ``{producer layer: fused_qkv()}``, stored copies to project with (the decoding engine's).
        A cache with an ``attention`` method (the engine's) is attended through in every layer and gets
        ``attention_mask`` as given; otherwise the mask comes from transformers' ``create_causal_mask``."""
        past_key_values = past_key_values if past_key_values is not None else cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if not use_cache:
            past_key_values = None
        elif past_key_values is None:
            past_key_values = DynamicCache(config=self.config)  # DummyLayer for consumers: nothing allocated
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]
        attention = getattr(past_key_values, "attention", None)
        if attention is not None:
            mask = attention_mask  # the cache's owner built it for the cache's layout
        else:  # the cache goes by position: its keyword is ``past_key_values`` before transformers 5.24, then ``cache``
            mask = create_causal_mask(self.config, inputs_embeds, attention_mask, past_key_values,
                                      position_ids=position_ids)
        qkv_weights = qkv_weights or {}
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids)
        shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        all_hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(hidden)
            source = self.config.kv_source_layers[i]
            k_in, v_in = shared[source] if source != i else (None, None)
            hidden, k, v = layer(hidden, k_in, v_in, attention_mask=mask, position_embeddings=position_embeddings,
                                 past_key_values=past_key_values, attention=attention,
                                 qkv_weights=qkv_weights.get(i))
            if source == i:
                shared[i] = (k, v)
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_FIELD: past_key_values},
                                       hidden_states=tuple(all_hidden) if all_hidden is not None else None)


class MLKVForCausalLM(MLKVPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MLKVConfig):
        super().__init__(config)
        self.model = MLKVModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                past_key_values: Cache | None = None, labels=None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, cache: Cache | None = None,
                qkv_weights: dict[int, tuple] | None = None, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, past_key_values=past_key_values, cache=cache,
                         use_cache=use_cache, output_hidden_states=output_hidden_states, qkv_weights=qkv_weights)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])  # (B, T_keep, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)},
                                      hidden_states=out.hidden_states)

    # ---- accounting -------------------------------------------------------------------------------------------------
    def kv_bytes_per_token(self, dtype=None) -> int:
        return self.config.kv_bytes_per_token(dtype or self.dtype)
