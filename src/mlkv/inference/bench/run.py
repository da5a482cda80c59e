"""Inference benchmark: the mlkv engine next to transformers' ``generate()`` for each sharing plan.

For every plan (same shape, same card, same weights for the engine and transformers):

* KV-cache bytes per token, analytic (``plan.kv_bytes_per_token``) next to what allocating the engine's cache
  really takes (``torch.cuda.memory_allocated`` delta);
* ``generate`` runs (default batch 1 and 64, prompt 512 + 128 new tokens): prefill tokens/s, decode time per step
  and tokens/s, end-to-end tokens/s and peak memory (``max_memory_allocated``) for the engine, transformers with
  its default dynamic cache and with ``cache_implementation="static"``, and greedy token agreement;
* ``step`` runs (default context 1024, batch 1 to 256): decode time per step against the HBM bound
  ``(weight bytes read + KV bytes in use) / measured bandwidth``, the card's bandwidth being measured in the same
  run by a device-to-device copy (bytes read + written / time);
* with ``compile``, last: the engine with its decode step through ``torch.compile`` on the generate and step runs
  with batch <= ``compile_max_batch`` (the same prompts; step runs against the same HBM bound);
* the largest batch at a context (default 2048) and the longest context at a batch (default 64) under a memory
  budget (default: the card's memory), found by really allocating the model, the cache and one decode step and
  catching ``torch.cuda.OutOfMemoryError`` (gallop from an analytic guess, then bisect). The allocator is
  injectable (``try_fit``); on CPU an accounting allocator stands in ("simulated").

Writes ``inference.json``, ``inference.csv`` and PNG plots (memory vs batch, throughput vs batch, max batch per
plan), prints a table and ends with one JSON line. Random weights (transformers' init) unless a checkpoint
directory is given: speeds and memory do not depend on the values.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mlkv.model.config import PRESETS, MLKVConfig, preset_config
from mlkv.inference.engine import MLKVEngine, ProducerKVCache, Sampling
from mlkv.model.modeling import MLKVForCausalLM
from mlkv.model.sharing import PAPER_PRESETS, PAPER_SHAPE, resolve_plan

GB = 1e9
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
COMPILE_RESERVE_S = 90  # seconds a compiled run (one compilation + timing) is given before the deadline
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


# ---- memory accounting ----------------------------------------------------------------------------------------------
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


def simulated_try_fit(budget_bytes: int) -> TryFit:
    """An accounting allocator for machines without a device allocator: weights + engine buffers + step."""

    def fits(model, batch: int, context: int) -> bool:
        dtype = next(model.parameters()).dtype
        need = (weight_bytes(model) + MLKVEngine.fused_bytes(model.config, dtype)
                + MLKVEngine.buffer_bytes(model.config, batch, context, dtype)
                + step_activation_bytes(model.config, batch, dtype))
        return need <= budget_bytes

    return fits


def _is_oom(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def _free_cuda() -> None:
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
            if not _is_oom(err) and errors is not None:
                errors.append(f"batch {batch} context {context}: {str(err).splitlines()[0]}")
        engine.release()
        del engine
        _free_cuda()
        return ok

    return fits


@torch.no_grad()
def time_full_step(model, batch: int, context: int, device, iters: int = 5) -> dict:
    """Decode throughput at a given batch with ``context`` tokens in every row's cache (the max-batch point): the
    cache is allocated as the max-batch search did, every column is open, and one greedy step over the full context
    is timed ``iters`` times (median; eager step, no graph: at this size the kernels, not launches, take the time).
    The cache holds zeros rather than a real prefill (the time of a memory-bound step does not depend on them)."""
    engine = MLKVEngine(model, cuda_graphs=False, bucket=None)
    try:
        engine.probe_step(batch, context)  # allocation + warm-up step
        key = Sampling().key
        times = []
        for _ in range(iters):
            engine.col.fill_(context - 1)  # the same last column every time: the cache never grows
            engine.step.zero_()
            times.append(_wall(functools.partial(engine._run_step, context, key, False), device)[0])
    finally:
        engine.release()
        del engine
        _free_cuda()
    step = _median(times)
    return {"batch": batch, "context": context, "step_ms": step * 1e3, "decode_tok_s": batch / step,
            "iters": iters, "graph": False}


def time_at_max_batch(model, batch: int, context: int, device, backoff: float = 0.95, tries: int = 4) -> dict:
    """``time_full_step`` at the max batch. The search stops at the allocator's edge, where the timed steps' own
    transient buffers can fail to fit once the cache has fragmented memory (seen on an H200 at batch 88,409 of a
    384-wide model: 8.3 GiB of logits did not fit beside 8.3 GiB reserved but free); each out-of-memory error
    retries at ``backoff`` times the batch. The result's ``batch`` is the batch timed, ``max_batch`` the search's."""
    b = batch
    for attempt in range(tries):
        try:
            return {**time_full_step(model, b, context, device), "max_batch": batch, "backoffs": attempt}
        except RuntimeError as err:  # torch.OutOfMemoryError, or cuBLAS/cuDNN failing to allocate a workspace
            if not _is_oom(err) or attempt == tries - 1 or b <= 1:
                raise
        _free_cuda()  # outside the except: its traceback no longer holds the failed step's tensors
        b = max(1, int(b * backoff))
    raise AssertionError("unreachable")


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


# ---- timing ---------------------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _wall(fn, device) -> tuple[float, object]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def measure_bandwidth(device, nbytes: int | None = None, iters: int = 20) -> dict:
    """Device-to-device copy bandwidth: (bytes read + bytes written) / time, median of ``iters`` copies."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 26
    if device.type == "cuda":
        nbytes = min(nbytes, torch.cuda.mem_get_info(device)[0] // 4)
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).uniform_(-1, 1)  # never time on zeros
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    assert torch.equal(dst[:1024], src[:1024])
    sec = statistics.median(times)
    del src, dst
    _free_cuda()
    return {"bytes_copied": 2 * n * 2, "seconds": sec, "bytes_per_s": 2 * n * 2 / sec, "method": "copy_ read+write"}


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _prompts(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g)


def _peak_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None


# ---- one plan's measurements ----------------------------------------------------------------------------------------
def _engine_run(model, prompts: torch.Tensor, new_tokens: int, repeats: int, device, engine_kwargs) -> dict:
    """Engine generate: warm-up (captures the graphs) then ``repeats`` timed calls."""
    _free_cuda()
    _peak_reset(device)
    engine = MLKVEngine(model, **engine_kwargs)
    rows = prompts.tolist()
    warm_s, first = _wall(lambda: engine.generate(rows, new_tokens, stop_tokens=[]), device)
    pre, dec, wall = [], [], []
    for _ in range(repeats):
        sec, g = _wall(lambda: engine.generate(rows, new_tokens, stop_tokens=[]), device)
        pre.append(g.prefill_seconds)
        dec.append(g.decode_seconds)
        wall.append(sec)
    B, P = prompts.shape
    steps = new_tokens - 1
    res = {"prefill_s": _median(pre), "decode_s": _median(dec), "wall_s": _median(wall), "steps": steps,
           "first_call_s": warm_s, "compiled": bool(engine_kwargs.get("compile")),
           "cache_bytes": engine.cache_bytes, "graphs": len(engine._graphs), "peak_bytes": _peak(device)}
    res["prefill_tok_s"] = B * P / res["prefill_s"]
    if steps > 0:
        res["step_ms"] = res["decode_s"] / steps * 1e3
        res["decode_tok_s"] = B * steps / res["decode_s"]
    res["e2e_tok_s"] = B * new_tokens / res["wall_s"]
    res["tokens"] = first.output
    engine.release()  # graphs, pool and cache go now; the engine object itself is dropped on return
    _free_cuda()
    return res


def _hf_run(model, prompts: torch.Tensor, new_tokens: int, static: bool, compile_: bool, repeats: int,
            device) -> dict:
    """transformers' generate(): time for 1 and for N new tokens; per-step time = difference / (N - 1)."""
    ids = prompts.to(device)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        kw["cache_implementation"] = "static"
    if not compile_:
        kw["disable_compile"] = True
    _free_cuda()
    with torch.no_grad():
        if torch.device(device).type == "cuda":  # warm-up (and compile, if on)
            model.generate(ids, max_new_tokens=min(2, new_tokens), **kw)
        if compile_:
            model.generate(ids, max_new_tokens=new_tokens, **kw)
        t1 = [_wall(lambda: model.generate(ids, max_new_tokens=1, **kw), device)[0] for _ in range(repeats)]
        _peak_reset(device)
        runs = [_wall(lambda: model.generate(ids, max_new_tokens=new_tokens, **kw), device) for _ in range(repeats)]
    tn = [r[0] for r in runs]
    B, P = prompts.shape
    res = {"t1_s": _median(t1), "tn_s": _median(tn), "peak_bytes": _peak(device), "compiled": compile_}
    res["prefill_tok_s"] = B * P / res["t1_s"]
    if new_tokens > 1:
        res["step_ms"] = max(res["tn_s"] - res["t1_s"], 1e-9) / (new_tokens - 1) * 1e3
        res["decode_tok_s"] = B * (new_tokens - 1) / max(res["tn_s"] - res["t1_s"], 1e-9)
    res["e2e_tok_s"] = B * new_tokens / res["tn_s"]
    res["tokens"] = runs[-1][1][:, P:].cpu()
    _free_cuda()
    return res


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the fraction of tokens before the first disagreement."""
    n = min(a.shape[1], b.shape[1])
    same = (a[:, :n].cpu() == b[:, :n].cpu()).int().cumprod(1).sum(1)
    return float(same.float().mean() / n)


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "tokens"}


def measure_cache_allocation(model, batch: int, max_len: int, device) -> dict:
    """Allocate the engine's producer-only cache alone and compare with the analytic size."""
    config, dtype = model.config, next(model.parameters()).dtype
    analytic = config.sharing.kv_bytes_per_token(config.head_dim, dtype)
    _free_cuda()
    cuda = torch.device(device).type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else None
    cache = ProducerKVCache(config, batch, max_len, device, dtype)
    allocated = torch.cuda.memory_allocated(device) - before if cuda else cache.nbytes
    del cache
    _free_cuda()
    return {"batch": batch, "max_len": max_len, "kv_bytes_per_token_analytic": analytic,
            "cache_bytes_expected": analytic * batch * max_len, "cache_bytes_allocated": allocated,
            "kv_bytes_per_token_allocated": allocated / (batch * max_len), "measured_by_allocator": cuda}


# ---- models ---------------------------------------------------------------------------------------------------------
def _base(model_or_preset):
    """(config, loaded model or None, description) from a preset name, a directory, a config or a model."""
    if isinstance(model_or_preset, MLKVForCausalLM):
        return model_or_preset.config, model_or_preset, "given model"
    if isinstance(model_or_preset, MLKVConfig):
        return model_or_preset, None, "given config"
    name = str(model_or_preset)
    if name in PRESETS:
        return preset_config(name), None, f"preset {name}"
    path = Path(name)
    if path.is_dir():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        if not isinstance(config, MLKVConfig):
            raise ValueError(f"{path} holds a {type(config).__name__}, not an mlkv model: convert it first")
        if not any(path.glob("*.safetensors")):  # a config alone: its shape, random weights (speed does not care)
            return config, None, f"config {path} (no weights: random)"
        return config, path, f"checkpoint {path}"
    raise ValueError(f"model ({name!r}) is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory")


def _plan_label(plan) -> str:
    return plan.name or plan.structure


def _build(config: MLKVConfig, loaded, plan, device, dtype, seed: int):
    """A model for ``plan``: the loaded weights when the plan is the checkpoint's own, else random weights."""
    same = tuple(config.kv_source_layers) == plan.kv_source_layers and config.num_key_value_heads == \
        plan.num_key_value_heads
    if isinstance(loaded, MLKVForCausalLM) and same:
        model, weights = loaded.to(device=device, dtype=dtype), "given model"
    elif isinstance(loaded, Path) and same:
        model = MLKVForCausalLM.from_pretrained(loaded, dtype=dtype).to(device)
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


# ---- the benchmark --------------------------------------------------------------------------------------------------
def _ints(values, what: str) -> list[int]:
    out = []
    for v in values:
        for part in str(v).split(","):
            if part.strip():
                try:
                    n = int(part)
                except ValueError:
                    raise ValueError(f"{what} ({part!r}) must be positive integers") from None
                if n < 1:
                    raise ValueError(f"{what} ({n}) must be positive integers")
                out.append(n)
    if not out:
        raise ValueError(f"{what} is empty: give at least one value")
    return out


def run_bench(model_or_preset="pythia-160m", plans: Sequence | None = None, *, budget_gb: float | None = None,
              context: int | None = None, batches: Sequence[int] | None = None, prompt_len: int | None = None,
              new_tokens: int | None = None, step_context: int | None = None,
              step_batches: Sequence[int] | None = None, step_tokens: int | None = None,
              context_batch: int = 64, device=None, dtype=None, hf: bool = True, hf_compile: bool = False,
              hf_max_batch: int = 64, compile: bool = False, compile_plans: Sequence[str] | None = None,
              compile_max_batch: int = 1, repeats: int | None = None, hf_repeats: int = 1,
              search: bool = True, quick: bool = False, out_dir=None, progress: bool = True,
              try_fit: TryFit | None = None, seed: int = 0, deadline_s: float | None = None,
              print_table: bool = True, strict: bool = False, bucket: int | None | str = "auto") -> dict:
    """Benchmark each sharing plan (see the module docstring); returns the results (also written to ``out_dir``).

    ``budget_gb``: memory budget for the max-batch / max-context searches (default: the card's memory; on CPU a
    simulated allocator with 4 GB). ``context``: context of the max-batch search (default 2048, at most
    ``max_position_embeddings``). ``batches`` / ``prompt_len`` / ``new_tokens``: the generate runs.
    ``step_context`` / ``step_batches`` / ``step_tokens``: the decode-step runs. ``try_fit(model, batch, context)``
    replaces the real allocator. ``compile``: afterwards, also time the engine with its decode step through
    ``torch.compile`` ("engine_compiled") on the generate and step runs with batch <= ``compile_max_batch``, for
    ``compile_plans`` (default all; one compilation per plan and run shape). ``deadline_s``: skip transformers runs,
    searches and compiled runs once this many seconds have passed (a compiled run once fewer than
    ``COMPILE_RESERVE_S`` are left). ``strict``: raise on a failed measurement instead of recording it in
    ``meta["errors"]`` and going on. ``bucket``: the engine's attention-length granularity (``MLKVEngine``).
    """
    t_start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but torch.cuda.is_available() is False")
    cuda = device.type == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if cuda else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"dtype ({dtype!r}) must be one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype.lower()]
    config, loaded, source = _base(model_or_preset)
    max_pos = config.max_position_embeddings
    shape = (config.num_hidden_layers, config.num_attention_heads)
    if plans is None or len(plans) == 0:
        plans = [config.sharing] if loaded is not None else (PAPER_PRESETS if shape == PAPER_SHAPE else ["mha", "mqa"])
    plans = [resolve_plan(p if not isinstance(p, str) else p.strip(), *shape) for p in plans]

    # Arguments, checked before anything is built.
    repeats = repeats if repeats is not None else (1 if quick else 3)
    prompt_len = prompt_len if prompt_len is not None else min(512, max_pos // 4)
    new_tokens = new_tokens if new_tokens is not None else min(32 if quick else 128, max(2, max_pos // 8))
    batches = _ints(batches if batches is not None else [1, 64], "batch sizes")
    step_context = step_context if step_context is not None else min(1024, max_pos // 2)
    step_batches = _ints(step_batches if step_batches is not None else ([1, 64] if quick else [1, 64, 128, 256]),
                         "step batch sizes")
    step_tokens = step_tokens if step_tokens is not None else (16 if quick else 32)
    context = context if context is not None else min(2048, max_pos)
    for name, value in (("context", context), ("step context", step_context),
                        ("prompt length + new tokens", prompt_len + new_tokens)):
        if value < 1:
            raise ValueError(f"{name} ({value}) must be positive")
        if value > max_pos:
            raise ValueError(f"{name} ({value}) is longer than max_position_embeddings ({max_pos})")
    if prompt_len < 1 or new_tokens < 2:
        raise ValueError(f"prompt length ({prompt_len}) must be >= 1 and new tokens ({new_tokens}) >= 2")
    if not 2 <= step_tokens < step_context:
        raise ValueError(f"step tokens ({step_tokens}) must be at least 2 and below the step context "
                         f"({step_context})")
    if context_batch < 1:
        raise ValueError(f"context batch ({context_batch}) must be positive")
    weights_by_plan = {_plan_label(p): weight_bytes(config.with_plan(p), dtype) for p in plans}
    card_bytes = torch.cuda.get_device_properties(device).total_memory if cuda else None
    if budget_gb is not None:
        if budget_gb <= 0:
            raise ValueError(f"budget ({budget_gb} GB) must be positive")
        budget_bytes = int(budget_gb * GB)
        for label, w in weights_by_plan.items():
            if budget_bytes < w:
                raise ValueError(f"budget ({budget_gb:g} GB) is smaller than the model weights ({w / GB:.3g} GB, "
                                 f"plan {label}, {str(dtype).replace('torch.', '')})")
        if card_bytes is not None and budget_bytes > card_bytes:
            raise ValueError(f"budget ({budget_gb:g} GB) is larger than the card's memory ({card_bytes / GB:.3g} GB)")
    else:
        budget_bytes = card_bytes if cuda else int(4 * GB)
    fit_method = "injected" if try_fit is not None else ("cuda allocator (OutOfMemoryError)" if cuda
                                                         else "simulated (cpu: weights + buffers + step estimate)")
    fit_errors: list[str] = []
    if try_fit is None:
        try_fit = cuda_try_fit(fit_errors) if cuda else simulated_try_fit(budget_bytes)

    if bucket not in ("auto", None) and (not isinstance(bucket, int) or bucket < 1):
        raise ValueError(f"bucket ({bucket!r}) must be a positive number of cache columns, None or 'auto'")
    engine_kwargs: dict = {"bucket": bucket}
    wanted = {p.lower() for p in compile_plans} if compile_plans else None
    meta = {"source": source, "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda
            else platform.processor() or "cpu", "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "shape": {"layers": shape[0], "heads": shape[1], "hidden": config.hidden_size,
                      "head_dim": config.head_dim, "vocab": config.vocab_size, "max_position": max_pos},
            "weights_note": "random weights (transformers init) unless a checkpoint is given; speed and memory do not "
                            "depend on the values",
            "hf_static_note": "transformers generate(cache_implementation='static'): hf_static eager "
                              "(disable_compile=True)" + ("; hf_static_compiled auto-compiled (its torch.compile "
                                                           "fast path)" if hf_compile else ""),
            "budget_bytes": budget_bytes, "card_bytes": card_bytes, "fit_method": fit_method,
            "settings": dict(batches=batches, prompt_len=prompt_len, new_tokens=new_tokens, step_context=step_context,
                             step_batches=step_batches, step_tokens=step_tokens, context=context,
                             context_batch=context_batch, repeats=repeats, hf_repeats=hf_repeats, hf=hf,
                             hf_compile=hf_compile, hf_max_batch=hf_max_batch, compile=bool(compile), bucket=bucket,
                             compile_plans=list(compile_plans or []), compile_max_batch=compile_max_batch,
                             quick=quick)}
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    def late(reserve_s: float = 0.0) -> bool:
        """Past the deadline, or within ``reserve_s`` of it."""
        return deadline_s is not None and time.perf_counter() - t_start + reserve_s > deadline_s

    errors: list[str] = []
    seed_of = {"generate": seed, "step": seed + 1000}

    def row_prompts(run: str, row: dict) -> torch.Tensor:
        """The prompts of a generate or step row (the same for every path timed on it)."""
        return _prompts(row["batch"], row["prompt_len"], config.vocab_size, seed_of[run] + row["batch"])

    def guarded(what: str, fn):
        """Run one measurement; unless ``strict``, a failure is recorded and the benchmark goes on."""
        try:
            return fn()
        except Exception as err:
            if strict:
                raise
            text = str(err).strip().splitlines()
            msg = f"{what}: {type(err).__name__}: {text[0] if text else ''}"
            errors.append(msg)
            print(f"\nmlkv bench: {msg}", file=sys.stderr)
            _free_cuda()
            return None

    tasks_per_plan = 1 + len(batches) + len(step_batches) + (2 if search else 0) + (1 if compile else 0)
    bar = _progress(len(plans) * tasks_per_plan + 1, progress)
    bar.set_description("bandwidth")
    bandwidth = measure_bandwidth(device)
    bar.update(1)
    results = []
    for plan in plans:
        label = _plan_label(plan)
        bar.set_description(f"{label}: build")
        model, weights = _build(config, loaded, plan, device, dtype, seed)
        r = {"plan": label, "structure": plan.structure, "producers": plan.producers,
             "kv_heads_per_producer": plan.num_key_value_heads, "weights": weights,
             "weight_bytes": weight_bytes(model), "step_weight_bytes_b1": step_weight_bytes(model, 1),
             "kv_bytes_per_token": plan.kv_bytes_per_token(config.head_dim, dtype),
             "cache": measure_cache_allocation(model, max(step_batches), step_context, device),
             "generate": [], "step": [], "skipped": []}
        bar.update(1)
        def run_hf(row, what, prompts, n):
            """transformers' dynamic and static-cache generate() on the same prompts, into ``row``."""
            _put(row, "hf_dynamic", guarded(f"{label} transformers dynamic {what}", lambda: _hf_run(
                model, prompts, n, False, False, hf_repeats, device)))
            _put(row, "hf_static", guarded(f"{label} transformers static {what}", lambda: _hf_run(
                model, prompts, n, True, False, hf_repeats, device)))
            if hf_compile and not late():  # its compiled fast path, next to the eager one
                _put(row, "hf_static_compiled", guarded(f"{label} transformers static compiled {what}",
                                                        lambda: _hf_run(model, prompts, n, True, True, hf_repeats,
                                                                        device)))

        with torch.no_grad():
            for b in batches:
                bar.set_description(f"{label}: generate b={b}")
                row = {"batch": b, "prompt_len": prompt_len, "new_tokens": new_tokens}
                prompts = row_prompts("generate", row)
                _put(row, "engine", guarded(f"{label} engine generate b={b}", lambda: _engine_run(
                    model, prompts, new_tokens, repeats, device, engine_kwargs)))
                if hf and b <= hf_max_batch and not late():
                    run_hf(row, f"b={b}", prompts, new_tokens)
                    if "engine" in row and "hf_static" in row:
                        row["agreement_vs_hf_static"] = _agreement(row["engine"]["tokens"],
                                                                   row["hf_static"]["tokens"])
                elif hf:
                    why = "deadline" if late() else "batch > hf_max_batch"
                    r["skipped"].append(f"transformers generate b={b} ({why})")
                _speedups(row)
                r["generate"].append(_strip_row(row))
                bar.update(1)
            P = step_context - step_tokens
            for b in step_batches:
                bar.set_description(f"{label}: step b={b} ctx={step_context}")
                row = {"batch": b, "context": step_context, "prompt_len": P, "new_tokens": step_tokens}
                prompts = row_prompts("step", row)
                # KV in use: decode steps write columns P .. P + steps - 2 and a step at column c reads c + 1 tokens.
                kv_len = P + 1 + (step_tokens - 2) / 2
                kv_bytes = r["kv_bytes_per_token"] * b * kv_len
                row["kv_tokens_in_use_mean"] = kv_len
                row["hbm_bytes_per_step"] = step_weight_bytes(model, b) + kv_bytes
                row["hbm_bound_ms"] = row["hbm_bytes_per_step"] / bandwidth["bytes_per_s"] * 1e3
                _put(row, "engine", guarded(f"{label} engine step b={b}", lambda: _engine_run(
                    model, prompts, step_tokens, repeats, device, engine_kwargs)))
                if hf and b <= hf_max_batch and not late():
                    run_hf(row, f"step b={b}", prompts, step_tokens)
                elif hf:
                    why = "deadline" if late() else "batch > hf_max_batch"
                    r["skipped"].append(f"transformers step b={b} ({why})")
                _bound_ratios(row, ("engine", "hf_dynamic", "hf_static", "hf_static_compiled"))
                _speedups(row)
                r["step"].append(_strip_row(row))
                bar.update(1)
            if search and not late():
                bar.set_description(f"{label}: max batch @ {context}")
                _set_budget(device, budget_bytes, card_bytes)
                try:
                    _put(r, "max_batch", guarded(f"{label} max batch search", lambda: find_max_batch(
                        model, context, try_fit, budget_bytes)))
                    bar.update(1)
                    bar.set_description(f"{label}: max context @ b={context_batch}")
                    _put(r, "max_context", guarded(f"{label} max context search", lambda: find_max_context(
                        model, context_batch, try_fit, budget_bytes)))
                    bar.update(1)
                    if r.get("max_batch", {}).get("max_batch", 0) > 0 and fit_method.startswith("cuda"):
                        # a batch that really fits on this card
                        bar.set_description(f"{label}: decode at max batch")
                        _put(r, "max_batch_decode", guarded(
                            f"{label} decode at max batch",
                            lambda: time_at_max_batch(model, r["max_batch"]["max_batch"], context, device)))
                finally:
                    _set_budget(device, None, card_bytes)
            elif search:
                r["skipped"].append("max batch / max context search (deadline)")
                bar.update(2)
        results.append(r)
        del model
        _free_cuda()
    if compile:  # last: one compilation per plan and run shape, each worth less than the measurements above
        for plan, r in zip(plans, results):
            bar.set_description(f"{r['plan']}: compiled engine")
            if wanted is not None and r["plan"].lower() not in wanted and plan.structure not in wanted:
                bar.update(1)
                continue
            if late(COMPILE_RESERVE_S):
                r["skipped"].append("compiled engine (deadline)")
                bar.update(1)
                continue
            model, _ = _build(config, loaded, plan, device, dtype, seed)
            with torch.no_grad():
                for run in ("generate", "step"):
                    for row in r[run]:
                        b = row["batch"]
                        if b > compile_max_batch:
                            continue
                        if late(COMPILE_RESERVE_S):
                            r["skipped"].append(f"compiled engine {run} b={b} (deadline)")
                            continue
                        bar.set_description(f"{r['plan']}: compiled engine {run} b={b}")
                        prompts = row_prompts(run, row)
                        c = guarded(f"{r['plan']} compiled engine {run} b={b}", lambda: _engine_run(
                            model, prompts, row["new_tokens"], repeats, device, {"compile": True, "bucket": bucket}))
                        if c is None:
                            continue
                        row["engine_compiled"] = _strip(c)
                        if run == "step":
                            _bound_ratios(row, ("engine_compiled",))
                        _speedups(row, "engine_compiled")
            bar.update(1)
            del model
            _free_cuda()
    bar.close()
    meta["errors"] = errors
    meta["fit_errors"] = fit_errors
    meta["bandwidth"] = bandwidth
    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    report = {"meta": meta, "plans": results, "summary": _summary(results)}
    if out_dir is not None:
        report["files"] = write_outputs(report, Path(out_dir))
    if print_table:
        print_report(report)
        print(json.dumps({"bench": report["summary"], "files": report.get("files"), "seconds": meta["seconds"],
                          "device": meta["device_name"], "dtype": meta["dtype"], "errors": errors}))
    return report


def _set_budget(device, budget_bytes: int | None, card_bytes: int | None) -> None:
    """Cap the caching allocator at ``budget_bytes`` (``set_per_process_memory_fraction``); ``None`` lifts the cap."""
    if torch.device(device).type != "cuda" or card_bytes is None:
        return
    fraction = 1.0 if budget_bytes is None else min(1.0, budget_bytes / card_bytes)
    torch.cuda.set_per_process_memory_fraction(fraction, torch.device(device).index or 0)


def _put(d: dict, key: str, value) -> None:
    if value is not None:
        d[key] = value


SPEEDUP_BASES = {"engine": ("hf_dynamic", "hf_static", "hf_static_compiled"),
                 "engine_compiled": ("hf_dynamic", "hf_static", "hf_static_compiled", "engine")}
SPEEDUP_PREFIX = {"engine": "", "engine_compiled": "compiled_"}


def _speedups(row: dict, impl: str = "engine") -> None:
    """Step and end-to-end speedups of ``impl`` over the other paths measured on ``row``: ``step_speedup_vs_{k}``
    for the engine, ``compiled_step_speedup_vs_{k}`` for the compiled engine."""
    if impl not in row:
        return
    e, prefix = row[impl], SPEEDUP_PREFIX[impl]
    for k in SPEEDUP_BASES[impl]:
        if k in row and "step_ms" in row[k] and "step_ms" in e:
            row[f"{prefix}step_speedup_vs_{k}"] = row[k]["step_ms"] / e["step_ms"]
            row[f"{prefix}e2e_speedup_vs_{k}"] = e["e2e_tok_s"] / row[k]["e2e_tok_s"]


def _bound_ratios(row: dict, impls: Sequence[str]) -> None:
    """Each measured path's step time against the step row's HBM bound (and the bandwidth fraction it reaches)."""
    for k in impls:
        if k in row:
            row[k]["bound_ratio"] = row[k]["step_ms"] / row["hbm_bound_ms"]
            row[k]["bandwidth_fraction"] = row["hbm_bound_ms"] / row[k]["step_ms"]


def _strip_row(row: dict) -> dict:
    return {k: (_strip(v) if isinstance(v, dict) else v) for k, v in row.items()}


def _summary(results: list[dict]) -> dict:
    out = {}
    for r in results:
        s = {"kv_bytes_per_token": r["kv_bytes_per_token"],
             "kv_bytes_per_token_allocated": r["cache"]["kv_bytes_per_token_allocated"]}
        for row in r["generate"]:
            b = row["batch"]
            s[f"gen_b{b}_step_ms"] = _round(row.get("engine", {}).get("step_ms"))
            if "step_speedup_vs_hf_static" in row:
                s[f"gen_b{b}_speedup_vs_hf_static"] = _round(row["step_speedup_vs_hf_static"])
            if "step_speedup_vs_hf_static_compiled" in row:
                s[f"gen_b{b}_speedup_vs_hf_static_compiled"] = _round(row["step_speedup_vs_hf_static_compiled"])
            if "engine_compiled" in row:
                s[f"gen_b{b}_compiled_step_ms"] = _round(row["engine_compiled"].get("step_ms"))
                if "compiled_step_speedup_vs_hf_static" in row:
                    s[f"gen_b{b}_compiled_speedup_vs_hf_static"] = _round(row["compiled_step_speedup_vs_hf_static"])
        for row in r["step"]:
            b = row["batch"]
            s[f"step_b{b}_ctx{row['context']}_ms"] = _round(row.get("engine", {}).get("step_ms"))
            s[f"step_b{b}_bound_ratio"] = _round(row.get("engine", {}).get("bound_ratio"))
            if "step_speedup_vs_hf_static" in row:
                s[f"step_b{b}_speedup_vs_hf_static"] = _round(row["step_speedup_vs_hf_static"])
            if "engine_compiled" in row:
                s[f"step_b{b}_ctx{row['context']}_compiled_ms"] = _round(row["engine_compiled"]["step_ms"])
                s[f"step_b{b}_compiled_bound_ratio"] = _round(row["engine_compiled"]["bound_ratio"])
                for k in ("engine", "hf_static"):
                    if f"compiled_step_speedup_vs_{k}" in row:
                        s[f"step_b{b}_compiled_speedup_vs_{k}"] = _round(row[f"compiled_step_speedup_vs_{k}"])
        if "max_batch" in r:
            s["max_batch"] = r["max_batch"]["max_batch"]
        if "max_batch_decode" in r:
            s["max_batch_decode_tok_s"] = _round(r["max_batch_decode"]["decode_tok_s"])
            s["max_batch_decode_batch"] = r["max_batch_decode"]["batch"]  # below max_batch after an OOM back-off
        if "max_context" in r:
            s["max_context"] = r["max_context"]["max_context"]
        out[r["plan"]] = s
    return out


def _round(x, n: int = 4):
    return None if x is None else float(f"{x:.{n}g}")


# ---- output ---------------------------------------------------------------------------------------------------------
CSV_FIELDS = ["plan", "run", "impl", "batch", "prompt_len", "new_tokens", "context", "step_ms", "decode_tok_s",
              "prefill_tok_s", "e2e_tok_s", "peak_gb", "hbm_bound_ms", "bound_ratio", "bandwidth_fraction",
              "step_speedup_vs_hf_static", "kv_bytes_per_token", "kv_bytes_per_token_allocated", "max_batch",
              "max_batch_decode_tok_s", "max_context"]


def csv_rows(report: dict) -> list[dict]:
    rows = []
    for r in report["plans"]:
        base = {"plan": r["plan"], "kv_bytes_per_token": r["kv_bytes_per_token"],
                "kv_bytes_per_token_allocated": r["cache"]["kv_bytes_per_token_allocated"],
                "max_batch": r.get("max_batch", {}).get("max_batch"),
                "max_batch_decode_tok_s": r.get("max_batch_decode", {}).get("decode_tok_s"),
                "max_context": r.get("max_context", {}).get("max_context")}
        for run in ("generate", "step"):
            for row in r[run]:
                for impl in ("engine", "engine_compiled", "hf_dynamic", "hf_static", "hf_static_compiled"):
                    if impl not in row:
                        continue
                    m = row[impl]
                    rows.append({**base, "run": run, "impl": impl, "batch": row["batch"],
                                 "prompt_len": row["prompt_len"], "new_tokens": row["new_tokens"],
                                 "context": row.get("context", row["prompt_len"] + row["new_tokens"]),
                                 "step_ms": m.get("step_ms"), "decode_tok_s": m.get("decode_tok_s"),
                                 "prefill_tok_s": m.get("prefill_tok_s"), "e2e_tok_s": m.get("e2e_tok_s"),
                                 "peak_gb": m["peak_bytes"] / GB if m.get("peak_bytes") is not None else None,
                                 "hbm_bound_ms": row.get("hbm_bound_ms"), "bound_ratio": m.get("bound_ratio"),
                                 "bandwidth_fraction": m.get("bandwidth_fraction"),
                                 "step_speedup_vs_hf_static": row.get("step_speedup_vs_hf_static")
                                 if impl == "engine" else row.get("compiled_step_speedup_vs_hf_static")
                                 if impl == "engine_compiled" else None})
    return rows


def write_outputs(report: dict, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out_dir / "inference.json"), "csv": str(out_dir / "inference.csv")}
    Path(files["json"]).write_text(json.dumps(report, indent=1, default=str))
    with open(files["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in csv_rows(report):
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    files.update(write_plots(report, out_dir))
    return files


def write_plots(report: dict, out_dir: Path) -> dict:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return {}
    meta, plans = report["meta"], report["plans"]
    title = f"{meta['device_name']}, {meta['dtype']}"
    ctx = meta["settings"]["step_context"]
    files = {}
    cmap = plt.get_cmap("viridis")
    col = {r["plan"]: cmap(i / max(1, len(plans) - 1)) for i, r in enumerate(plans)}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in plans:
        pts = []
        for row in r["step"]:
            e = row.get("engine")
            if e is None:
                continue
            peak = e.get("peak_bytes")  # cpu: no allocator statistics, plot weights + cache
            pts.append((row["batch"], (peak if peak is not None else r["weight_bytes"] + e["cache_bytes"]) / GB))
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", color=col[r["plan"]], label=r["plan"])
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="peak memory (GB)",
           title=f"engine peak memory, context {ctx}\n{title}")
    ax.legend(fontsize=7, ncol=2)
    files["memory_vs_batch"] = _save(fig, out_dir / "memory_vs_batch.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in plans:
        pts = sorted((row["batch"], row["engine"]["decode_tok_s"]) for row in r["step"] if "engine" in row)
        if pts:
            ax.plot(*zip(*pts), marker="o", color=col[r["plan"]], label=r["plan"])
        hf = sorted((row["batch"], row["hf_static"]["decode_tok_s"]) for row in r["step"] if "hf_static" in row)
        if hf:
            ax.plot(*zip(*hf), marker="x", ls="--", color=col[r["plan"]], alpha=0.6)
        cmp = sorted((row["batch"], row["engine_compiled"]["decode_tok_s"]) for row in r["step"]
                     if "engine_compiled" in row)
        if cmp:
            ax.plot(*zip(*cmp), marker="s", ls=":", color=col[r["plan"]])
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s",
           title=f"decode throughput, context {ctx} (solid: engine, dotted: compiled engine, dashed: transformers "
                 f"static)\n{title}")
    ax.legend(fontsize=7, ncol=2)
    files["throughput_vs_batch"] = _save(fig, out_dir / "throughput_vs_batch.png")

    with_batch = [r for r in plans if "max_batch" in r]
    if with_batch:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = [r["plan"] for r in with_batch]
        values = [r["max_batch"]["max_batch"] for r in with_batch]
        ax.bar(names, values, color=[col[n] for n in names])
        for i, v in enumerate(values):
            ax.text(i, v, str(v), ha="center", va="bottom", fontsize=7)
        ax.set(yscale="log", ylabel="max batch",
               title=f"max batch at context {with_batch[0]['max_batch']['context']}, budget "
                     f"{meta['budget_bytes'] / GB:.3g} GB ({meta['fit_method'].split(' (')[0]})\n{title}")
        ax.tick_params(axis="x", rotation=45)
        files["max_batch"] = _save(fig, out_dir / "max_batch.png")
    return files


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def print_report(report: dict) -> None:
    meta, plans = report["meta"], report["plans"]
    bw = meta["bandwidth"]["bytes_per_s"] / 1e12
    print(f"\n{meta['device_name']} ({meta['device']}), {meta['dtype']}, {meta['source']}; copy bandwidth "
          f"{bw:.3g} TB/s; {meta['weights_note']}; {meta['hf_static_note']}")
    gen_b = sorted({row["batch"] for r in plans for row in r["generate"]})
    step_b = sorted({row["batch"] for r in plans for row in r["step"]})
    compiled = sorted({row["batch"] for r in plans for row in r["generate"] if "engine_compiled" in row})
    step_compiled = sorted({row["batch"] for r in plans for row in r["step"] if "engine_compiled" in row})
    hf_cmp = sorted({row["batch"] for r in plans for row in r["generate"] if "hf_static_compiled" in row})
    header = ["plan", "KV B/tok", "alloc B/tok"]
    for b in gen_b:
        header += [f"gen b{b} ms", "x hf-st"] + (["x hf-stc"] if b in hf_cmp else []) + (
            [f"cmp b{b} ms", "x hf-st"] + (["x hf-stc"] if b in hf_cmp else []) if b in compiled else [])
    for b in step_b:
        header += [f"ctx b{b} ms", "x bound", "x hf-st"] + ([f"ctx-cmp b{b} ms", "x bound"] if b in step_compiled
                                                            else [])
    header += ["max batch", "tok/s@max", "max ctx"]
    rows = []
    for r in plans:
        cells = [r["plan"], str(r["kv_bytes_per_token"]), _fmt(r["cache"]["kv_bytes_per_token_allocated"], ".6g")]
        gen = {row["batch"]: row for row in r["generate"]}
        for b in gen_b:
            row = gen.get(b, {})
            cells += [_fmt(row.get("engine", {}).get("step_ms")), _fmt(row.get("step_speedup_vs_hf_static"), ".2f")]
            if b in hf_cmp:
                cells += [_fmt(row.get("step_speedup_vs_hf_static_compiled"), ".2f")]
            if b in compiled:
                cells += [_fmt(row.get("engine_compiled", {}).get("step_ms")),
                          _fmt(row.get("compiled_step_speedup_vs_hf_static"), ".2f")]
                if b in hf_cmp:
                    cells += [_fmt(row.get("compiled_step_speedup_vs_hf_static_compiled"), ".2f")]
        step = {row["batch"]: row for row in r["step"]}
        for b in step_b:
            row = step.get(b, {})
            e = row.get("engine", {})
            cells += [_fmt(e.get("step_ms")), _fmt(e.get("bound_ratio"), ".2f"),
                      _fmt(row.get("step_speedup_vs_hf_static"), ".2f")]
            if b in step_compiled:
                c = row.get("engine_compiled", {})
                cells += [_fmt(c.get("step_ms")), _fmt(c.get("bound_ratio"), ".2f")]
        cells += [str(r.get("max_batch", {}).get("max_batch", "-")),
                  _fmt(r.get("max_batch_decode", {}).get("decode_tok_s"), ".4g"),
                  str(r.get("max_context", {}).get("max_context", "-"))]
        rows.append(cells)
    widths = [max([len(h)] + [len(c[i]) for c in rows]) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for c in rows:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))
    s = meta["settings"]
    print(f"gen: prompt {s['prompt_len']} + {s['new_tokens']} new tokens, ms per decode step (cmp: torch.compile'd "
          f"engine); ctx: decode steps at context {s['step_context']}; x bound: step time / HBM bound "
          f"(weights + KV in use at the measured copy bandwidth); x hf-st: transformers static-cache step time / "
          f"engine's (x hf-stc: its compiled path); ctx-cmp: the torch.compile'd engine's decode steps; tok/s@max: "
          f"decode tokens/s at the max batch, full context; max batch at context {s['context']}, max ctx at batch "
          f"{s['context_batch']} ({meta['fit_method']}, budget {meta['budget_bytes'] / GB:.3g} GB)")
    for r in plans:
        if r["skipped"]:
            print(f"{r['plan']}: skipped {', '.join(r['skipped'])}")
    for e in meta.get("errors", []):
        print(f"ERROR {e}")


class _NoBar:
    def update(self, n=1):
        pass

    def set_description(self, s):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, dynamic_ncols=True)


# ---- command line ---------------------------------------------------------------------------------------------------
def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR_OR_PRESET", nargs="?", default="pythia-160m",
                        help="a preset (default pythia-160m, random weights), a converted checkpoint directory, "
                             "or a directory holding only an mlkv config.json (its shape, random weights)")
    parser.add_argument("--plans", nargs="+", default=None,
                        help="sharing plans (names or comma lists; default: the paper's nine on a 12x12 shape)")
    parser.add_argument("--budget-gb", type=float, default=None, help="memory budget (default: the card's memory)")
    parser.add_argument("--context", type=int, default=None, help="context of the max-batch search (default 2048)")
    parser.add_argument("--batch", nargs="+", default=None, help="batch sizes of the generate runs (default 1 64)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt length of the generate runs (512)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens of the generate runs (128)")
    parser.add_argument("--step-context", type=int, default=None, help="context of the decode-step runs (1024)")
    parser.add_argument("--step-batch", nargs="+", default=None, help="batch sizes of the decode-step runs")
    parser.add_argument("--step-tokens", type=int, default=None, help="decode steps timed per step run")
    parser.add_argument("--context-batch", type=int, default=64, help="batch of the max-context search (64)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bf16 (default on cuda), fp16 or fp32 (default on cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed engine runs per point (median)")
    parser.add_argument("--hf-repeats", type=int, default=1, help="timed transformers runs per point (median)")
    parser.add_argument("--hf-max-batch", type=int, default=64, help="largest batch run through transformers")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' generate()")
    parser.add_argument("--hf-compile", action="store_true",
                        help="let transformers auto-compile its static-cache path (slow to compile per shape)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the engine with torch.compile'd decode steps (generate and step runs "
                             "with batch <= --compile-max-batch; one compilation per plan and run shape, run last)")
    parser.add_argument("--compile-plans", nargs="+", default=None, help="plans for --compile (default: all)")
    parser.add_argument("--compile-max-batch", type=int, default=1,
                        help="largest batch of the generate and step runs timed with --compile (default 1)")
    parser.add_argument("--no-search", action="store_true", help="skip the max-batch / max-context searches")
    parser.add_argument("--bucket", default="auto",
                        help="engine decode steps attend over the used cache columns rounded up to this many "
                             "(auto: 256, or the whole cache when compiled; none: the whole cache)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="skip transformers runs and searches once this many seconds have passed")
    parser.add_argument("--quick", action="store_true", help="fewer tokens, repeats and batch sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for inference.json / .csv / plots")
    parser.add_argument("--no-progress", action="store_true")


def _bucket_arg(value: str) -> int | None | str:
    if value in ("auto", "none"):
        return None if value == "none" else value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--bucket ({value!r}) must be a positive integer, 'none' or 'auto'") from None


def run_bench_command(args, model=None) -> int:
    """Benchmark decoding: the mlkv engine (static producer-only cache, CUDA graphs) against transformers'
    generate() for each sharing plan: KV bytes per token, memory, max batch and context under a budget, decode and
    prefill speed, and decode step time against the HBM bound. Writes JSON, CSV and plots with --out."""
    run_bench(model if model is not None else args.model, args.plans, budget_gb=args.budget_gb, context=args.context,
              batches=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
              step_context=args.step_context, step_batches=args.step_batch, step_tokens=args.step_tokens,
              context_batch=args.context_batch, device=args.device, dtype=args.dtype, hf=not args.no_hf,
              hf_compile=args.hf_compile, hf_max_batch=args.hf_max_batch, compile=args.compile,
              compile_plans=args.compile_plans, compile_max_batch=args.compile_max_batch,
              repeats=args.repeats, hf_repeats=args.hf_repeats, search=not args.no_search, quick=args.quick,
              out_dir=args.out, progress=not args.no_progress, seed=args.seed, deadline_s=args.deadline_s,
              bucket=_bucket_arg(args.bucket))
    return 0


__all__ = ["run_bench", "search_max", "find_max_batch", "find_max_context", "cuda_try_fit", "simulated_try_fit",
           "measure_bandwidth", "measure_cache_allocation", "weight_bytes", "time_full_step", "time_at_max_batch",
           "add_bench_arguments", "run_bench_command"]
