"""How large a batch or context fits: byte counts, the allocators that answer "does it fit?", and the search.

``find_max_batch`` / ``find_max_context`` really allocate the model, the engine's cache and one decode step and catch
``torch.cuda.OutOfMemoryError`` (``cuda_try_fit``), galloping from an analytic guess and then bisecting
(``search_max``). The allocator is injectable (``TryFit``); on CPU an accounting allocator stands in
(``simulated_try_fit``).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch

from mlkv.inference.cache import ProducerKVCache
from mlkv.inference.engine import MLKVEngine
from mlkv.model.config import MLKVConfig
from mlkv.model.modeling import MLKVForCausalLM

__all__ = ["GB", "TryFit", "search_max", "weight_bytes", "step_weight_bytes", "step_activation_bytes",
           "simulated_try_fit", "cuda_try_fit", "is_oom", "free_cuda", "set_budget", "find_max_batch",
           "find_max_context", "measure_cache_allocation"]

GB = 1e9
TryFit = Callable[[MLKVForCausalLM, int, int], bool]  # (model, batch, context) -> fits?


# ---- search ---------------------------------------------------------------------------------------------------------
def search_max(fits: Callable[[int], bool], guess: int = 1, limit: int | None = None) -> tuple[int, int]:
    """The largest ``n >= 1`` with ``fits(n)``, or 0 when ``fits(1)`` is False; ``fits`` must be monotone (True up
    to some n, False above). Gallops from ``guess`` (steps doubling) to bracket the answer, then bisects; never
    probes above ``limit``. Returns ``(n, number of probes)``."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit ({limit}) must be at least 1")
    seen: dict[int, bool] = {}

    def f(n: int) -> bool:
        if n not in seen:
            seen[n] = bool(fits(n))
        return seen[n]

    guess = max(1, int(guess))
    if limit is not None:
        guess = min(guess, limit)
    step = max(1, guess // 8)
    if f(guess):
        lo = guess
        while True:
            if limit is not None and lo >= limit:
                return lo, len(seen)
            nxt = lo + step if limit is None else min(lo + step, limit)
            if not f(nxt):
                hi = nxt
                break
            lo, step = nxt, step * 2
    else:
        hi = guess
        while True:
            if hi == 1:
                return 0, len(seen)
            nxt = max(1, hi - step)
            if f(nxt):
                lo = nxt
                break
            hi, step = nxt, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(mid):
            lo = mid
        else:
            hi = mid
    return lo, len(seen)


# ---- byte counts ----------------------------------------------------------------------------------------------------
def weight_bytes(model_or_config, dtype=torch.bfloat16) -> int:
    """All parameters (the model's memory footprint), counted without building when given a config."""
    if isinstance(model_or_config, MLKVConfig):
        with torch.device("meta"):
            model = MLKVForCausalLM(model_or_config)
        esize = torch.empty((), dtype=dtype).element_size()
        return sum(p.numel() for p in model.parameters()) * esize
    return sum(p.numel() * p.element_size() for p in model_or_config.parameters())


def step_weight_bytes(model, batch: int) -> int:
    """Weight bytes one decode step reads: every matrix except the embedding table (only ``batch`` rows gathered)."""
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)
    if model.get_output_embeddings().weight is embed:  # tied: the head reads the whole table
        total += embed.numel() * embed.element_size()
    return total + batch * embed.shape[1] * embed.element_size()


def step_activation_bytes(config, batch: int, dtype=torch.bfloat16) -> int:
    """Rough transient bytes of one greedy decode step (logits dominate at large batch)."""
    esize = torch.empty((), dtype=dtype).element_size()
    return batch * esize * (2 * config.vocab_size + 4 * config.intermediate_size + 16 * config.hidden_size)


def measure_cache_allocation(model, batch: int, max_len: int, device) -> dict:
    """Allocate the engine's producer-only cache alone and compare with the analytic size."""
    config, dtype = model.config, next(model.parameters()).dtype
    analytic = config.sharing.kv_bytes_per_token(config.head_dim, dtype)
    free_cuda()
    cuda = torch.device(device).type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else None
    cache = ProducerKVCache(config, batch, max_len, device, dtype)
    allocated = torch.cuda.memory_allocated(device) - before if cuda else cache.nbytes
    del cache
    free_cuda()
    return {"batch": batch, "max_len": max_len, "kv_bytes_per_token_analytic": analytic,
            "cache_bytes_expected": analytic * batch * max_len, "cache_bytes_allocated": allocated,
            "kv_bytes_per_token_allocated": allocated / (batch * max_len), "measured_by_allocator": cuda}


# ---- allocators -----------------------------------------------------------------------------------------------------
def simulated_try_fit(budget_bytes: int) -> TryFit:
    """An accounting allocator for machines without a device allocator: weights + engine buffers + step."""

    def fits(model, batch: int, context: int) -> bool:
        dtype = next(model.parameters()).dtype
        need = (weight_bytes(model) + MLKVEngine.fused_bytes(model.config, dtype)
                + MLKVEngine.buffer_bytes(model.config, batch, context, dtype)
                + step_activation_bytes(model.config, batch, dtype))
        return need <= budget_bytes

    return fits


def is_oom(err: BaseException) -> bool:
    """An out-of-memory error: ``torch.OutOfMemoryError``, or cuBLAS / cuDNN failing to allocate a workspace."""
    text = str(err)
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def free_cuda() -> None:
    """Collect garbage and hand the caching allocator's free blocks back (no-op without CUDA)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_try_fit(errors: list[str] | None = None) -> TryFit:
    """Really allocate: the engine's cache and state for ``batch`` x ``context`` and one greedy decode step over the
    full context, on top of the model already on the card. An out-of-memory error means it does not fit."""

    def fits(model, batch: int, context: int) -> bool:
        engine = MLKVEngine(model, cuda_graphs=False, bucket=None)
        ok = True
        try:
            engine.probe_step(batch, context)
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
            ok = False
            if not is_oom(err) and errors is not None:
                errors.append(f"batch {batch} context {context}: {str(err).splitlines()[0]}")
        engine.release()
        del engine
        free_cuda()
        return ok

    return fits


def set_budget(device, budget_bytes: int | None, card_bytes: int | None) -> None:
    """Cap the caching allocator at ``budget_bytes`` (``set_per_process_memory_fraction``); ``None`` lifts the cap."""
    if torch.device(device).type != "cuda" or card_bytes is None:
        return
    fraction = 1.0 if budget_bytes is None else min(1.0, budget_bytes / card_bytes)
    torch.cuda.set_per_process_memory_fraction(fraction, torch.device(device).index or 0)


# ---- max batch, max context -----------------------------------------------------------------------------------------
def find_max_batch(model, context: int, try_fit: TryFit, budget_bytes: int | None = None,
                   limit: int = 1 << 22) -> dict:
    """Largest batch whose cache + one decode step at ``context`` fits (``try_fit``)."""
    guess = 1
    if budget_bytes is not None:
        dtype = next(model.parameters()).dtype
        per_row = (MLKVEngine.buffer_bytes(model.config, 1, context, dtype)
                   + step_activation_bytes(model.config, 1, dtype))
        guess = max(1, int((budget_bytes - weight_bytes(model)) * 0.97) // per_row)
    t = time.perf_counter()
    n, probes = search_max(lambda b: try_fit(model, b, context), guess, limit)
    return {"context": context, "max_batch": n, "probes": probes, "guess": guess, "limit": limit,
            "at_limit": n >= limit, "seconds": round(time.perf_counter() - t, 3)}


def find_max_context(model, batch: int, try_fit: TryFit, budget_bytes: int | None = None,
                     limit: int = 1 << 20) -> dict:
    """Longest context whose cache + one decode step at ``batch`` fits (``try_fit``). Contexts above
    ``max_position_embeddings`` are memory figures only: the model was not trained for them."""
    guess = 1
    if budget_bytes is not None:
        dtype = next(model.parameters()).dtype
        per_token = (MLKVEngine.buffer_bytes(model.config, batch, 2, dtype)
                     - MLKVEngine.buffer_bytes(model.config, batch, 1, dtype))
        spare = budget_bytes - weight_bytes(model) - step_activation_bytes(model.config, batch, dtype)
        guess = max(1, int(spare * 0.97) // max(1, per_token))
    t = time.perf_counter()
    n, probes = search_max(lambda c: try_fit(model, batch, c), guess, limit)
    return {"batch": batch, "max_context": n, "probes": probes, "guess": guess, "limit": limit, "at_limit": n >= limit,
            "beyond_max_position": n > model.config.max_position_embeddings,
            "seconds": round(time.perf_counter() - t, 3)}
