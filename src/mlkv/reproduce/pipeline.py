"""``mlkv reproduce``: the MLKV paper's experiment end to end, on real data.

Stages (each leaves a ``done.json`` marker, or for eval and bench its result file, under ``--out``; a rerun skips
finished work, and refuses an ``--out`` made with other settings). Every setting, plan, task and input file is
checked before the first stage (``resolve_settings``, ``check_inputs``).

1. ``base``: with ``--base pretrain`` (default) a Pythia-shaped MHA base (12 layers x 12 heads, so the paper's grid
   applies) pretrained on the Gutenberg corpus with the Pythia tokenizer. With ``--base smollm2`` (or a ``.gguf``
   file, or a Hugging Face Llama-family folder) the real pretrained model, converted as it is to an mlkv checkpoint
   (a GGUF is dequantized into a temporary Hugging Face folder by ``mlkv.model.gguf.materialize`` first); it keeps
   its own tokenizer.
2. ``convert``: the original converted to every plan (``--init``, default ``pairwise``), and for the init comparison
   to the other inits (an init that is the same function as another for a plan is skipped and the report says so).
   ``lsq`` is fitted on 8,192 tokens of the first training shard. With ``--step0`` (default for a real base) every
   conversion is evaluated before any training.
3. ``uptrain``: every converted model uptrained for the same token budget with the ``lm`` objective, the original's
   own plan included (the control: what uptraining on Gutenberg alone does to the model), and the ``distill_plans``
   also with ``distill`` from the original at equal tokens: KL to its logits plus ``--distill-hidden`` (default 10)
   times the layer-wise hidden-state distance (``mlkv.training.hidden_distance``). A finished run keeps only its
   final model (``--keep-checkpoints`` keeps the resumable checkpoint too).
4. ``eval``: Gutenberg validation perplexity, WikiText-2 word perplexity, and zero-shot LAMBADA, PIQA, ARC-Easy,
   SciQ and HellaSwag through lm-evaluation-harness (full sets unless ``--limit``), in a process pool
   (``mlkv.reproduce.evaluate``).
5. ``bench``: KV bytes, decode step times, max batch and decode throughput per plan on the engine, each plan with
   the real weights of its ``lm`` run (CUDA only).
6. ``report``: ``report.md``, ``results.json`` and plots (``mlkv.reproduce.report``, ``mlkv.reproduce.plots``).
7. ``export`` (with ``--export``): every model of the report as a folder that loads with transformers alone, with
   its model card and evaluation results (``mlkv.export``), in ``export/<run>``.

``--smoke`` runs the whole pipeline on CPU in minutes: with ``--base pretrain`` a tiny 12x12 model; with ``--base
smollm2`` the real model, two plans and a few steps at a short sequence length. Its numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from mlkv.devices import check_device
from mlkv.files import atomic_json, atomic_write, clean_stale_temps_under, folder_lock
from mlkv.model.convert import DEFAULT_INIT
from mlkv.reproduce.config import Settings, check_settings, resolve_settings, source_of
from mlkv.reproduce.evaluate import card_name, stage_eval
from mlkv.reproduce.log import mark_done, read_done, say
from mlkv.reproduce.markdown import OLD_EVAL_DTYPE, render_report
from mlkv.reproduce.report import build_results
from mlkv.reproduce.runs import conversions, planned_runs, step0_runs
from mlkv.reproduce.timing import StageClock, recorded_seconds
from mlkv.training.outdir import has_checkpoint

HF_DATASET = "EleutherAI/the_pile_deduplicated (mlkv train takes any text dataset as --data hf:NAME)"
NEOX_TOKENIZER = ("tokenizers", "gpt-neox-20b", "tokenizer.json")


# ---- inputs -----------------------------------------------------------------------------------------------------
def resolve_data_dir(data_dir: str | None) -> Path:
    """The shared data folder holding the Gutenberg corpus (``mlkv.data.paths``), or a named error."""
    from mlkv.data.paths import require_data_dir

    return require_data_dir(data_dir, "corpus/gutenberg", hint=f"With a network, train on a Hugging Face dataset "
                            f"instead: {HF_DATASET}")


def check_inputs(s: Settings, data: Path) -> None:
    """Every file the run will read, checked before any work: shards, validation books, WikiText-2, the task files
    and (for the pretrained base) the Pythia tokenizer."""
    from mlkv.evaluation.tasks import check_task_files

    corpus = data / "corpus" / "gutenberg"
    for shard in s.train_shards:
        if not (corpus / shard).is_file():
            there = ", ".join(sorted(p.name for p in corpus.glob("train_*"))) or "none"
            raise FileNotFoundError(f"--train-shards {shard}: {corpus / shard} not found (shards there: {there})")
    needed = [corpus / "val.jsonl.xz", data / "eval" / "wikitext2" / "wiki.test.raw"]
    if not source_of(s).real:
        needed.append(data.joinpath(*NEOX_TOKENIZER))
    for path in needed:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the shared data folder ({data}) is incomplete")
    if s.tasks:
        check_task_files(s.tasks, data)


def disk_bytes(folder: Path) -> int:
    """Bytes the files under ``folder`` take on disk (allocated blocks, links not followed; a file that a live run
    renames or removes meanwhile is skipped)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


# ---- base, convert, uptrain -------------------------------------------------------------------------------------
def stage_base(s: Settings, data: Path, out: Path) -> Path:
    """The original in mlkv format: a real checkpoint converted as it is, or an MHA base pretrained here."""
    folder = out / "base"
    done = read_done(folder)
    if done:
        _drop_spare_checkpoints(folder, done)
        say("base: done, skipping")
        return folder
    source = source_of(s)
    if folder.exists() and (source.real or not has_checkpoint(folder)):
        shutil.rmtree(folder)  # an unfinished base that has no checkpoint to resume from
    if source.real:
        from mlkv.model.convert import convert_checkpoint

        say(f"base: {source.describe()}; converted as it is, no pretraining")
        # A GGUF is dequantized to a Hugging Face folder first (cached: mlkv.model.gguf.dequantized). Every
        # weight-only init is the identity on the original's own plan.
        convert_checkpoint(s.base, folder, plan=source.identity, init=DEFAULT_INIT)
        mark_done(folder, {"source": s.base, "plan": source.identity})
        return folder
    from mlkv.model.config import PRESETS, MLKVConfig
    from mlkv.training.loop import TrainConfig, train

    shape = {**PRESETS["pythia-mini"], "hidden_size": s.hidden_size,
             "intermediate_size": s.intermediate_size or 4 * s.hidden_size,
             "max_position_embeddings": max(2048, s.seq_len)}
    cfg_dir = out / "base_config"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    MLKVConfig(**shape).save_pretrained(cfg_dir)
    say(f"base: pretraining a 12x12 MHA model (hidden {s.hidden_size}) for {s.base_tokens} tokens")
    summary = train(TrainConfig(model=str(cfg_dir), out=str(folder), **_train_common(s, data, s.base_tokens, 0),
                                tokens=s.base_tokens, lr=6e-4 if not s.smoke else 3e-3, warmup_ratio=0.05,
                                resume=has_checkpoint(folder)))
    _finish_training(s, folder, summary, _brief(summary))
    return folder


def _finish_training(s: Settings, folder: Path, summary: dict, info: dict) -> None:
    """Mark a training run done -- unless a signal stopped it -- and drop its checkpoint unless
    ``--keep-checkpoints`` (the marker records which, for a rerun after a kill in between). ``train`` takes
    SIGTERM/SIGINT itself to save a checkpoint and returns; the run is then left unfinished for the next invocation
    to resume, and the pipeline stops with the signal's exit code."""
    if summary.get("interrupted"):
        signum = summary.get("stop_signal") or signal.SIGTERM
        say(f"{folder.name}: stopped by signal {signum} at step {summary.get('steps')}; a rerun resumes it")
        sys.exit(128 + signum)
    done = {**info, "keep_checkpoints": s.keep_checkpoints}
    mark_done(folder, done)  # first: a crash between the two leaves a finished run with a spare checkpoint
    _drop_spare_checkpoints(folder, done)


def _drop_spare_checkpoints(folder: Path, done: dict) -> None:
    """A finished run keeps its final model only, unless its ``done`` marker says ``--keep-checkpoints``: its
    checkpoints go when it ends, or, if a kill came between the marker and this, when a rerun skips it. (A marker
    without the setting, from before it was recorded, keeps them.)"""
    if done.get("keep_checkpoints") is False:
        from mlkv.training.checkpoint import CHECKPOINT

        for name in (CHECKPOINT, CHECKPOINT + ".old"):
            shutil.rmtree(folder / name, ignore_errors=True)


def _train_common(s: Settings, data: Path, tokens: str, val_points: int) -> dict:
    """``TrainConfig`` fields every training of the run shares; ``val_points`` validations spread over the run."""
    from mlkv.training.config import parse_tokens

    corpus = data / "corpus" / "gutenberg"
    steps = -(-parse_tokens(tokens) // (s.seq_len * s.micro_batch_size))
    return dict(data=[str(corpus / shard) for shard in s.train_shards], val_data=[str(corpus / "val.jsonl.xz")],
                # a real base keeps its own tokenizer (None: the model folder's)
                tokenizer=None if source_of(s).real else str(data.joinpath(*NEOX_TOKENIZER)),
                cache_dir=str(Path(s.out) / "token_cache"), max_documents=s.max_documents, seq_len=s.seq_len,
                micro_batch_size=s.micro_batch_size, compile=s.compile, device=s.device, seed=s.seed,
                eval_every=max(1, steps // val_points) if val_points else 10**9,
                eval_batches=20 if not s.smoke else 2,
                # --checkpoints spread over the run: a kill -9 (OOM killer, preemption) loses at most one share
                save_every=max(1, steps // s.checkpoints) if s.checkpoints else 10**9,
                progress=True, log_every=10 if not s.smoke else 1)


def _brief(summary: dict) -> dict:
    return {k: summary.get(k) for k in ("steps", "tokens", "final_loss", "val_loss", "val_ppl",
                                         "tokens_per_s", "mfu", "seconds")}


def stage_convert(s: Settings, data: Path, base: Path, out: Path) -> dict[tuple[str, str], Path]:
    """``{(plan, init): folder}`` of every conversion the run uses (the original's own plan is the original)."""
    from mlkv.model.convert import convert_checkpoint

    identity = source_of(s).identity
    converted = {(r["plan"], r["init"]): base for r in planned_runs(s) if r["plan"] == identity}
    calibration = None
    for plan, init in conversions(s):
        folder = out / "converted" / f"{plan}-{init}"
        if not read_done(folder):
            if folder.exists():
                shutil.rmtree(folder)
            if init == "lsq" and calibration is None:
                from mlkv.model.calibrate import calibration_tokens

                shard = data / "corpus" / "gutenberg" / s.train_shards[0]
                calibration = calibration_tokens(base, sources=[str(shard)])  # (S, T): training text, not val
            convert_checkpoint(base, folder, plan=plan, init=init,
                               calibration=calibration if init == "lsq" else None)
            mark_done(folder, {"plan": plan, "init": init})
        converted[(plan, init)] = folder
    say(f"convert: {len(converted)} checkpoints ({init_note(s)})")
    return converted


def init_note(s: Settings) -> str:
    others = f"; compared on {', '.join(s.init_plans)}: {', '.join(s.init_comparison)}" \
        if s.init_plans and s.init_comparison else ""
    return f"init {s.init}{others}"


def stage_uptrain(s: Settings, data: Path, base: Path, converted: dict, out: Path) -> dict[str, Path]:
    trained = {}
    for r in planned_runs(s):
        folder = out / "uptrain" / r["name"]
        trained[r["name"]] = folder
        done = read_done(folder)
        if done:
            _drop_spare_checkpoints(folder, done)
            continue
        say(f"uptrain: {r['name']} for {s.uptrain_tokens} tokens (init {r['init']})")
        extra = dict(objective="distill", teacher=str(base), distill_hidden=s.distill_hidden) \
            if r["objective"] == "distill" else {}
        info = {k: r[k] for k in ("plan", "objective", "init", "seed")}
        uptrain_one(s, data, converted[(r["plan"], r["init"])], folder, info, seed=r["seed"], **extra)
    return trained


def uptrain_one(s: Settings, data: Path, model: Path, folder: Path, info: dict, seed: int = 0, **train_args) -> None:
    """Uptrain ``model`` into ``folder`` for the run's token budget (data order ``seed``), resuming a stopped run,
    and mark it done with ``info``. ``train_args``: extra ``TrainConfig`` fields (objective, teacher, ...)."""
    from mlkv.training.loop import TrainConfig, train

    if folder.exists() and not has_checkpoint(folder):
        shutil.rmtree(folder)  # stopped before its first checkpoint: start over
    common = _train_common(s, data, s.uptrain_tokens, s.val_points)
    common["seed"] += seed  # another data order
    train_args = {"lr": s.uptrain_lr, **train_args}
    summary = train(TrainConfig(model=str(model), out=str(folder), **common, tokens=s.uptrain_tokens,
                                resume=has_checkpoint(folder), **train_args))
    _finish_training(s, folder, summary, {**info, **_brief(summary)})


# ---- bench, report ----------------------------------------------------------------------------------------------
def stage_bench(s: Settings, out: Path, trained: dict[str, Path], base: Path) -> dict | None:
    """The engine benchmark of every plan with the real weights of its main ``lm`` run, merged into one report."""
    import torch

    path = out / "bench" / "bench.json"
    if path.is_file():
        return json.loads(path.read_text())
    if not s.bench or not torch.cuda.is_available():
        say("bench: skipped (needs CUDA; --no-bench)")
        return None
    from mlkv.inference.bench.report import write_outputs
    from mlkv.inference.bench.run import run_bench

    models = {r["plan"]: trained.get(r["name"], base) for r in planned_runs(s) if r["main"] and r["objective"] == "lm"}
    say(f"bench: memory and throughput of {len(models)} plans, each with its lm run's weights (the engine only)")
    reports = [run_bench(str(folder), plans=[plan], out=None, hf=False, compile=False, quick=True, batch=[1, 64],
                         step_batch=[64], deadline_s=max(30.0, 300.0 / len(models)), progress=False,
                         print_table=False) for plan, folder in models.items()]
    meta = {**reports[0]["meta"], "source": "each plan's lm-uptrained model (real weights)",
            "errors": [e for r in reports for e in r["meta"].get("errors", [])],
            "seconds": round(sum(r["meta"].get("seconds", 0.0) for r in reports), 1)}
    result = {"meta": meta, "plans": [p for r in reports for p in r["plans"]],
              "summary": {k: v for r in reports for k, v in r["summary"].items()}}
    result["files"] = write_outputs(result, out / "bench")
    atomic_json(path, result)
    return result


def stage_report(s: Settings, out: Path, evals: dict[str, dict], train_dirs: dict[str, Path],
                 bench: dict | None, clock: StageClock | None, command: str) -> Path:
    """``results.json``, ``report.md`` and the plots, from every evaluation (and the benchmark, if it ran).
    The dtype is what each evaluation recorded; the time is the sum of the stages' recorded seconds over every
    invocation (``clock``, or with None, ``--report-only``, what ``timing.json`` holds); with None the card is also
    what the run recorded, not this process's."""
    recorded = [e.get("mlkv", {}).get("evaluated_on", {}) for e in evals.values()]
    dtype = ", ".join(sorted({r.get("dtype", OLD_EVAL_DTYPE) for r in recorded})) or "no evaluation"
    if clock is None:
        card = ", ".join(sorted({r["card"] for r in recorded if "card" in r})) or "not recorded"
        seconds, stages = recorded_seconds(out)
    else:
        stages = clock.seconds()
        card, seconds = card_name(s.device), sum(stages.values())
    results = build_results(s, out, evals, train_dirs, bench, seconds=seconds, command=command,
                            git_commit=_git_commit(), card=card)
    results["stage_seconds"] = {name: round(value, 1) for name, value in stages.items()}
    results["disk_bytes"] = disk_bytes(out)  # all but results.json and report.md themselves (a few kB)
    results["eval_dtype"] = dtype
    atomic_json(out / "results.json", results)
    return atomic_write(out / "report.md", render_report(results))


def _git_commit() -> str:
    """The checkout's commit (``MLKV_GIT_COMMIT`` where the tree has no .git, as on a copied GPU machine)."""
    if os.environ.get("MLKV_GIT_COMMIT"):
        return os.environ["MLKV_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- all stages -------------------------------------------------------------------------------------------------
def _stages(s: Settings, data: Path, out: Path, clock: StageClock, command: str) -> Path:
    with clock.stage("base"):
        base = stage_base(s, data, out)
    with clock.stage("convert"):
        converted = stage_convert(s, data, base, out)
    with clock.stage("uptrain"):
        trained = stage_uptrain(s, data, base, converted, out)
    step0 = {name: converted[key] for name, key in step0_runs(s).items()}
    models = {"base": base, **step0, **trained}
    with clock.stage("eval"):
        evals = stage_eval(s, data, models, out)
    with clock.stage("bench"):
        bench = stage_bench(s, out, trained, base)
    with clock.stage("report"):
        report = stage_report(s, out, evals, trained, bench, clock, command)
    if s.export:
        with clock.stage("export"):
            stage_export(out, models)
    return report


def stage_export(out: Path, models: dict[str, Path]) -> None:
    """``--export``: every model of the report as ``out/export/<run>`` (``mlkv.export``), with its evaluation;
    written again at every invocation, so that it holds what the run holds now."""
    from mlkv.export.folder import export_checkpoint

    for name, folder in models.items():
        results = out / "eval" / f"{name}.json"
        export_checkpoint(folder, out / "export" / name, overwrite=True,
                          results=[str(results)] if results.is_file() else None)
    say(f"export: {len(models)} models in {out / 'export'}, each loading with transformers alone")


def _report_from_what_exists(s: Settings, out: Path, command: str) -> Path:
    """``--report-only``: the report of the finished trainings, evaluations and benchmark in ``out``, running
    nothing (a run cut short, e.g. by the end of a GPU lease, still gets its report; a live run's progress too)."""
    evals = {p.stem: json.loads(p.read_text()) for p in sorted((out / "eval").glob("*.json"))}
    trained = {r["name"]: out / "uptrain" / r["name"] for r in planned_runs(s)
               if read_done(out / "uptrain" / r["name"])}
    bench_path = out / "bench" / "bench.json"
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    say(f"report only: {len(evals)} evaluations, {len(trained)} finished trainings, "
        f"{'a' if bench else 'no'} benchmark")
    return stage_report(s, out, evals, trained, bench, None, command)


def reproduce(s: Settings, command: str = "mlkv reproduce") -> Path:
    """Run every stage into ``s.out`` (finished ones are skipped) and return the report's path. Every setting and
    input is checked first."""
    s = resolve_settings(s)
    out = Path(s.out)
    if s.report_only:  # reads the folder (no data) and writes only the report, atomically: safe beside a live run
        if not (out / "settings.json").is_file():
            raise FileNotFoundError(f"--out {out}: no run there (no settings.json); --report-only reports on the "
                                    "folder of an earlier or running `mlkv reproduce`, given its flags")
        check_settings(s, out)
        report = _report_from_what_exists(s, out, command)
        say(f"report: {report}")
        return report
    check_device(s.device)
    data = resolve_data_dir(s.data_dir)
    check_inputs(s, data)
    # The whole run holds the output folder's lock: a second `mlkv reproduce --out` the same folder gets a named
    # error, and what a killed earlier run left half-written anywhere inside is removed first.
    with folder_lock(out, command):
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_temps_under(out)
        return _run_locked(s, data, out, command)


def _run_locked(s: Settings, data: Path, out: Path, command: str) -> Path:
    check_settings(s, out)
    clock = StageClock.load(out)  # the stages' seconds of earlier invocations: a run resumed across calls adds up
    # A run stopped by SIGTERM (`timeout`, a scheduler) still adds its time: SystemExit runs the `finally` below.
    on_term = signal.getsignal(signal.SIGTERM)
    main_thread = threading.current_thread() is threading.main_thread()  # only it may install handlers
    if main_thread:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with clock.heartbeat():  # a kill -9 keeps all but the last seconds
            report = _stages(s, data, out, clock, command)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the write below
        clock.record()
        if main_thread:
            signal.signal(signal.SIGTERM, on_term if on_term is not None else signal.SIG_DFL)
    say(f"report: {report}")
    return report
