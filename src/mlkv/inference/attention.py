"""The engine's attention backends: PyTorch's SDPA with the engine's masks, or for a decode step the grouped split-K
kernel of ``mlkv.inference.kernels`` with per-row ``[start, end)`` cache columns instead of a mask.

The choice is data, passed down: ``MLKVEngine(decode_attention=...)`` resolves ``"auto"`` once
(``choose_decode_attention``), gives the result to its ``ProducerKVCache``, and the cache, which the model hands to
every layer, calls ``engine_attention`` with its column ranges (``ranges``) when the kernel is chosen and without
them otherwise. Nothing is registered anywhere or switched in a module or a config.

SDPA details. With a mask, PyTorch's CUDA SDPA falls back to the slow math kernel for grouped K/V (``enable_gqa``),
so for a single decode query the query heads that share a K/V head are folded into the query-length axis,
``(B, H, 1, D) -> (B, H_kv, H/H_kv, D)`` (K/V read once, no repeat, any SDPA kernel with masks); for a masked
grouped prefill on CUDA K/V are repeated once. Batches over ``ATTN_BATCH_CHUNK`` rows run in slices (CUDA grid
dims y/z are < 65536).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlkv.inference import kernels

ATTN_BATCH_CHUNK = 32768  # CUDA grid dims y/z are < 65536: split larger batches for the attention kernel
DECODE_ATTENTION = ("sdpa", "triton", "auto")  # MLKVEngine(decode_attention=...); "auto": triton where supported


def _sdpa(q, k, v, mask, scaling, is_causal=False, enable_gqa=False):
    if q.shape[0] <= ATTN_BATCH_CHUNK:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, is_causal=is_causal,
                                              enable_gqa=enable_gqa)
    outs = []
    for s in range(0, q.shape[0], ATTN_BATCH_CHUNK):
        e = s + ATTN_BATCH_CHUNK
        m = None if mask is None else mask[s:e] if mask.shape[0] > 1 else mask
        outs.append(F.scaled_dot_product_attention(q[s:e], k[s:e], v[s:e], attn_mask=m, scale=scaling,
                                                   is_causal=is_causal, enable_gqa=enable_gqa))
    return torch.cat(outs)


def engine_attention(q, k, v, mask, scaling: float, dropout: float = 0.0, training: bool = False,
                     ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention for the engine: q (B, H, T, D), k/v (B, H_kv, S, D), mask additive/bool broadcastable to
    (B, 1, T, S) or ``None`` (causal). Returns (B, T, H, D). No dropout: the engine is for inference.

    ``ranges``: per-row valid columns ``(start, end)`` (int32 (B,) device tensors); given, a decode step (T == 1)
    runs the split-K kernel over them instead of SDPA with the mask, where the kernel supports the tensors."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    groups = H // Hkv
    if T == 1 and ranges is not None and kernels.supported(q, k, v):
        out = kernels.decode_attention(q, k, v, ranges[0], ranges[1], scaling)  # (B, H, 1, D)
        return out.transpose(1, 2)  # (B, 1, H, D)
    if T == 1 and groups > 1:
        # One query per row: the query heads that share a K/V head become that head's "query positions".
        out = _sdpa(q.reshape(B, Hkv, groups, D), k, v, mask, scaling)  # (B, H_kv, G, D)
        return out.reshape(B, 1, H, D)
    if groups > 1 and mask is not None and q.is_cuda:
        # Masked grouped prefill: CUDA SDPA would fall back to the math kernel; repeat K/V once instead.
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, D)
        groups = 1
    out = _sdpa(q, k, v, mask, scaling, is_causal=mask is None and T > 1, enable_gqa=groups > 1)  # (B, H, T, D)
    return out.transpose(1, 2)  # (B, T, H, D)


def choose_decode_attention(choice: str, config, device, dtype) -> str:
    """``"sdpa"`` or ``"triton"`` for ``MLKVEngine(decode_attention=choice)`` on a model of ``config`` held on
    ``device`` in ``dtype``: ``"auto"`` takes the kernel where it supports the model; ``"triton"`` where it does
    not is an error."""
    if choice not in DECODE_ATTENTION:
        raise ValueError(f"decode_attention ({choice!r}) must be one of {', '.join(DECODE_ATTENTION)}")
    head_dim = config.head_dim
    probe_q = torch.empty(1, config.num_attention_heads, 1, head_dim, device=device, dtype=dtype)  # (B, H, 1, D)
    probe_k = torch.empty(1, config.num_key_value_heads, 1, head_dim, device=device, dtype=dtype)  # (B, H_kv, 1, D)
    fits = kernels.supported(probe_q, probe_k)
    if choice == "triton" and not fits:
        raise ValueError("decode_attention='triton' needs a CUDA model in bf16/fp16/fp32 with head_dim 64 or "
                         f"128 and the triton package (this model: {device}, {dtype}, head_dim {head_dim}); use "
                         "'sdpa' or 'auto'")
    return "triton" if choice == "triton" or (choice == "auto" and fits) else "sdpa"


__all__ = ["ATTN_BATCH_CHUNK", "DECODE_ATTENTION", "choose_decode_attention", "engine_attention"]
