"""Training MLKV models: pretraining, uptraining and distillation (``mlkv train``).

``config`` (the settings and their checks), ``loss`` (the objectives), ``models`` (student, teacher, tokenizer),
``runtime`` (processes, wrapping, optimizer, precision, signals), ``outdir`` (the output folder: what it may hold,
the final model's atomic save), ``checkpoint`` (with checksums and a fallback), ``resume`` (the settings a resumed
run must keep), ``metrics``, ``loop`` (``train``) and ``command`` (the CLI). The public names below are imported on first use.
"""

from __future__ import annotations

import importlib

__all__ = ["TrainConfig", "TrainHooks", "train", "NonFiniteLossError", "parse_tokens", "hidden_distance",
           "model_flops_per_token"]

_MODULES = {"TrainConfig": "config", "TrainHooks": "config", "parse_tokens": "config", "train": "loop",
            "NonFiniteLossError": "loop", "hidden_distance": "loss", "model_flops_per_token": "metrics"}


def __getattr__(name: str):
    # Not cached in the package namespace, so a test that replaces mlkv.training.loop.train is seen here too.
    if name in _MODULES:
        return getattr(importlib.import_module(f"mlkv.training.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
