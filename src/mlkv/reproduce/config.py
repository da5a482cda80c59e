"""The settings of a reproduction run and the runs they define.

``Settings`` is everything that shapes a run (saved in ``results.json``); its fields are the ``mlkv reproduce`` flags
(``mlkv.settings``: each field's docstring is its help; ``cli=False`` fields have no flag). ``check_settings`` refuses
to reuse an output folder made with other result-shaping settings. ``planned_runs`` / ``run_name`` / ``plan_of``
name the uptraining runs of the paper's grid.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from mlkv.checkpoints import atomic_json
from mlkv.evaluation.tasks import DEFAULT_TASKS
from mlkv.model.convert import INITS
from mlkv.model.sharing import PAPER_PRESETS
from mlkv.settings import setting

MLKV_ONLY = [p for p in PAPER_PRESETS if p.startswith("MLKV")]
INIT_COMPARISON = ["MLKV-6", "MLKV-2"]


@dataclass
class Settings:
    """Everything that shapes a reproduction run (saved in results.json)."""

    out: str = setting("runs/reproduce", group="run")
    """output folder (a rerun skips finished stages)"""
    data_dir: str | None = setting(None, group="run")
    """shared data folder (default: $MLKV_DATA, else ../shared/data)"""
    base: str | None = setting(None, group="base model")
    """a local HF checkpoint to start from instead of pretraining"""
    smoke: bool = setting(False, group="run")
    """tiny CPU run of every stage (a test, not a result): every setting left at its default takes its smoke value"""
    hidden_size: int = setting(384, group="base model")
    """hidden size of the pretrained 12 x 12 base"""
    intermediate_size: int | None = setting(None, cli=False)
    """MLP width of the pretrained base (None: 4 x hidden_size)"""
    seq_len: int = setting(2048, group="training")
    """tokens per training sequence (also the perplexity window)"""
    micro_batch_size: int = setting(16, group="training")
    """sequences per training step and device"""
    base_tokens: str = setting("50M", group="base model")
    """pretraining token budget, e.g. 50M"""
    uptrain_tokens: str = setting("5M", group="training")
    """uptraining token budget per run, e.g. 5M"""
    train_shards: list[str] = setting(default_factory=lambda: ["train_00.jsonl.xz", "train_01.jsonl.xz"],
                                      group="training")
    """Gutenberg shards to train on"""
    max_documents: int | None = setting(None, cli=False)
    """documents read per shard (None: all)"""
    plans: list[str] = setting(default_factory=lambda: list(PAPER_PRESETS), group="run")
    """subset of the paper's configs"""
    distill_plans: list[str] = setting(default_factory=lambda: list(MLKV_ONLY), cli=False)
    """plans also uptrained with the distill objective (those of ``plans``)"""
    init_plans: list[str] = setting(default_factory=lambda: list(INIT_COMPARISON), cli=False)
    """plans of the conversion-init comparison (those of ``plans``)"""
    tasks: list[str] = setting(default_factory=lambda: list(DEFAULT_TASKS), group="evaluation")
    """zero-shot tasks"""
    limit: int | None = setting(None, group="evaluation")
    """examples per task (default: full sets)"""
    ppl_limit: int | None = setting(None, group="evaluation")
    """documents per perplexity set (default: all)"""
    ppl_max_tokens: int | None = setting(500_000, cli=False)
    """Gutenberg val tokens scored (the file has ~5.4M)"""
    eval_batch_size: int = setting(32, group="evaluation")
    """sequences per forward pass in the zero-shot tasks"""
    eval_workers: int | None = setting(None, group="evaluation")
    """models evaluated at once, each in its own process (default: min(8, cores/2) on CUDA, 1 on CPU)"""
    init_seeds: int = setting(1, group="training")
    """data orders per conversion init in the init comparison (seed 0 is the main run)"""
    uptrain_lr: float = setting(6e-4, group="training")
    """peak learning rate of every uptraining run (the paper's; 1.2e-3 was better for lm and distill at 4M tokens,
    benchmarks/distill_variants.py)"""
    distill_hidden: float = setting(10.0, group="training")
    """weight of the layer-wise hidden-state distance in the distill runs (0 = KL only, as runs 1-3)"""
    bench: bool = setting(True, group="run")
    """run the inference benchmark (CUDA only; --no-bench skips it)"""
    compile: bool = setting(False, group="training")
    """torch.compile the training step"""
    device: str | None = setting(None, group="run")
    """torch device (default: cuda when available)"""
    seed: int = setting(0, cli=False)
    """training seed (uptraining adds the run's data order)"""

    @classmethod
    def smoke_settings(cls, out: str, **overrides) -> Settings:
        """The ``--smoke`` settings: a tiny model, a few documents and steps, ``--limit``-ed tasks, on CPU;
        ``overrides`` that are not None replace them."""
        base = dict(out=out, smoke=True, hidden_size=48, intermediate_size=96, seq_len=64, micro_batch_size=4,
                    base_tokens="12K", uptrain_tokens="2K", train_shards=["train_00.jsonl.xz"], max_documents=2,
                    limit=4, ppl_limit=1, ppl_max_tokens=1024, eval_batch_size=8, bench=False, device="cpu",
                    plans=["MHA-144", "MLKV-6", "MLKV-2"], distill_plans=["MLKV-6", "MLKV-2"], eval_workers=1)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def canonical_plans(names: list[str]) -> list[str]:
    """User plan names spelled as the paper does (``mlkv-6`` -> ``MLKV-6``); only the paper's grid is accepted."""
    by_key = {p.lower(): p for p in PAPER_PRESETS}
    unknown = [n for n in names if n.lower() not in by_key]
    if unknown:
        raise ValueError(f"--plans {' '.join(unknown)}: mlkv reproduce runs the paper's configs, one of "
                         f"{', '.join(PAPER_PRESETS)}")
    return [by_key[n.lower()] for n in names]


# ---- a rerun into the same --out must keep the settings that shape the results ------------------------------------
RESULT_SETTINGS = ("base", "smoke", "hidden_size", "intermediate_size", "seq_len", "micro_batch_size", "base_tokens",
                   "uptrain_tokens", "train_shards", "max_documents", "limit", "ppl_limit", "ppl_max_tokens", "seed",
                   "uptrain_lr", "distill_hidden")


#: Settings that folders written before they existed were made with (runs 1-3: logits-only distillation).
LEGACY_SETTINGS = {"uptrain_lr": 6e-4, "distill_hidden": 0.0}


def check_settings(s: Settings, out: Path) -> None:
    """Record the result-shaping settings in ``out/settings.json``; refuse a rerun that changes them."""
    path = out / "settings.json"
    mine = {k: getattr(s, k) for k in RESULT_SETTINGS}
    if path.is_file():
        theirs = {**LEGACY_SETTINGS, **json.loads(path.read_text())}
        changed = [f"{k} ({theirs.get(k)!r} -> {mine[k]!r})" for k in RESULT_SETTINGS if theirs.get(k) != mine[k]]
        if changed:
            raise ValueError(f"{out} was made with other settings: {', '.join(changed)}; use another --out or the "
                             "same settings (finished stages are reused)")
    else:
        atomic_json(path, mine)


# ---- the runs -------------------------------------------------------------------------------------------------------
def run_name(plan: str, objective: str = "lm", init: str = "mean", seed: int = 0) -> str:
    return f"{plan}-{objective}" + ("" if init == "mean" else f"-{init}") + (f"-s{seed}" if seed else "")


def plan_of(run: str) -> str:
    """``MLKV-6-distill`` -> ``MLKV-6``; ``MLKV-2-lm-pairwise`` -> ``MLKV-2``; ``base`` -> ``MHA-144``."""
    if run == "base":
        return "MHA-144"
    return re.sub(r"-(lm|distill)(-(pairwise|first))?(-s\d+)?$", "", run)


def planned_runs(s: Settings) -> list[dict]:
    """Every uptraining run: 9 plans with lm, MLKV plans with distill, the init comparison with lm (each init with
    ``init_seeds`` data orders; seed 0 of ``mean`` is the plan's main run)."""
    runs = [dict(plan=p, objective="lm", init="mean") for p in s.plans]
    runs += [dict(plan=p, objective="distill", init="mean") for p in s.distill_plans]
    runs += [dict(plan=p, objective="lm", init=i, seed=k) for k in range(s.init_seeds) for p in s.init_plans
             for i in INITS if (i, k) != ("mean", 0)]
    return runs


def task_runs(s: Settings) -> set[str]:
    """The models that get zero-shot tasks: the base and the main runs (mean init, data order 0). The init comparison
    is judged on perplexity, so its extra runs (other inits, other data orders) get none."""
    return {"base"} | {run_name(**r) for r in planned_runs(s) if r["init"] == "mean" and not r.get("seed")}
