"""Timing: the card's copy bandwidth, engine and transformers ``generate`` runs, one full-context decode step, and
the ratios derived from them (speedups, step time against the HBM bound).

Times are wall-clock seconds between device synchronizations (``wall``), the median of repeated runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from mlkv.inference.bench.memory import free_cuda, is_oom
from mlkv.inference.engine import MLKVEngine

__all__ = ["sync", "wall", "median", "random_prompts", "measure_bandwidth", "time_full_step", "time_at_max_batch",
           "engine_run", "hf_run", "agreement", "speedups", "bound_ratios"]


# ---- clocks ---------------------------------------------------------------------------------------------------------
def sync(device) -> None:
    """Wait for the device (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def wall(fn, device) -> tuple[float, object]:
    """``(seconds, fn())``, the device synchronized before and after."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """``(batch, length)`` token ids in ``[1, vocab)``, the same for a seed on every machine."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g)


def _peak_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None


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
    free_cuda()
    return {"bytes_copied": 2 * n * 2, "seconds": sec, "bytes_per_s": 2 * n * 2 / sec, "method": "copy_ read+write"}


# ---- one decode step at the max batch -------------------------------------------------------------------------------
@torch.no_grad()
def time_full_step(model, batch: int, context: int, device, iters: int = 5, decode_attention: str = "sdpa") -> dict:
    """Decode throughput at a given batch with ``context`` tokens in every row's cache (the max-batch point): the
    cache is allocated as the max-batch search did, every column is open, and one greedy step over the full context
    is timed ``iters`` times (median; eager step, no graph: at this size the kernels, not launches, take the time).
    The cache holds zeros rather than a real prefill (the time of a memory-bound step does not depend on them)."""
    engine = MLKVEngine(model, cuda_graphs=False, bucket=None, decode_attention=decode_attention)
    run_one_step = None
    try:
        run_one_step = engine.full_context_step(batch, context)  # allocation + warm-up step
        times = [wall(run_one_step, device)[0] for _ in range(iters)]
    finally:
        engine.release()
        del engine, run_one_step
        free_cuda()
    step = median(times)
    return {"batch": batch, "context": context, "step_ms": step * 1e3, "decode_tok_s": batch / step,
            "iters": iters, "graph": False}


def time_at_max_batch(model, batch: int, context: int, device, backoff: float = 0.95, tries: int = 4,
                      decode_attention: str = "sdpa") -> dict:
    """``time_full_step`` at the max batch. The search stops at the allocator's edge, where the timed steps' own
    transient buffers can fail to fit once the cache has fragmented memory (seen on an H200 at batch 88,409 of a
    384-wide model: 8.3 GiB of logits did not fit beside 8.3 GiB reserved but free); each out-of-memory error
    retries at ``backoff`` times the batch. The result's ``batch`` is the batch timed, ``max_batch`` the search's."""
    b = batch
    for attempt in range(tries):
        try:
            return {**time_full_step(model, b, context, device, decode_attention=decode_attention),
                    "max_batch": batch, "backoffs": attempt}
        except RuntimeError as err:  # torch.OutOfMemoryError, or cuBLAS/cuDNN failing to allocate a workspace
            if not is_oom(err) or attempt == tries - 1 or b <= 1:
                raise
        free_cuda()  # outside the except: its traceback no longer holds the failed step's tensors
        b = max(1, int(b * backoff))
    raise AssertionError("unreachable")


# ---- generate runs --------------------------------------------------------------------------------------------------
def engine_run(model, prompts: torch.Tensor, new_tokens: int, repeats: int, device, engine_kwargs) -> dict:
    """Engine generate: warm-up (captures the graphs) then ``repeats`` timed calls. ``tokens``: the warm-up's
    output, for the agreement with transformers."""
    free_cuda()
    _peak_reset(device)
    engine = MLKVEngine(model, **engine_kwargs)
    rows = prompts.tolist()
    warm_s, first = wall(lambda: engine.generate(rows, new_tokens, stop_tokens=[]), device)
    pre, dec, walls = [], [], []
    for _ in range(repeats):
        sec, g = wall(lambda: engine.generate(rows, new_tokens, stop_tokens=[]), device)
        pre.append(g.prefill_seconds)
        dec.append(g.decode_seconds)
        walls.append(sec)
    B, P = prompts.shape
    steps = new_tokens - 1
    res = {"prefill_s": median(pre), "decode_s": median(dec), "wall_s": median(walls), "steps": steps,
           "first_call_s": warm_s, "compiled": bool(engine_kwargs.get("compile")),
           "cache_bytes": engine.cache_bytes, "graphs": engine.captured_graphs, "peak_bytes": _peak(device)}
    res["prefill_tok_s"] = B * P / res["prefill_s"]
    if steps > 0:
        res["step_ms"] = res["decode_s"] / steps * 1e3
        res["decode_tok_s"] = B * steps / res["decode_s"]
    res["e2e_tok_s"] = B * new_tokens / res["wall_s"]
    res["tokens"] = first.output
    engine.release()  # graphs, pool and cache go now; the engine object itself is dropped on return
    free_cuda()
    return res


def hf_run(model, prompts: torch.Tensor, new_tokens: int, static: bool, compile_: bool, repeats: int,
           device) -> dict:
    """transformers' generate(): time for 1 and for N new tokens; per-step time = difference / (N - 1)."""
    ids = prompts.to(device)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        kw["cache_implementation"] = "static"
    if not compile_:
        kw["disable_compile"] = True
    free_cuda()
    with torch.no_grad():
        if torch.device(device).type == "cuda":  # warm-up (and compile, if on)
            model.generate(ids, max_new_tokens=min(2, new_tokens), **kw)
        if compile_:
            model.generate(ids, max_new_tokens=new_tokens, **kw)
        t1 = [wall(lambda: model.generate(ids, max_new_tokens=1, **kw), device)[0] for _ in range(repeats)]
        _peak_reset(device)
        runs = [wall(lambda: model.generate(ids, max_new_tokens=new_tokens, **kw), device) for _ in range(repeats)]
    tn = [r[0] for r in runs]
    B, P = prompts.shape
    res = {"t1_s": median(t1), "tn_s": median(tn), "peak_bytes": _peak(device), "compiled": compile_}
    res["prefill_tok_s"] = B * P / res["t1_s"]
    if new_tokens > 1:
        res["step_ms"] = max(res["tn_s"] - res["t1_s"], 1e-9) / (new_tokens - 1) * 1e3
        res["decode_tok_s"] = B * (new_tokens - 1) / max(res["tn_s"] - res["t1_s"], 1e-9)
    res["e2e_tok_s"] = B * new_tokens / res["tn_s"]
    res["tokens"] = runs[-1][1][:, P:].cpu()
    free_cuda()
    return res


# ---- derived ratios -------------------------------------------------------------------------------------------------
def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the fraction of tokens before the first disagreement."""
    n = min(a.shape[1], b.shape[1])
    same = (a[:, :n].cpu() == b[:, :n].cpu()).int().cumprod(1).sum(1)
    return float(same.float().mean() / n)


SPEEDUP_BASES = {"engine": ("hf_dynamic", "hf_static", "hf_static_compiled"),
                 "engine_compiled": ("hf_dynamic", "hf_static", "hf_static_compiled", "engine")}
SPEEDUP_PREFIX = {"engine": "", "engine_compiled": "compiled_"}


def speedups(row: dict, impl: str = "engine") -> None:
    """Step and end-to-end speedups of ``impl`` over the other paths measured on ``row``: ``step_speedup_vs_{k}``
    for the engine, ``compiled_step_speedup_vs_{k}`` for the compiled engine."""
    if impl not in row:
        return
    e, prefix = row[impl], SPEEDUP_PREFIX[impl]
    for k in SPEEDUP_BASES[impl]:
        if k in row and "step_ms" in row[k] and "step_ms" in e:
            row[f"{prefix}step_speedup_vs_{k}"] = row[k]["step_ms"] / e["step_ms"]
            row[f"{prefix}e2e_speedup_vs_{k}"] = e["e2e_tok_s"] / row[k]["e2e_tok_s"]


def bound_ratios(row: dict, impls: Sequence[str]) -> None:
    """Each measured path's step time against the step row's HBM bound (and the bandwidth fraction it reaches)."""
    for k in impls:
        if k in row:
            row[k]["bound_ratio"] = row[k]["step_ms"] / row["hbm_bound_ms"]
            row[k]["bandwidth_fraction"] = row["hbm_bound_ms"] / row[k]["step_ms"]
