"""``mlkv reproduce``: the MLKV paper's experiment end to end, on real data, at mini scale.

Stages (each leaves a ``done.json`` marker, or for eval and bench its result file, under ``--out``; a rerun skips
finished work, and refuses an ``--out`` made with other settings):

1. ``base``: pretrain a Pythia-shaped MHA base (12 layers x 12 heads, so the paper's grid applies) on the Gutenberg
   corpus with the Pythia tokenizer, or take ``--base DIR`` (a local Hugging Face checkpoint such as
   EleutherAI/pythia-160m-deduped saved to disk) and convert it to an MHA mlkv checkpoint.
2. ``convert``: the base converted to the 9 paper configs (``mean`` init), plus ``pairwise`` and ``first`` for
   MLKV-6 and MLKV-2 (the init comparison).
3. ``uptrain``: every converted model uptrained for the same token budget with the ``lm`` objective; the MLKV presets
   also with ``distill`` at equal tokens: KL to the base model's logits plus ``--distill-hidden`` (default 10) times
   the layer-wise hidden-state distance to the base (``mlkv.training.hidden_distance``). The hidden-state term is
   what makes distillation pay at this scale: on MLKV-6 it closes 36% of the base-to-LM gap against 9% for the KL
   alone (``benchmarks/results/distill_variants_h200``). ``--uptrain-lr`` (default the paper's 6e-4) applies to
   every uptraining run.
4. ``eval``: Gutenberg validation perplexity, WikiText-2 word perplexity, and zero-shot LAMBADA, PIQA, ARC-Easy,
   SciQ and HellaSwag through lm-evaluation-harness (full sets unless ``--limit``). With full sets the harness's
   requests are built once, before the evaluation processes start, into ``lm_eval_requests/``, and every
   evaluation loads them (``mlkv.evaluation.tasks.build_request_cache``).
5. ``bench``: KV bytes, max batch and decode throughput per config on the engine (CUDA only).
6. ``report``: ``report.md``, ``results.json`` and plots (paper-style table, quality vs KV bytes Pareto plot,
   uptraining loss curves, max batch and throughput per config).

``--smoke`` runs the whole pipeline on CPU in minutes: a tiny 12x12 model, a few documents, a few steps, ``--limit``ed
tasks. It is a CI test; its numbers mean nothing.

This module runs the stages (``reproduce``); ``config`` holds the settings and names the runs, ``report`` turns the
evaluations into the report and its plots, and ``command`` is the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from mlkv.checkpoints import atomic_json, atomic_write
from mlkv.reproduce.config import Settings, check_settings, planned_runs, run_name, task_runs
from mlkv.reproduce.report import (distillation_gap, init_comparison, plot_pareto, plot_uptrain_loss, render_report,
                                   report_rows)

HF_DATASET = "EleutherAI/the_pile_deduplicated (mlkv train takes any text dataset as --data hf:NAME)"


# ---- paths, markers, log ----------------------------------------------------------------------------------------
def resolve_data_dir(data_dir: str | None) -> Path:
    """The shared data folder holding the Gutenberg corpus (``mlkv.data.paths``), or a named error."""
    from mlkv.data.paths import require_data_dir

    return require_data_dir(data_dir, "corpus/gutenberg", hint=f"With a network, train on a Hugging Face dataset "
                            f"instead: {HF_DATASET}")


def read_done(folder: Path) -> dict | None:
    """The ``done.json`` marker of a finished stage or run (what it recorded), or None if it is not finished."""
    marker = folder / "done.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def mark_done(folder: Path, info: dict) -> None:
    """Mark ``folder`` finished, recording ``info`` (atomically: a marker is whole or absent)."""
    atomic_json(folder / "done.json", info)


def say(msg: str) -> None:
    """One line of the pipeline's progress log, timestamped."""
    print(f"[mlkv reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- base, convert, uptrain -------------------------------------------------------------------------------------
def stage_base(s: Settings, data: Path, out: Path) -> Path:
    """A trained MHA base in mlkv format: pretrained here, or converted from ``--base``."""
    folder = out / "base"
    if read_done(folder):
        say("base: done, skipping")
        return folder
    if folder.exists() and (s.base or not (folder / "checkpoint").exists()):
        shutil.rmtree(folder)  # an unfinished base that has no checkpoint to resume from
    if s.base:
        from mlkv.model.convert import convert_checkpoint

        say(f"base: converting {s.base} (no pretraining)")
        convert_checkpoint(s.base, folder, plan="mha")
        mark_done(folder, {"source": s.base})
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
    summary = train(TrainConfig(model=str(cfg_dir), out=str(folder), **_train_common(s, data),
                                tokens=s.base_tokens, lr=6e-4 if not s.smoke else 3e-3, warmup_ratio=0.05,
                                resume=(folder / "checkpoint").exists()))
    _finish_training(folder, summary, _brief(summary))
    return folder


def _finish_training(folder: Path, summary: dict, info: dict) -> None:
    """Mark a training run done -- unless a signal stopped it. ``train`` takes SIGTERM/SIGINT itself to save a
    checkpoint and returns; the run is then left unfinished for the next invocation to resume, and the pipeline
    stops with the signal's exit code."""
    if summary.get("interrupted"):
        signum = summary.get("stop_signal") or signal.SIGTERM
        say(f"{folder.name}: stopped by signal {signum} at step {summary.get('steps')}; a rerun resumes it")
        sys.exit(128 + signum)
    mark_done(folder, info)


def _train_common(s: Settings, data: Path) -> dict:
    corpus = data / "corpus" / "gutenberg"
    return dict(data=[str(corpus / shard) for shard in s.train_shards], val_data=[str(corpus / "val.jsonl.xz")],
                tokenizer=str(data / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"),
                cache_dir=str(Path(s.out) / "token_cache"), max_documents=s.max_documents, seq_len=s.seq_len,
                micro_batch_size=s.micro_batch_size, compile=s.compile, device=s.device, seed=s.seed,
                eval_every=10**9, eval_batches=20 if not s.smoke else 2, save_every=10**9,
                progress=True, log_every=10 if not s.smoke else 1)


def _brief(summary: dict) -> dict:
    return {k: summary.get(k) for k in ("steps", "tokens", "final_loss", "val_loss", "val_ppl",
                                         "tokens_per_s", "mfu", "seconds")}


def stage_convert(s: Settings, base: Path, out: Path) -> dict[tuple[str, str], Path]:
    from mlkv.model.convert import convert_checkpoint

    converted = {}
    for plan, init in sorted({(r["plan"], r["init"]) for r in planned_runs(s)}):
        folder = out / "converted" / f"{plan}-{init}"
        if not read_done(folder):
            if folder.exists():
                shutil.rmtree(folder)
            convert_checkpoint(base, folder, plan=plan, init=init)
            mark_done(folder, {"plan": plan, "init": init})
        converted[(plan, init)] = folder
    say(f"convert: {len(converted)} checkpoints")
    return converted


def stage_uptrain(s: Settings, data: Path, base: Path, converted: dict, out: Path) -> dict[str, Path]:
    trained = {}
    for r in planned_runs(s):
        name = run_name(**r)
        folder = out / "uptrain" / name
        trained[name] = folder
        if read_done(folder):
            continue
        say(f"uptrain: {name} for {s.uptrain_tokens} tokens")
        extra = dict(objective="distill", teacher=str(base), distill_hidden=s.distill_hidden) \
            if r["objective"] == "distill" else {}
        uptrain_one(s, data, converted[(r["plan"], r["init"])], folder, r, seed=r.get("seed", 0), **extra)
    return trained


def uptrain_one(s: Settings, data: Path, model: Path, folder: Path, info: dict, seed: int = 0, **train_args) -> None:
    """Uptrain ``model`` into ``folder`` for the run's token budget (data order ``seed``), resuming a stopped run,
    and mark it done with ``info``. ``train_args``: extra ``TrainConfig`` fields (objective, teacher, ...)."""
    from mlkv.training.loop import TrainConfig, train

    if folder.exists() and not (folder / "checkpoint").exists():
        shutil.rmtree(folder)  # stopped before its first checkpoint: start over
    common = _train_common(s, data)
    common["seed"] += seed  # another data order
    train_args = {"lr": s.uptrain_lr, **train_args}
    summary = train(TrainConfig(model=str(model), out=str(folder), **common, tokens=s.uptrain_tokens,
                                resume=(folder / "checkpoint").exists(), **train_args))
    _finish_training(folder, summary, {**info, **_brief(summary)})


# ---- eval -------------------------------------------------------------------------------------------------------
def eval_one(s: Settings, data: Path, name: str, folder: Path, path: Path) -> None:
    """Evaluate one model and write ``path`` (perplexities always; zero-shot tasks except for the init comparison's
    extra runs). Standard errors of non-mean metrics (LAMBADA perplexity) use 100 bootstrap resamples."""
    from mlkv.checkpoints import load_model
    from mlkv.evaluation.perplexity import perplexity_file
    from mlkv.evaluation.results import save_results
    from mlkv.evaluation.tasks import run_tasks

    model, tok = load_model(folder, s.device)
    tasks = s.tasks if name in task_runs(s) else []
    res = run_tasks(model, tasks, limit=s.limit, batch_size=s.eval_batch_size, data_dir=data, tokenizer=tok,
                    bootstrap_iters=0 if s.smoke else 100, request_cache=_request_cache(s)) if tasks else {"mlkv": {}}
    res["mlkv"]["perplexity"] = {
        "gutenberg_val": gutenberg_perplexity(s, data, model, tok),
        "wikitext2": perplexity_file(model, tok, data / "eval" / "wikitext2" / "wiki.test.raw",
                                     max_length=s.seq_len, batch_size=8, limit=s.ppl_limit,
                                     max_tokens=s.ppl_max_tokens if s.smoke else None),
    }
    save_results(res, path)


def _request_cache(s: Settings) -> Path | None:
    """Where the evaluations share the harness's built requests (full task sets only; see mlkv.evaluation.tasks)."""
    return Path(s.out) / "lm_eval_requests" if s.limit is None and s.tasks else None


def gutenberg_perplexity(s: Settings, data: Path, model, tok) -> dict:
    """Perplexity on the first ``ppl_max_tokens`` tokens of Gutenberg validation: windows of ``seq_len``, stride
    half of it, the books concatenated (the report's in-domain quality measure)."""
    from mlkv.evaluation.perplexity import perplexity_file

    return perplexity_file(model, tok, data / "corpus" / "gutenberg" / "val.jsonl.xz", max_length=s.seq_len,
                           stride=s.seq_len // 2, batch_size=8, limit=s.ppl_limit, max_tokens=s.ppl_max_tokens,
                           document_level=False)


def _eval_worker(s: Settings, data: Path, name: str, folder: Path, path: Path, workers: int,
                 memory_fraction: float | None) -> str:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // workers))
    if memory_fraction is not None:
        # A share of the card: without it each process's caching allocator keeps what it once used, and 8
        # evaluations ran an H200 out of memory together (16-25 GiB cached each) although each needs far less.
        device = torch.device(s.device or "cuda")  # the call wants an index: "cuda" alone is refused
        torch.cuda.set_per_process_memory_fraction(memory_fraction, device.index or 0)
    eval_one(s, data, name, folder, path)
    return name


def _memory_share(s: Settings, workers: int) -> float | None:
    """Each evaluation process's fraction of the card: 90% of what is free now (less a CUDA context each), split."""
    import gc

    import torch

    if not (torch.cuda.is_available() and (s.device is None or s.device.startswith("cuda"))):
        return None
    gc.collect()
    torch.cuda.empty_cache()  # what the training stages left cached in this process
    device = torch.device(s.device or "cuda")
    free, total = torch.cuda.mem_get_info(device)
    return max(0.01, (0.9 * free - workers * 2**30) / workers / total)


def eval_workers(s: Settings) -> int:
    if s.eval_workers is not None:
        return max(1, s.eval_workers)
    import torch

    cuda = torch.cuda.is_available() and (s.device is None or s.device.startswith("cuda"))
    return min(8, max(1, (os.cpu_count() or 2) // 2)) if cuda else 1


def _make_pool(workers: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _build_shared_requests(s: Settings, data: Path) -> None:
    """Build the harness's requests once, before the evaluation processes start; every evaluation loads them. (One
    process at a time: its first evaluation builds them.) A complete cache from an earlier invocation is kept."""
    from mlkv.evaluation.tasks import build_request_cache, request_cache_dir

    cache = _request_cache(s)
    folder = request_cache_dir(cache, s.tasks, data)
    if not all(any(folder.glob(f"requests-{task}-*")) for task in s.tasks):
        say(f"eval: built the requests of {', '.join(s.tasks)} once ({build_request_cache(s.tasks, cache, data)})")


def _eval_in_pool(s: Settings, data: Path, todo: list[str], models: dict[str, Path], paths: dict[str, Path],
                  workers: int) -> dict[str, str]:
    """Evaluate ``todo`` in ``workers`` processes; returns the models that failed, with their error."""
    from concurrent.futures import as_completed

    share = _memory_share(s, workers)
    failed = {}
    with _make_pool(workers) as pool:
        jobs = {pool.submit(_eval_worker, s, data, name, models[name], paths[name], workers, share): name
                for name in todo}
        try:
            for i, job in enumerate(as_completed(jobs), 1):
                name = jobs[job]
                try:
                    job.result()
                    say(f"eval: {name} done ({i}/{len(jobs)})")
                except Exception as err:  # noqa: BLE001 - retried alone afterwards, which raises if it fails again
                    failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    say(f"eval: {name} failed in a worker ({failed[name][:200]}); retried alone at the end")
        except BaseException:  # Ctrl-C, SIGTERM: stop the queue and the workers; finished results stay on disk
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()  # spawned workers do not share this process's signal handler
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return failed


def stage_eval(s: Settings, data: Path, models: dict[str, Path], out: Path) -> dict[str, dict]:
    """Every model's evaluation; with several workers, that many models at once in separate processes (the
    harness's per-request work is host-bound, so one GPU serves several evaluations)."""
    paths = {name: out / "eval" / f"{name}.json" for name in models}
    todo = [name for name, path in paths.items() if not path.is_file()]
    workers = min(eval_workers(s), max(1, len(todo)))
    if todo:
        say(f"eval: {len(todo)} models, {workers} at a time")
    if workers > 1 and _request_cache(s) is not None and set(todo) & task_runs(s):
        _build_shared_requests(s, data)
    if workers == 1:
        for name in todo:
            say(f"eval: {name}")
            eval_one(s, data, name, models[name], paths[name])
    elif todo:
        for name in _eval_in_pool(s, data, todo, models, paths, workers):  # one at a time here, with the whole card
            say(f"eval: {name} (retry)")
            eval_one(s, data, name, models[name], paths[name])
    return {name: json.loads(path.read_text()) for name, path in paths.items()}


# ---- bench, report ----------------------------------------------------------------------------------------------
def stage_bench(s: Settings, out: Path) -> dict | None:
    import torch

    path = out / "bench" / "bench.json"
    if path.is_file():
        return json.loads(path.read_text())
    if not s.bench or not torch.cuda.is_available():
        say("bench: skipped (needs CUDA; --no-bench)")
        return None
    from mlkv.inference.bench.run import run_bench

    say("bench: memory and throughput per config (the base's shape; the engine only, see mlkv bench for HF)")
    result = run_bench(str(out / "base"), plans=list(s.plans), out=str(out / "bench"), hf=False,
                       compile=False, quick=True, batch=[1, 64], step_batch=[64], deadline_s=300, progress=False)
    atomic_json(path, result)
    return result


def stage_report(s: Settings, out: Path, evals: dict[str, dict], train_dirs: dict[str, Path],
                 bench: dict | None, started: float, command: str) -> Path:
    """``results.json``, ``report.md`` and the plots, from every evaluation (and the benchmark, if it ran)."""
    from mlkv.model.config import MLKVConfig

    rows = report_rows(evals, MLKVConfig.from_pretrained(out / "base"))
    by_run = {r["run"]: r for r in rows}
    plots = out / "plots"
    plot_pareto(rows, by_run, plots / "pareto.png")
    plot_uptrain_loss(train_dirs, plots / "uptrain_loss.png")
    results = {"settings": asdict(s), "rows": rows, "distillation_gap": distillation_gap(by_run),
               "init_comparison": init_comparison(s, by_run), "bench": bench,
               "seconds": time.time() - started, "command": command, "git_commit": _git_commit(), "card": _card()}
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


def _card() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


# ---- all stages -------------------------------------------------------------------------------------------------
def reproduce(s: Settings, command: str = "mlkv reproduce") -> Path:
    """Run every stage into ``s.out`` (finished ones are skipped) and return the report's path."""
    started = time.time()
    data = resolve_data_dir(s.data_dir)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(s, out)
    timing_path = out / "timing.json"
    earlier = json.loads(timing_path.read_text())["earlier_seconds"] if timing_path.is_file() else 0.0
    # A run stopped by SIGTERM (`timeout`, a scheduler) still adds its time: SystemExit runs the `finally` below.
    on_term = signal.getsignal(signal.SIGTERM)
    main_thread = threading.current_thread() is threading.main_thread()  # only it may install handlers
    if main_thread:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        base = stage_base(s, data, out)
        converted = stage_convert(s, base, out)
        trained = stage_uptrain(s, data, base, converted, out)
        evals = stage_eval(s, data, {"base": base, **trained}, out)
        bench = stage_bench(s, out)
        # Wall time over every invocation of this output folder: a run resumed across calls adds up.
        report = stage_report(s, out, evals, trained, bench, started - earlier, command)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the write below
        atomic_json(timing_path, {"earlier_seconds": earlier + time.time() - started})
        if main_thread:
            signal.signal(signal.SIGTERM, on_term if on_term is not None else signal.SIG_DFL)
    say(f"report: {report}")
    return report
