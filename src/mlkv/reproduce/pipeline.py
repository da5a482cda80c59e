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
   the layer-wise hidden-state distance to the base (``mlkv.training.loop.hidden_distance``). The hidden-state term is what
   makes distillation pay at this scale: on MLKV-6 it closes 36% of the base-to-LM gap against 9% for the KL alone
   (``benchmarks/results/distill_variants_h200``). ``--uptrain-lr`` (default the paper's 6e-4) applies to every
   uptraining run.
4. ``eval``: Gutenberg validation perplexity, WikiText-2 word perplexity, and zero-shot LAMBADA, PIQA, ARC-Easy,
   SciQ and HellaSwag through lm-evaluation-harness (full sets unless ``--limit``). With full sets the harness's
   requests are built once, before the evaluation processes start, into ``lm_eval_requests/``, and every
   evaluation loads them (``mlkv.evaluation.evaluate.build_request_cache``).
5. ``bench``: KV bytes, max batch and decode throughput per config on the engine (CUDA only).
6. ``report``: ``report.md``, ``results.json`` and plots (paper-style table, quality vs KV bytes Pareto plot,
   uptraining loss curves, max batch and throughput per config).

``--smoke`` runs the whole pipeline on CPU in minutes: a tiny 12x12 model, a few documents, a few steps, ``--limit``ed
tasks. It is a CI test; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlkv.model.convert import INITS
from mlkv.model.sharing import PAPER_PRESETS, resolve_plan

MLKV_ONLY = [p for p in PAPER_PRESETS if p.startswith("MLKV")]
INIT_COMPARISON = ["MLKV-6", "MLKV-2"]
DEFAULT_TASKS = ["lambada_openai", "piqa", "arc_easy", "sciq", "hellaswag"]
HF_DATASET = "EleutherAI/the_pile_deduplicated (mlkv train takes any text dataset as --data hf:NAME)"


@dataclass
class Settings:
    """Everything that shapes a reproduction run (saved in results.json)."""

    out: str
    data_dir: str | None = None
    base: str | None = None
    smoke: bool = False
    hidden_size: int = 384
    intermediate_size: int | None = None
    seq_len: int = 2048
    micro_batch_size: int = 16
    base_tokens: str = "50M"
    uptrain_tokens: str = "5M"
    train_shards: list[str] = field(default_factory=lambda: ["train_00.jsonl.xz", "train_01.jsonl.xz"])
    max_documents: int | None = None
    plans: list[str] = field(default_factory=lambda: list(PAPER_PRESETS))
    distill_plans: list[str] = field(default_factory=lambda: list(MLKV_ONLY))
    init_plans: list[str] = field(default_factory=lambda: list(INIT_COMPARISON))
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    limit: int | None = None
    ppl_limit: int | None = None
    ppl_max_tokens: int | None = 500_000  # Gutenberg val tokens scored (the file has ~5.4M)
    eval_batch_size: int = 32
    eval_workers: int | None = None  # models evaluated at once (processes); None: min(8, cores/2) on CUDA, 1 on CPU
    init_seeds: int = 1  # uptraining data orders per init in the init comparison (seed 0 is the main run)
    uptrain_lr: float = 6e-4  # the paper's; 1.2e-3 was better for lm and distill at 4M tokens (distill_variants)
    distill_hidden: float = 10.0  # weight of the hidden-state distance in the distill runs (0: KL only)
    bench: bool = True
    compile: bool = False
    device: str | None = None
    seed: int = 0

    @classmethod
    def smoke_settings(cls, out: str, **overrides) -> "Settings":
        base = dict(out=out, smoke=True, hidden_size=48, intermediate_size=96, seq_len=64, micro_batch_size=4,
                    base_tokens="12K", uptrain_tokens="2K", train_shards=["train_00.jsonl.xz"], max_documents=2,
                    limit=4, ppl_limit=1, ppl_max_tokens=1024, eval_batch_size=8, bench=False, device="cpu",
                    plans=["MHA-144", "MLKV-6", "MLKV-2"], distill_plans=["MLKV-6", "MLKV-2"], eval_workers=1)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


# ---- paths and data ---------------------------------------------------------------------------------------------
def resolve_data_dir(data_dir: str | None) -> Path:
    """The shared data folder holding the Gutenberg corpus (``mlkv.data.paths``), or a named error."""
    from mlkv.data.paths import require_data_dir

    return require_data_dir(data_dir, "corpus/gutenberg", hint=f"With a network, train on a Hugging Face dataset "
                            f"instead: {HF_DATASET}")


def run_name(plan: str, objective: str = "lm", init: str = "mean", seed: int = 0) -> str:
    return f"{plan}-{objective}" + ("" if init == "mean" else f"-{init}") + (f"-s{seed}" if seed else "")


def _done(folder: Path) -> dict | None:
    marker = folder / "done.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def _mark_done(folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "done.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, folder / "done.json")


def _say(msg: str) -> None:
    print(f"[mlkv reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- stages -----------------------------------------------------------------------------------------------------
def stage_base(s: Settings, data: Path, out: Path) -> Path:
    """A trained MHA base in mlkv format: pretrained here, or converted from ``--base``."""
    folder = out / "base"
    if _done(folder):
        _say("base: done, skipping")
        return folder
    if folder.exists() and (s.base or not (folder / "checkpoint").exists()):
        shutil.rmtree(folder)  # an unfinished base that has no checkpoint to resume from
    if s.base:
        from mlkv.model.convert import convert_checkpoint

        _say(f"base: converting {s.base} (no pretraining)")
        convert_checkpoint(s.base, folder, plan="mha")
        _mark_done(folder, {"source": s.base})
        return folder
    from mlkv.model.config import MLKVConfig, PRESETS
    from mlkv.training.loop import TrainConfig, train

    shape = {**PRESETS["pythia-mini"], "hidden_size": s.hidden_size,
             "intermediate_size": s.intermediate_size or 4 * s.hidden_size,
             "max_position_embeddings": max(2048, s.seq_len)}
    cfg_dir = out / "base_config"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    MLKVConfig(**shape).save_pretrained(cfg_dir)
    _say(f"base: pretraining a 12x12 MHA model (hidden {s.hidden_size}) for {s.base_tokens} tokens")
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
        _say(f"{folder.name}: stopped by signal {signum} at step {summary.get('steps')}; a rerun resumes it")
        sys.exit(128 + signum)
    _mark_done(folder, info)


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


def planned_runs(s: Settings) -> list[dict]:
    """Every uptraining run: 9 plans with lm, MLKV plans with distill, the init comparison with lm (each init with
    ``init_seeds`` data orders; seed 0 of ``mean`` is the plan's main run)."""
    runs = [dict(plan=p, objective="lm", init="mean") for p in s.plans]
    runs += [dict(plan=p, objective="distill", init="mean") for p in s.distill_plans]
    runs += [dict(plan=p, objective="lm", init=i, seed=k) for k in range(s.init_seeds) for p in s.init_plans
             for i in INITS if (i, k) != ("mean", 0)]
    return runs


def stage_convert(s: Settings, base: Path, out: Path) -> dict[tuple[str, str], Path]:
    from mlkv.model.convert import convert_checkpoint

    converted = {}
    for plan, init in sorted({(r["plan"], r["init"]) for r in planned_runs(s)}):
        folder = out / "converted" / f"{plan}-{init}"
        if not _done(folder):
            if folder.exists():
                shutil.rmtree(folder)
            convert_checkpoint(base, folder, plan=plan, init=init)
            _mark_done(folder, {"plan": plan, "init": init})
        converted[(plan, init)] = folder
    _say(f"convert: {len(converted)} checkpoints")
    return converted


def stage_uptrain(s: Settings, data: Path, base: Path, converted: dict, out: Path) -> dict[str, Path]:
    trained = {}
    for r in planned_runs(s):
        name = run_name(**r)
        folder = out / "uptrain" / name
        trained[name] = folder
        if _done(folder):
            continue
        _say(f"uptrain: {name} for {s.uptrain_tokens} tokens")
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


def eval_one(s: Settings, data: Path, name: str, folder: Path, path: Path) -> None:
    """Evaluate one model and write ``path`` (perplexities always; zero-shot tasks except for the init comparison's
    extra runs). Standard errors of non-mean metrics (LAMBADA perplexity) use 100 bootstrap resamples."""
    from mlkv.evaluation.evaluate import load_model, perplexity_file, run_tasks, save_results

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


def task_runs(s: Settings) -> set[str]:
    """The models that get zero-shot tasks: the base and the main runs (mean init, data order 0). The init comparison
    is judged on perplexity, so its extra runs (other inits, other data orders) get none."""
    return {"base"} | {run_name(**r) for r in planned_runs(s) if r["init"] == "mean" and not r.get("seed")}


def _request_cache(s: Settings) -> Path | None:
    """Where the evaluations share the harness's built requests (full task sets only; see mlkv.evaluation.evaluate)."""
    return Path(s.out) / "lm_eval_requests" if s.limit is None and s.tasks else None


def gutenberg_perplexity(s: Settings, data: Path, model, tok) -> dict:
    """Perplexity on the first ``ppl_max_tokens`` tokens of Gutenberg validation: windows of ``seq_len``, stride
    half of it, the books concatenated (the report's in-domain quality measure)."""
    from mlkv.evaluation.evaluate import perplexity_file

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


def stage_eval(s: Settings, data: Path, models: dict[str, Path], out: Path) -> dict[str, dict]:
    """Every model's evaluation; with several workers, that many models at once in separate processes (the
    harness's per-request work is host-bound, so one GPU serves several evaluations)."""
    paths = {name: out / "eval" / f"{name}.json" for name in models}
    todo = [name for name, path in paths.items() if not path.is_file()]
    workers = min(eval_workers(s), max(1, len(todo)))
    if todo:
        _say(f"eval: {len(todo)} models, {workers} at a time")
    cache = _request_cache(s)
    if workers > 1 and cache is not None and set(todo) & task_runs(s):
        # Built once here, before the processes start; loaded by every evaluation. (One process at a time: its first
        # evaluation builds it.) A complete cache from an earlier invocation is kept.
        from mlkv.evaluation.evaluate import build_request_cache, request_cache_dir

        folder = request_cache_dir(cache, s.tasks, data)
        if not all(any(folder.glob(f"requests-{task}-*")) for task in s.tasks):
            _say(f"eval: built the requests of {', '.join(s.tasks)} once ({build_request_cache(s.tasks, cache, data)})")
    if workers == 1:
        for name in todo:
            _say(f"eval: {name}")
            eval_one(s, data, name, models[name], paths[name])
    elif todo:
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
                        _say(f"eval: {name} done ({i}/{len(jobs)})")
                    except Exception as err:  # noqa: BLE001 - retried alone below, which raises if it fails again
                        failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                        _say(f"eval: {name} failed in a worker ({failed[name][:200]}); retried alone at the end")
            except BaseException:  # Ctrl-C, SIGTERM: stop the queue and the workers; finished results stay on disk
                for process in list((getattr(pool, "_processes", None) or {}).values()):
                    process.terminate()  # spawned workers do not share this process's signal handler
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        for name in failed:  # one at a time in this process, with the whole card
            _say(f"eval: {name} (retry)")
            eval_one(s, data, name, models[name], paths[name])
    return {name: json.loads(path.read_text()) for name, path in paths.items()}


def stage_bench(s: Settings, out: Path) -> dict | None:
    import torch

    path = out / "bench" / "bench.json"
    if path.is_file():
        return json.loads(path.read_text())
    if not s.bench or not torch.cuda.is_available():
        _say("bench: skipped (needs CUDA; --no-bench)")
        return None
    from mlkv.inference.bench.run import run_bench

    _say("bench: memory and throughput per config (the base's shape; the engine only, see mlkv bench for HF)")
    result = run_bench(str(out / "base"), plans=list(s.plans), out_dir=str(out / "bench"), hf=False,
                       compile=False, quick=True, batches=[1, 64], step_batches=[64], deadline_s=300, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return result


# ---- report -----------------------------------------------------------------------------------------------------
def _metric(res: dict, task: str, metric: str) -> float | None:
    value = res.get("results", {}).get(task, {}).get(f"{metric},none")
    return None if value is None or isinstance(value, str) else float(value)


def summarize(name: str, res: dict) -> dict:
    """One report row: perplexities and task metrics of a run's evaluation."""
    row = {"run": name}
    ppl = res.get("mlkv", {}).get("perplexity", {})
    row["gutenberg_ppl"] = ppl.get("gutenberg_val", {}).get("token_level", {}).get("perplexity")
    row["wikitext_word_ppl"] = ppl.get("wikitext2", {}).get("document_level", {}).get("word_perplexity")
    row["lambada_acc"] = _metric(res, "lambada_openai", "acc")
    row["lambada_ppl"] = _metric(res, "lambada_openai", "perplexity")
    for task in ("piqa", "arc_easy", "sciq"):
        row[f"{task}_acc"] = _metric(res, task, "acc")
    row["hellaswag_acc_norm"] = _metric(res, "hellaswag", "acc_norm")
    accs = [row[k] for k in ("arc_easy_acc", "lambada_acc", "piqa_acc", "sciq_acc") if row[k] is not None]
    row["avg_paper4"] = sum(accs) / len(accs) if len(accs) == 4 else None
    return row


def plan_of(run: str) -> str:
    """``MLKV-6-distill`` -> ``MLKV-6``; ``MLKV-2-lm-pairwise`` -> ``MLKV-2``; ``base`` -> ``MHA-144``."""
    if run == "base":
        return "MHA-144"
    return re.sub(r"-(lm|distill)(-(pairwise|first))?(-s\d+)?$", "", run)


def stage_report(s: Settings, out: Path, evals: dict[str, dict], train_dirs: dict[str, Path],
                 bench: dict | None, started: float, command: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlkv.model.config import MLKVConfig

    base_cfg = MLKVConfig.from_pretrained(out / "base")
    rows = []
    for name, res in evals.items():
        row = summarize(name, res)
        plan = resolve_plan(plan_of(name), base_cfg.num_hidden_layers, base_cfg.num_attention_heads)
        row.update(config=plan_of(name), structure=plan.structure, kv_heads=plan.total_kv_heads,
                   kv_bytes_per_token=plan.kv_bytes_per_token(base_cfg.head_dim, "fp16"))
        rows.append(row)
    by_run = {r["run"]: r for r in rows}

    # Distillation: the fraction of a perplexity gap that distillation closes, at equal uptraining tokens. Against
    # the base (as the issue asks) and against MHA-144 uptrained for the same tokens (the fair control when extra
    # tokens still improve the base itself).
    gap = {}
    kd, lm = (by_run.get(k, {}).get("gutenberg_ppl") for k in ("MLKV-6-distill", "MLKV-6-lm"))
    for ref_name in ("base", "MHA-144-lm"):
        ref = by_run.get(ref_name, {}).get("gutenberg_ppl")
        if None not in (ref, lm, kd):  # a gap exists only when LM-uptrained MLKV-6 is worse than the reference
            gap[ref_name] = {"reference_ppl": ref, "lm_ppl": lm, "distill_ppl": kd,
                             "fraction_closed": (lm - kd) / (lm - ref) if lm > ref else None}
    gap = gap or None
    inits = init_comparison(s, by_run)

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    # Pareto: quality against KV bytes/token.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for objective, marker in (("-lm", "o"), ("-distill", "s")):
        pts = [(r["kv_bytes_per_token"], r["gutenberg_ppl"], r["config"]) for r in rows
               if r["run"].endswith(objective) and r["gutenberg_ppl"]]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=objective.strip("-"))
            for x, y, label in pts:
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if by_run.get("base", {}).get("gutenberg_ppl"):
        ax.axhline(by_run["base"]["gutenberg_ppl"], ls="--", c="gray", label="base (MHA, no uptraining)")
    ax.set(xscale="log", xlabel="KV cache bytes / token (fp16)", ylabel="Gutenberg val perplexity",
           title="Quality vs KV cache size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "pareto.png", dpi=120)
    plt.close(fig)
    # Uptraining loss curves.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, folder in train_dirs.items():
        log = folder / "metrics.jsonl"
        if not log.is_file():
            continue
        pts = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        pts = [p for p in pts if "loss" in p and "step" in p]
        if pts:
            ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], label=name, lw=1)
    ax.set(xlabel="step", ylabel="training loss", title="Uptraining loss")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(plots / "uptrain_loss.png", dpi=120)
    plt.close(fig)

    results = {"settings": asdict(s), "rows": rows, "distillation_gap": gap, "init_comparison": inits,
               "bench": bench,
               "seconds": time.time() - started, "command": command,
               "git_commit": _git_commit(),
               "card": _card()}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, out / "results.json")
    report = render_report(results)
    (out / "report.md").write_text(report)
    return out / "report.md"


def init_comparison(s: Settings, by_run: dict) -> dict | None:
    """Gutenberg perplexity per conversion init and data order, their mean, and the best init per plan."""
    table = {}
    for plan in s.init_plans:
        per_init = {}
        for init in INITS:
            ppl = [by_run.get(run_name(plan, "lm", init, k), {}).get("gutenberg_ppl") for k in range(s.init_seeds)]
            ppl = [p for p in ppl if p is not None]
            if ppl:
                per_init[init] = {"ppl": ppl, "mean": sum(ppl) / len(ppl)}
        if per_init:
            table[plan] = {"inits": per_init, "best": min(per_init, key=lambda i: per_init[i]["mean"])}
    return table or None


def _fmt(v, pct=False, digits=2):
    if v is None:
        return "-"
    return f"{100 * v:.{digits}f}" if pct else (f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}")


def render_report(results: dict) -> str:
    s, rows = results["settings"], results["rows"]
    lines = ["# MLKV reproduction" + (" (smoke run: numbers are meaningless)" if s["smoke"] else ""), "",
             f"- card: {results['card']}", f"- time: {results['seconds'] / 60:.1f} min",
             f"- command: `{results['command']}`", f"- git commit: `{results['git_commit']}`",
             f"- base: {'converted from ' + s['base'] if s['base'] else 'pretrained here'}; hidden {s['hidden_size']}, "
             f"12 layers x 12 heads; {s['base_tokens']} base tokens, {s['uptrain_tokens']} uptraining tokens per run, "
             f"seq {s['seq_len']}; tasks limit {s['limit'] or 'none (full sets)'}", "",
             "| run | config | KV heads | KV B/token | Gutenberg ppl | WikiText word ppl | ARC-e | LAMBADA acc (ppl) "
             "| PIQA | SciQ | HellaSwag (norm) | avg of paper's 4 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['config']} ({r['structure']}) | {r['kv_heads']} | {r['kv_bytes_per_token']:,} | "
            f"{_fmt(r['gutenberg_ppl'])} | {_fmt(r['wikitext_word_ppl'])} | {_fmt(r['arc_easy_acc'], True)} | "
            f"{_fmt(r['lambada_acc'], True)} ({_fmt(r['lambada_ppl'], digits=1)}) | {_fmt(r['piqa_acc'], True)} | "
            f"{_fmt(r['sciq_acc'], True)} | {_fmt(r['hellaswag_acc_norm'], True)} | {_fmt(r['avg_paper4'], True)} |")
    gap = results["distillation_gap"]
    st = results["settings"]
    lines += ["", "## Distillation", "",
              f"`distill`: KL to the base's logits + {st.get('distill_hidden', 0.0):g} x the layer-wise hidden-state "
              f"distance to the base; every uptraining run at peak lr {st.get('uptrain_lr', 6e-4):g}, equal tokens.",
              ""]
    for ref_name, g in (gap or {}).items():
        head = (f"- Against {ref_name} (Gutenberg val ppl {g['reference_ppl']:.2f}): LM-uptrained MLKV-6 has "
                f"{g['lm_ppl']:.2f}, distilled MLKV-6 {g['distill_ppl']:.2f}; ")
        if g["fraction_closed"] is None:
            lines.append(head + "no gap to close (LM-uptrained MLKV-6 is not worse than the reference).")
        else:
            verb = "closes" if g["fraction_closed"] >= 0 else "widens it: a negative fraction,"
            lines.append(head + f"distillation {verb} {100 * g['fraction_closed']:.1f}% of the gap.")
    if not gap:
        lines.append("Not measured (MLKV-6 lm and distill runs are both needed).")
    if results.get("init_comparison"):
        lines += ["", "## Conversion inits (Gutenberg val ppl after equal LM uptraining; one value per data order)",
                  "", "| plan | mean | pairwise | first | best |", "| --- | --- | --- | --- | --- |"]
        for plan, t in results["init_comparison"].items():
            cells = [", ".join(f"{p:.2f}" for p in t["inits"][i]["ppl"]) + f" (mean {t['inits'][i]['mean']:.2f})"
                     if i in t["inits"] else "-" for i in INITS]
            lines.append(f"| {plan} | " + " | ".join(cells) + f" | {t['best']} |")
    lines += ["", "## Plots", "", "![Pareto](plots/pareto.png)", "", "![Uptraining loss](plots/uptrain_loss.png)"]
    bench = results.get("bench")
    if bench:
        meta = bench.get("meta", {})
        lines += ["", f"## Inference (mlkv engine, {meta.get('device_name', '?')}, {meta.get('dtype', '?')}, "
                      "the base's shape with random weights)", "",
                  "| config | KV B/token | decode ms/step b1 | b64 | max batch @ ctx "
                  f"{meta.get('settings', {}).get('context', '?')} | decode tokens/s at max batch |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for plan, r in bench.get("summary", {}).items():
            lines.append(f"| {plan} | {r.get('kv_bytes_per_token', '-'):,} | "
                         f"{_fmt(r.get('gen_b1_step_ms'), digits=3)} | "
                         f"{_fmt(r.get('gen_b64_step_ms'), digits=3)} | {_fmt(r.get('max_batch'))} | "
                         f"{_fmt(r.get('max_batch_decode_tok_s'), digits=0)}"
                         + (f" (at batch {r['max_batch_decode_batch']:,})"
                            if r.get("max_batch_decode_batch", r.get("max_batch")) != r.get("max_batch") else "")
                         + " |")
        if meta.get("errors"):
            # the first sentence of each (an allocator's OOM message runs to a paragraph; bench.json keeps it all)
            lines += ["", "Benchmark errors: " + "; ".join(re.split(r"(?<=[a-z0-9)])\. (?=[A-Z])", e)[0]
                                                         for e in meta["errors"])]
        if bench.get("plans"):
            skipped = [f"{r['plan']}: {', '.join(r['skipped'])}" for r in bench["plans"] if r.get("skipped")]
            if skipped:
                lines += ["", "Skipped: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


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


# ---- the command ------------------------------------------------------------------------------------------------
# Settings that change what the stages produce; a rerun into the same --out must keep them.
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
        path.write_text(json.dumps(mine, indent=2))


def canonical_plans(names: list[str]) -> list[str]:
    """User plan names spelled as the paper does (``mlkv-6`` -> ``MLKV-6``); only the paper's grid is accepted."""
    by_key = {p.lower(): p for p in PAPER_PRESETS}
    unknown = [n for n in names if n.lower() not in by_key]
    if unknown:
        raise ValueError(f"--plans {' '.join(unknown)}: mlkv reproduce runs the paper's configs, one of "
                         f"{', '.join(PAPER_PRESETS)}")
    return [by_key[n.lower()] for n in names]


def reproduce(s: Settings, command: str = "mlkv reproduce") -> Path:
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
        tmp = timing_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"earlier_seconds": earlier + time.time() - started}))
        os.replace(tmp, timing_path)
        if main_thread:
            signal.signal(signal.SIGTERM, on_term if on_term is not None else signal.SIG_DFL)
    _say(f"report: {report}")
    return report


def add_reproduce_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", default="runs/reproduce", help="output folder (a rerun skips finished stages)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of every stage (a test, not a result)")
    p.add_argument("--data-dir", default=None, help="shared data folder (default $MLKV_DATA or ../shared/data)")
    p.add_argument("--base", default=None, help="a local HF checkpoint to start from instead of pretraining")
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--base-tokens", default=None, help="pretraining token budget, e.g. 50M")
    p.add_argument("--uptrain-tokens", default=None, help="uptraining token budget per run, e.g. 5M")
    p.add_argument("--train-shards", nargs="*", default=None, help="Gutenberg shards to train on")
    p.add_argument("--tasks", nargs="*", default=None, help=f"zero-shot tasks (default {' '.join(DEFAULT_TASKS)})")
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: full sets)")
    p.add_argument("--ppl-limit", type=int, default=None, help="documents per perplexity set (default: all)")
    p.add_argument("--plans", nargs="*", default=None, help="subset of the paper's configs")
    p.add_argument("--no-bench", action="store_true", help="skip the inference benchmark")
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--eval-workers", type=int, default=None,
                   help="models evaluated at once, each in its own process (default min(8, cores/2) on CUDA, 1 "
                        "on CPU)")
    p.add_argument("--init-seeds", type=int, default=None,
                   help="data orders per conversion init in the init comparison (default 1)")
    p.add_argument("--uptrain-lr", type=float, default=None,
                   help="peak learning rate of every uptraining run (default 6e-4, the paper's)")
    p.add_argument("--distill-hidden", type=float, default=None,
                   help="weight of the layer-wise hidden-state distance in the distill runs (default 10; 0 = KL "
                        "only, as runs 1-3)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--device", default=None)
    return p


def settings_from_args(args) -> Settings:
    overrides = dict(data_dir=args.data_dir, base=args.base, hidden_size=args.hidden_size, seq_len=args.seq_len,
                     micro_batch_size=args.micro_batch_size, base_tokens=args.base_tokens,
                     uptrain_tokens=args.uptrain_tokens, train_shards=args.train_shards, tasks=args.tasks,
                     limit=args.limit, ppl_limit=args.ppl_limit, plans=args.plans, device=args.device,
                     eval_batch_size=args.eval_batch_size, eval_workers=args.eval_workers,
                     init_seeds=args.init_seeds, uptrain_lr=args.uptrain_lr, distill_hidden=args.distill_hidden)
    if args.no_bench:
        overrides["bench"] = False
    if args.compile:
        overrides["compile"] = True
    if args.plans:
        overrides["plans"] = canonical_plans(args.plans)
    if args.smoke:
        s = Settings.smoke_settings(args.out, **overrides)
    else:
        s = Settings(out=args.out, **{k: v for k, v in overrides.items() if v is not None})
    s.distill_plans = [p for p in s.distill_plans if p in s.plans]
    s.init_plans = [p for p in s.init_plans if p in s.plans]
    if s.uptrain_lr <= 0:  # checked here, not minutes later when the first uptraining starts
        raise ValueError(f"--uptrain-lr must be positive, got {s.uptrain_lr}")
    if s.distill_hidden < 0:
        raise ValueError(f"--distill-hidden must be >= 0, got {s.distill_hidden}")
    return s


def run_reproduce_command(args) -> int:
    """Run the MLKV paper's experiment end to end on the Gutenberg corpus: pretrain (or --base) an MHA model,
    convert it to the 9 paper configs, uptrain each (lm, and distill for MLKV), evaluate perplexity and zero-shot
    tasks, benchmark inference, and write report.md, results.json and plots. --smoke runs it all tiny on CPU."""
    import sys

    s = settings_from_args(args)
    report = reproduce(s, command="mlkv " + " ".join(sys.argv[1:]))
    results = json.loads((Path(s.out) / "results.json").read_text())
    print(report.read_text())
    print(json.dumps({"report": str(report), "rows": len(results["rows"]), "seconds": round(results["seconds"], 1),
                      "distillation_gap": results["distillation_gap"]}))
    return 0
