"""The inference benchmark (``mlkv bench``): the engine next to transformers' ``generate()`` for each sharing plan.

``settings.py`` (``BenchSettings``, the flags), ``models.py`` (the model timed and each plan's model),
``memory.py`` (byte counts, allocators, max batch / context search), ``measure.py`` (timing), ``run.py``
(``run_bench``), ``report.py`` (summary, JSON, CSV, plots, table) and ``command.py`` (the CLI). The names below are
imported lazily, so ``mlkv bench --help`` does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_bench": "run", "resolve_model": "models", "build_model": "models",
    "BenchSettings": "settings", "parse_bucket": "settings",
    "search_max": "memory", "find_max_batch": "memory", "find_max_context": "memory", "cuda_try_fit": "memory",
    "simulated_try_fit": "memory", "measure_cache_allocation": "memory", "weight_bytes": "memory",
    "measure_bandwidth": "measure", "time_full_step": "measure", "time_at_max_batch": "measure",
    "add_bench_arguments": "command", "run_bench_command": "command",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
