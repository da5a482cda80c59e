"""A fake device allocator for the benchmark's memory search (shared by its tests)."""

import torch

from mlkv.inference.bench.memory import weight_bytes


def fake_allocator(budget: int, overhead: int = 1000):
    """A device that holds ``budget`` bytes: weights + the producer-only cache + a fixed per-row overhead."""
    calls = []

    def try_fit(model, batch, context):
        calls.append((batch, context))
        cfg = model.config
        kv = cfg.sharing.kv_bytes_per_token(cfg.head_dim, next(model.parameters()).dtype)
        return weight_bytes(model) + batch * (context * kv + overhead) <= budget

    return try_fit, calls


def expected_max(model, budget, context=None, batch=None, overhead=1000):
    cfg = model.config
    kv = cfg.sharing.kv_bytes_per_token(cfg.head_dim, torch.float32)
    spare = budget - weight_bytes(model)
    if context is not None:
        return spare // (context * kv + overhead)
    return (spare // batch - overhead) // kv
