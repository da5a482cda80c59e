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

``run_bench`` runs in named steps: ``_prepare`` (every argument checked before anything is built), then per plan
``_bench_plan`` (``_generate_rows``, ``_step_rows``, ``_searches``), then ``_compiled_runs`` and ``_finish``. The
models live in ``models.py``, the memory search in ``memory.py``, the timing in ``measure.py``, the outputs in
``report.py``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlkv.devices import check_device
from mlkv.inference.bench.measure import (agreement, bound_ratios, engine_run, hf_run, measure_bandwidth,
                                          random_prompts, speedups, time_at_max_batch)
from mlkv.inference.bench.memory import (GB, TryFit, cuda_try_fit, find_max_batch, find_max_context, free_cuda,
                                         measure_cache_allocation, set_budget, simulated_try_fit, step_weight_bytes,
                                         weight_bytes)
from mlkv.inference.bench.report import print_report, summary, write_outputs
from mlkv.inference.bench.models import build_model, gguf_model, plan_label, resolve_model
from mlkv.inference.bench.settings import BenchSettings
from mlkv.model.config import MLKVConfig
from mlkv.model.loading import default_device, parse_dtype
from mlkv.model.modeling import MLKVForCausalLM
from mlkv.model.sharing import PAPER_PRESETS, PAPER_SHAPE, resolve_plan

# resolve_model ... plan_label live in models.py; importing them from here keeps working.
__all__ = ["run_bench", "COMPILE_RESERVE_S", "resolve_model", "gguf_model", "build_model", "plan_label"]

COMPILE_RESERVE_S = 90  # seconds a compiled run (one compilation + timing) is given before the deadline


# ---- one benchmark run ----------------------------------------------------------------------------------------------
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


@dataclass
class _Run:
    """What every step of one benchmark run shares: the settings with their defaults filled in, the model source,
    the device, the memory budget and allocator, and the bookkeeping (errors, deadline, progress bar)."""

    s: BenchSettings
    config: MLKVConfig
    loaded: MLKVForCausalLM | Path | None
    source: str
    plans: list
    device: torch.device
    dtype: torch.dtype
    budget_bytes: int
    card_bytes: int | None
    try_fit: TryFit
    fit_method: str
    started: float
    fit_errors: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    bandwidth: dict = field(default_factory=dict)
    bar: object = field(default_factory=_NoBar)

    def late(self, reserve_s: float = 0.0) -> bool:
        """Past the deadline, or within ``reserve_s`` of it."""
        deadline = self.s.deadline_s
        return deadline is not None and time.perf_counter() - self.started + reserve_s > deadline

    def guarded(self, what: str, fn):
        """Run one measurement; unless ``strict``, a failure is recorded and the benchmark goes on."""
        try:
            return fn()
        except Exception as err:
            if self.s.strict:
                raise
            text = str(err).strip().splitlines()
            msg = f"{what}: {type(err).__name__}: {text[0] if text else ''}"
            self.errors.append(msg)
            print(f"\nmlkv bench: {msg}", file=sys.stderr)
            free_cuda()
            return None

    def prompts(self, run: str, row: dict) -> torch.Tensor:
        """The prompts of a generate or step row (the same for every path timed on it)."""
        seed = self.s.seed + (1000 if run == "step" else 0)
        return random_prompts(row["batch"], row["prompt_len"], self.config.vocab_size, seed + row["batch"])

    @property
    def engine_kwargs(self) -> dict:
        return {"bucket": self.s.bucket, "decode_attention": self.s.decode_attention}


# ---- step 1: every argument checked before anything is built --------------------------------------------------------
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


def _fill_defaults(s: BenchSettings, max_pos: int) -> BenchSettings:
    """The settings with every ``None`` length, batch list and repeat count replaced by its default."""
    quick = s.quick
    prompt_len = s.prompt_len if s.prompt_len is not None else min(512, max_pos // 4)
    return dataclasses.replace(
        s, repeats=s.repeats if s.repeats is not None else (1 if quick else 3), prompt_len=prompt_len,
        new_tokens=s.new_tokens if s.new_tokens is not None else min(32 if quick else 128, max(2, max_pos // 8)),
        batch=_ints(s.batch if s.batch is not None else [1, 64], "batch sizes"),
        step_context=s.step_context if s.step_context is not None else min(1024, max_pos // 2),
        step_batch=_ints(s.step_batch if s.step_batch is not None else ([1, 64] if quick else [1, 64, 128, 256]),
                         "step batch sizes"),
        step_tokens=s.step_tokens if s.step_tokens is not None else (16 if quick else 32),
        context=s.context if s.context is not None else min(2048, max_pos))


def _check_lengths(s: BenchSettings, max_pos: int) -> None:
    for name, value in (("context", s.context), ("step context", s.step_context),
                        ("prompt length + new tokens", s.prompt_len + s.new_tokens)):
        if value < 1:
            raise ValueError(f"{name} ({value}) must be positive")
        if value > max_pos:
            raise ValueError(f"{name} ({value}) is longer than max_position_embeddings ({max_pos})")
    if s.prompt_len < 1 or s.new_tokens < 2:
        raise ValueError(f"prompt length ({s.prompt_len}) must be >= 1 and new tokens ({s.new_tokens}) >= 2")
    if not 2 <= s.step_tokens < s.step_context:
        raise ValueError(f"step tokens ({s.step_tokens}) must be at least 2 and below the step context "
                         f"({s.step_context})")
    if s.context_batch < 1:
        raise ValueError(f"context batch ({s.context_batch}) must be positive")


def _budget(budget_gb: float | None, config, plans, dtype, device) -> tuple[int, int | None]:
    """``(budget bytes, card bytes or None)``: the given budget (checked against the weights and the card) or the
    card's memory (4 GB on CPU)."""
    cuda = device.type == "cuda"
    card_bytes = torch.cuda.get_device_properties(device).total_memory if cuda else None
    if budget_gb is None:
        return (card_bytes if cuda else int(4 * GB)), card_bytes
    if budget_gb <= 0:
        raise ValueError(f"budget ({budget_gb} GB) must be positive")
    budget_bytes = int(budget_gb * GB)
    for p in plans:
        w = weight_bytes(config.with_plan(p), dtype)
        if budget_bytes < w:
            raise ValueError(f"budget ({budget_gb:g} GB) is smaller than the model weights ({w / GB:.3g} GB, "
                             f"plan {plan_label(p)}, {str(dtype).replace('torch.', '')})")
    if card_bytes is not None and budget_bytes > card_bytes:
        raise ValueError(f"budget ({budget_gb:g} GB) is larger than the card's memory ({card_bytes / GB:.3g} GB)")
    return budget_bytes, card_bytes


def _prepare(model_or_preset, s: BenchSettings, try_fit: TryFit | None, started: float) -> _Run:
    check_device(s.device)
    device = torch.device(s.device or default_device())
    cuda = device.type == "cuda"
    dtype = parse_dtype(s.dtype, "dtype") if s.dtype is not None else (torch.bfloat16 if cuda else torch.float32)
    config, loaded, source = resolve_model(model_or_preset)
    shape = (config.num_hidden_layers, config.num_attention_heads)
    plans = s.plans
    if plans is None or len(plans) == 0:
        plans = [config.sharing] if loaded is not None else (PAPER_PRESETS if shape == PAPER_SHAPE else ["mha", "mqa"])
    plans = [resolve_plan(p if not isinstance(p, str) else p.strip(), *shape) for p in plans]
    s = _fill_defaults(s, config.max_position_embeddings)
    _check_lengths(s, config.max_position_embeddings)
    budget_bytes, card_bytes = _budget(s.budget_gb, config, plans, dtype, device)
    fit_errors: list[str] = []
    if try_fit is not None:
        fit_method = "injected"
    elif cuda:
        fit_method, try_fit = "cuda allocator (OutOfMemoryError)", cuda_try_fit(fit_errors)
    else:
        fit_method, try_fit = "simulated (cpu: weights + buffers + step estimate)", simulated_try_fit(budget_bytes)
    if s.bucket not in ("auto", None) and (not isinstance(s.bucket, int) or s.bucket < 1):
        raise ValueError(f"bucket ({s.bucket!r}) must be a positive number of cache columns, None or 'auto'")
    return _Run(s, config, loaded, source, plans, device, dtype, budget_bytes, card_bytes, try_fit, fit_method,
                started, fit_errors)


# ---- step 2: one plan -----------------------------------------------------------------------------------------------
def _put(d: dict, key: str, value) -> None:
    if value is not None:
        d[key] = value


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "tokens"}


def _strip_row(row: dict) -> dict:
    return {k: (_strip(v) if isinstance(v, dict) else v) for k, v in row.items()}


def _hf_runs(run: _Run, model, row: dict, label: str, what: str, prompts, n: int) -> None:
    """transformers' dynamic and static-cache generate() on the same prompts, into ``row``."""
    s = run.s
    _put(row, "hf_dynamic", run.guarded(f"{label} transformers dynamic {what}", lambda: hf_run(
        model, prompts, n, False, False, s.hf_repeats, run.device)))
    _put(row, "hf_static", run.guarded(f"{label} transformers static {what}", lambda: hf_run(
        model, prompts, n, True, False, s.hf_repeats, run.device)))
    if s.hf_compile and not run.late():  # its compiled fast path, next to the eager one
        _put(row, "hf_static_compiled", run.guarded(f"{label} transformers static compiled {what}", lambda: hf_run(
            model, prompts, n, True, True, s.hf_repeats, run.device)))


def _skip_hf(run: _Run, r: dict, what: str) -> None:
    why = "deadline" if run.late() else "batch > hf_max_batch"
    r["skipped"].append(f"transformers {what} ({why})")


def _generate_rows(run: _Run, model, r: dict) -> None:
    """The generate runs: the engine, then transformers on the same prompts, and their greedy agreement."""
    s, label = run.s, r["plan"]
    for b in s.batch:
        run.bar.set_description(f"{label}: generate b={b}")
        row = {"batch": b, "prompt_len": s.prompt_len, "new_tokens": s.new_tokens}
        prompts = run.prompts("generate", row)
        _put(row, "engine", run.guarded(f"{label} engine generate b={b}", lambda: engine_run(
            model, prompts, s.new_tokens, s.repeats, run.device, run.engine_kwargs)))
        if s.hf and b <= s.hf_max_batch and not run.late():
            _hf_runs(run, model, row, label, f"b={b}", prompts, s.new_tokens)
            if "engine" in row and "hf_static" in row:
                row["agreement_vs_hf_static"] = agreement(row["engine"]["tokens"], row["hf_static"]["tokens"])
        elif s.hf:
            _skip_hf(run, r, f"generate b={b}")
        speedups(row)
        r["generate"].append(_strip_row(row))
        run.bar.update(1)


def _step_rows(run: _Run, model, r: dict) -> None:
    """The decode-step runs at ``step_context``, each against its HBM bound."""
    s, label = run.s, r["plan"]
    P = s.step_context - s.step_tokens
    for b in s.step_batch:
        run.bar.set_description(f"{label}: step b={b} ctx={s.step_context}")
        row = {"batch": b, "context": s.step_context, "prompt_len": P, "new_tokens": s.step_tokens}
        prompts = run.prompts("step", row)
        # KV in use: decode steps write columns P .. P + steps - 2 and a step at column c reads c + 1 tokens.
        kv_len = P + 1 + (s.step_tokens - 2) / 2
        kv_bytes = r["kv_bytes_per_token"] * b * kv_len
        row["kv_tokens_in_use_mean"] = kv_len
        row["hbm_bytes_per_step"] = step_weight_bytes(model, b) + kv_bytes
        row["hbm_bound_ms"] = row["hbm_bytes_per_step"] / run.bandwidth["bytes_per_s"] * 1e3
        _put(row, "engine", run.guarded(f"{label} engine step b={b}", lambda: engine_run(
            model, prompts, s.step_tokens, s.repeats, run.device, run.engine_kwargs)))
        if s.hf and b <= s.hf_max_batch and not run.late():
            _hf_runs(run, model, row, label, f"step b={b}", prompts, s.step_tokens)
        elif s.hf:
            _skip_hf(run, r, f"step b={b}")
        bound_ratios(row, ("engine", "hf_dynamic", "hf_static", "hf_static_compiled"))
        speedups(row)
        r["step"].append(_strip_row(row))
        run.bar.update(1)


def _searches(run: _Run, model, r: dict) -> None:
    """Max batch at ``context``, max context at ``context_batch`` (the allocator capped at the budget), and the
    decode speed at the max batch when the allocator is the card's."""
    s, label = run.s, r["plan"]
    if not s.search:
        return
    if run.late():
        r["skipped"].append("max batch / max context search (deadline)")
        run.bar.update(2)
        return
    run.bar.set_description(f"{label}: max batch @ {s.context}")
    set_budget(run.device, run.budget_bytes, run.card_bytes)
    try:
        _put(r, "max_batch", run.guarded(f"{label} max batch search", lambda: find_max_batch(
            model, s.context, run.try_fit, run.budget_bytes)))
        run.bar.update(1)
        run.bar.set_description(f"{label}: max context @ b={s.context_batch}")
        _put(r, "max_context", run.guarded(f"{label} max context search", lambda: find_max_context(
            model, s.context_batch, run.try_fit, run.budget_bytes)))
        run.bar.update(1)
        if r.get("max_batch", {}).get("max_batch", 0) > 0 and run.fit_method.startswith("cuda"):
            # a batch that really fits on this card
            run.bar.set_description(f"{label}: decode at max batch")
            _put(r, "max_batch_decode", run.guarded(f"{label} decode at max batch", lambda: time_at_max_batch(
                model, r["max_batch"]["max_batch"], s.context, run.device, decode_attention=s.decode_attention)))
    finally:
        set_budget(run.device, None, run.card_bytes)


def _bench_plan(run: _Run, plan) -> dict:
    """Build the plan's model, then its generate runs, step runs and searches."""
    label = plan_label(plan)
    run.bar.set_description(f"{label}: build")
    model, weights = build_model(run.config, run.loaded, plan, run.device, run.dtype, run.s.seed)
    r = {"plan": label, "structure": plan.structure, "producers": plan.producers,
         "kv_heads_per_producer": plan.num_key_value_heads, "weights": weights,
         "weight_bytes": weight_bytes(model), "step_weight_bytes_b1": step_weight_bytes(model, 1),
         "kv_bytes_per_token": plan.kv_bytes_per_token(run.config.head_dim, run.dtype),
         "cache": measure_cache_allocation(model, max(run.s.step_batch), run.s.step_context, run.device),
         "generate": [], "step": [], "skipped": []}
    run.bar.update(1)
    with torch.no_grad():
        _generate_rows(run, model, r)
        _step_rows(run, model, r)
        _searches(run, model, r)
    del model
    free_cuda()
    return r


# ---- step 3: the compiled engine, last ------------------------------------------------------------------------------
def _compiled_row(run: _Run, model, r: dict, name: str, row: dict) -> None:
    """The compiled engine on one generate or step row (batch <= ``compile_max_batch``), on the row's prompts."""
    s, b = run.s, row["batch"]
    if b > s.compile_max_batch:
        return
    if run.late(COMPILE_RESERVE_S):
        r["skipped"].append(f"compiled engine {name} b={b} (deadline)")
        return
    run.bar.set_description(f"{r['plan']}: compiled engine {name} b={b}")
    prompts = run.prompts(name, row)
    c = run.guarded(f"{r['plan']} compiled engine {name} b={b}", lambda: engine_run(
        model, prompts, row["new_tokens"], s.repeats, run.device, {**run.engine_kwargs, "compile": True}))
    if c is None:
        return
    row["engine_compiled"] = _strip(c)
    if name == "step":
        bound_ratios(row, ("engine_compiled",))
    speedups(row, "engine_compiled")


def _compiled_runs(run: _Run, results: list[dict]) -> None:
    """One compilation per plan and run shape, each worth less than the measurements before it."""
    wanted = {p.lower() for p in run.s.compile_plans} if run.s.compile_plans else None
    for plan, r in zip(run.plans, results):
        run.bar.set_description(f"{r['plan']}: compiled engine")
        if wanted is not None and r["plan"].lower() not in wanted and plan.structure not in wanted:
            run.bar.update(1)
            continue
        if run.late(COMPILE_RESERVE_S):
            r["skipped"].append("compiled engine (deadline)")
            run.bar.update(1)
            continue
        model, _ = build_model(run.config, run.loaded, plan, run.device, run.dtype, run.s.seed)
        with torch.no_grad():
            for name in ("generate", "step"):
                for row in r[name]:
                    _compiled_row(run, model, r, name, row)
        run.bar.update(1)
        del model
        free_cuda()


# ---- step 4: the report ---------------------------------------------------------------------------------------------
def _meta(run: _Run) -> dict:
    s, config, cuda = run.s, run.config, run.device.type == "cuda"
    return {"source": run.source, "device": str(run.device),
            "device_name": torch.cuda.get_device_name(run.device) if cuda else platform.processor() or "cpu",
            "dtype": str(run.dtype).replace("torch.", ""), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "shape": {"layers": config.num_hidden_layers, "heads": config.num_attention_heads,
                      "hidden": config.hidden_size, "head_dim": config.head_dim, "vocab": config.vocab_size,
                      "max_position": config.max_position_embeddings},
            "weights_note": "random weights (transformers init) unless a checkpoint is given; speed and memory do not "
                            "depend on the values",
            "hf_static_note": "transformers generate(cache_implementation='static'): hf_static eager "
                              "(disable_compile=True)" + ("; hf_static_compiled auto-compiled (its torch.compile "
                                                           "fast path)" if s.hf_compile else ""),
            "budget_bytes": run.budget_bytes, "card_bytes": run.card_bytes, "fit_method": run.fit_method,
            "settings": dict(batches=s.batch, prompt_len=s.prompt_len, new_tokens=s.new_tokens,
                             step_context=s.step_context, step_batches=s.step_batch, step_tokens=s.step_tokens,
                             context=s.context, context_batch=s.context_batch, repeats=s.repeats,
                             hf_repeats=s.hf_repeats, hf=s.hf, hf_compile=s.hf_compile, hf_max_batch=s.hf_max_batch,
                             compile=bool(s.compile), bucket=s.bucket, compile_plans=list(s.compile_plans or []),
                             compile_max_batch=s.compile_max_batch, quick=s.quick,
                             decode_attention=s.decode_attention)}


def _finish(run: _Run, results: list[dict], print_table: bool) -> dict:
    meta = _meta(run)
    meta["errors"] = run.errors
    meta["fit_errors"] = run.fit_errors
    meta["bandwidth"] = run.bandwidth
    meta["seconds"] = round(time.perf_counter() - run.started, 1)
    report = {"meta": meta, "plans": results, "summary": summary(results)}
    if run.s.out is not None:
        report["files"] = write_outputs(report, Path(run.s.out))
    if print_table:
        print_report(report)
        print(json.dumps({"bench": report["summary"], "files": report.get("files"), "seconds": meta["seconds"],
                          "device": meta["device_name"], "dtype": meta["dtype"], "errors": run.errors}))
    return report


def run_bench(model_or_preset="pythia-160m", settings: BenchSettings | None = None, *,
              try_fit: TryFit | None = None, print_table: bool = True, **overrides) -> dict:
    """Benchmark each sharing plan (see the module docstring); returns the results (also written to ``out``).

    ``model_or_preset``: a preset name, a checkpoint or config directory, an ``MLKVConfig`` or a model.
    ``settings``: a ``BenchSettings`` (default: its defaults); ``overrides``: fields of it to change, e.g.
    ``run_bench("pythia-160m", plans=["mha", "mlkv-6"], batch=[1, 64], out="runs/bench")``. ``budget_gb``: memory
    budget for the max-batch / max-context searches (default: the card's memory; on CPU a simulated allocator
    with 4 GB). ``context``: context of the max-batch search (default 2048, at most ``max_position_embeddings``).
    ``batch`` / ``prompt_len`` / ``new_tokens``: the generate runs. ``step_context`` / ``step_batch`` /
    ``step_tokens``: the decode-step runs. ``try_fit(model, batch, context)`` replaces the real allocator.
    ``compile``: afterwards, also time the engine with its decode step through ``torch.compile``
    ("engine_compiled") on the generate and step runs with batch <= ``compile_max_batch``, for ``compile_plans``
    (default all; one compilation per plan and run shape). ``deadline_s``: skip transformers runs, searches and
    compiled runs once this many seconds have passed (a compiled run once fewer than ``COMPILE_RESERVE_S`` are
    left). ``strict``: raise on a failed measurement instead of recording it in ``meta["errors"]`` and going on.
    ``bucket``: the engine's attention-length granularity (``MLKVEngine``). ``print_table``: print the table and
    the closing JSON line.
    """
    started = time.perf_counter()
    run = _prepare(model_or_preset, dataclasses.replace(settings or BenchSettings(), **overrides), try_fit, started)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    s = run.s
    tasks_per_plan = 1 + len(s.batch) + len(s.step_batch) + (2 if s.search else 0) + (1 if s.compile else 0)
    run.bar = _progress(len(run.plans) * tasks_per_plan + 1, s.progress)
    run.bar.set_description("bandwidth")
    run.bandwidth = measure_bandwidth(run.device)
    run.bar.update(1)
    results = [_bench_plan(run, plan) for plan in run.plans]
    if s.compile:
        _compiled_runs(run, results)
    run.bar.close()
    return _finish(run, results, print_table)
