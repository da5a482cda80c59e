"""What a resumed run must keep: the settings that define a run, recorded in every checkpoint's trainer state
(``"run"``), and the check that refuses to continue a run under changed ones.

A run is defined by its model (``--model``, ``--plan``), its data (``--data`` and a fingerprint of the training
tokens, ``PackedDataset.fingerprint``), ``--seed``, its batch (``--seq-len``, ``--micro-batch-size``,
``--grad-accum``), its loss (``--objective``, ``--teacher`` and the distillation settings), and its optimizer and
schedule (``--lr``, ``--warmup-ratio``, ``--min-lr-ratio``, the AdamW settings, ``--grad-clip`` and the number of
optimizer steps that ``--steps``/``--tokens`` give). A change to any of them on ``--resume`` would silently break
exact resumption, so it is an error naming each changed setting and both values. How the run executes (device,
precision, compile, logging, evaluation and checkpoint intervals, ``--stop-after-steps``) may change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlkv.errors import UsageError
from mlkv.training.config import TrainConfig

__all__ = ["RUN_FIELDS", "DERIVED", "ResumeMismatchError", "run_settings", "check_run_settings"]

#: ``TrainConfig`` fields that define a run.
RUN_FIELDS = ("model", "plan", "data", "seed", "seq_len", "micro_batch_size", "grad_accum", "objective", "teacher",
              "distill_temperature", "distill_alpha", "distill_hidden", "lr", "min_lr_ratio", "warmup_ratio",
              "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip")
#: Settings known once the data and the schedule are built, and how an error names them.
DERIVED = {"total_steps": "the number of optimizer steps (from --steps or --tokens)",
           "data_fingerprint": "the training tokens (fingerprint of the token store)"}
#: The value a checkpoint written before a loss setting existed had.
LEGACY_DEFAULTS = {"objective": "lm", "distill_temperature": 1.0, "distill_alpha": 1.0, "distill_hidden": 0.0}
PATH_FIELDS = ("model", "teacher")


class ResumeMismatchError(UsageError):
    """``--resume`` with settings that differ from the ones the run started with; the message lists them."""


def _where(value: str | None) -> str | None:
    """A local path as an absolute one (so ``runs/x`` and ``./runs/x`` match), anything else as given."""
    if value is None or value.startswith("hf:") or not Path(value).expanduser().exists():
        return value
    return str(Path(value).expanduser().resolve())


def _normal(name: str, value: Any) -> Any:
    if name in PATH_FIELDS:
        return _where(value)
    if name == "data":
        return [_where(str(v)) for v in value or []]
    return value


def run_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings of ``cfg`` that define the run (``RUN_FIELDS``), paths made absolute; ``DERIVED`` ones are
    added by the loop once known."""
    return {name: _normal(name, getattr(cfg, name)) for name in RUN_FIELDS}


def _recorded(state: dict) -> dict[str, Any]:
    """The run settings a checkpoint recorded; for one written before they were, those its config shows."""
    if "run" in state:
        return state["run"]
    config = state.get("config", {})
    recorded = {**LEGACY_DEFAULTS, **{k: _normal(k, v) for k, v in config.items() if k in RUN_FIELDS}}
    if "total_steps" in state:
        recorded["total_steps"] = state["total_steps"]
    return recorded


def _label(name: str) -> str:
    return DERIVED.get(name) or "--" + name.replace("_", "-")


def check_run_settings(state: dict, current: dict[str, Any], out: Path) -> None:
    """Raise ``ResumeMismatchError`` if a setting in ``current`` differs from the one the checkpoint's ``state``
    recorded (a setting it did not record is not compared)."""
    recorded = _recorded(state)
    changed = [f"{_label(name)} was {recorded[name]!r}, now {value!r}" for name, value in current.items()
               if name in recorded and recorded[name] != value]
    if changed:
        raise ResumeMismatchError(f"{out} was started with other settings: {'; '.join(changed)}. Resume it with "
                                  "the settings it started with, start it again (--overwrite instead of "
                                  "--resume), or choose another --out")
