"""The engine's static KV cache: K/V for the producer layers only, and the attention that reads it.

``ProducerKVCache`` is duck-typed like a transformers ``Cache``: the producer layers call
``update(k, v, layer_idx)``, which writes into a static buffer and returns views of it; consumers receive their
producer's K/V from the model exactly as in training. The cache owns ONE preallocated tensor
``(2, producers, B, H_kv, T_max, D)``, so it holds ``plan.kv_bytes_per_token * B * T_max`` bytes and nothing for
consumer layers.

It also carries how it is read, as the gpt-fast model owns its ``KVCache``: the decode backend
(``decode_attention``, ``"sdpa"`` or ``"triton"``) and each row's valid columns ``[start, end)`` (device tensors
the engine advances). The model sees a cache with an ``attention`` method and attends through it in every layer,
with the engine's mask as given (``mlkv.model.modeling.MLKVModel.forward``); so the backend travels as data from
``MLKVEngine(decode_attention=...)`` to the kernel call in ``mlkv.inference.attention.engine_attention``.
"""

from __future__ import annotations

import torch

from mlkv.inference.attention import engine_attention

BACKENDS = ("sdpa", "triton")  # what a cache runs; MLKVEngine resolves "auto" to one of them


class ProducerKVCache:
    """Static K/V for the producer layers only: one buffer ``(2, producers, B, H_kv, T_max, D)``.

    ``update(k, v, layer_idx)`` (called by producer layers) writes a prefill chunk at columns ``[0, T)`` or a single
    decode token at column ``col`` (a 1-element device tensor shared with the engine) and returns views of the first
    ``kv_len`` columns. Consumers never touch the K/V: the model hands them their producer's.
    ``start`` / ``end`` (int32, (B,)): each row's valid columns, read by the ``"triton"`` decode backend.
    """

    is_compileable = True

    def __init__(self, config, batch_size: int, max_len: int, device, dtype, decode_attention: str = "sdpa"):
        if decode_attention not in BACKENDS:
            raise ValueError(f"decode_attention ({decode_attention!r}) must be one of {', '.join(BACKENDS)}")
        plan = config.sharing
        self.producers = plan.producers
        self.batch_size, self.max_len = batch_size, max_len
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.storage = torch.zeros(2, len(self.producers), batch_size, self.num_kv_heads, max_len, self.head_dim,
                                   device=device, dtype=dtype)
        self._kv = {layer: (self.storage[0, i], self.storage[1, i]) for i, layer in enumerate(self.producers)}
        self._source = list(config.kv_source_layers)
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        self.kv_len = max_len
        self.decode_attention = decode_attention
        self.start = torch.zeros(batch_size, dtype=torch.int32, device=device)  # first valid column (left padding)
        self.end = torch.zeros(batch_size, dtype=torch.int32, device=device)  # one past the current token's column

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The full ``(B, H_kv, T_max, D)`` K and V buffers of a producer, or of a consumer's producer."""
        return self._kv[self._source[layer_idx]]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        K, V = self._kv[layer_idx]
        T = key_states.shape[2]
        if T == 1:
            K.index_copy_(2, self.col, key_states)
            V.index_copy_(2, self.col, value_states)
        else:
            K[:, :, :T].copy_(key_states)
            V[:, :, :T].copy_(value_states)
        n = self.kv_len
        return K[:, :, :n], V[:, :, :n]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len

    def attention(self, q, k, v, mask, scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
        """Attention over this cache's K/V (the model's attention signature; returns (B, T, H, D)): the kernel over
        ``[start, end)`` for a decode step when the backend is ``"triton"``, else SDPA with the engine's mask."""
        ranges = (self.start, self.end) if self.decode_attention == "triton" else None
        return engine_attention(q, k, v, mask, scaling, ranges=ranges)


__all__ = ["BACKENDS", "ProducerKVCache"]
