"""The evaluation stage of ``mlkv reproduce``: every model's perplexities and zero-shot tasks, several models at
once in separate processes on a GPU (the harness's per-request work is host-bound, so one GPU serves several).

``eval_one`` scores one model into its JSON file; ``stage_eval`` schedules them (a model whose file exists is done)
and retries alone a model that failed beside the others (e.g. out of memory).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlkv.reproduce.config import Settings
from mlkv.reproduce.log import say
from mlkv.reproduce.runs import task_runs

__all__ = ["eval_one", "eval_dtype", "card_name", "gutenberg_perplexity", "eval_workers", "stage_eval"]


def eval_one(s: Settings, data: Path, name: str, folder: Path, path: Path) -> None:
    """Evaluate one model and write ``path``: perplexities always, the zero-shot tasks for ``task_runs`` (not the
    init comparison's extra runs). Standard errors of non-mean metrics (LAMBADA perplexity) use 100 bootstrap
    resamples."""
    from mlkv.model.loading import load_model
    from mlkv.evaluation.perplexity import perplexity_file
    from mlkv.evaluation.results import save_results
    from mlkv.evaluation.tasks import run_tasks

    model, tok = load_model(folder, s.device, eval_dtype(s))
    tasks = s.tasks if name in task_runs(s) else []
    res = run_tasks(model, tasks, limit=s.limit, batch_size=s.eval_batch_size, data_dir=data, tokenizer=tok,
                    bootstrap_iters=0 if s.smoke else 100, request_cache=_request_cache(s)) if tasks else {"mlkv": {}}
    res["mlkv"]["perplexity"] = {
        "gutenberg_val": gutenberg_perplexity(s, data, model, tok),
        "wikitext2": perplexity_file(model, tok, data / "eval" / "wikitext2" / "wiki.test.raw",
                                     max_length=s.seq_len, batch_size=8, limit=s.ppl_limit,
                                     max_tokens=s.ppl_max_tokens if s.smoke else None,
                                     document_level=s.wikitext_words),
    }
    res["mlkv"]["evaluated_on"] = {"card": card_name(s.device), "dtype": str(model.dtype).removeprefix("torch.")}
    save_results(res, path)


def eval_dtype(s: Settings) -> str:
    """``--eval-dtype``, else bfloat16 on CUDA and float32 elsewhere. Checkpoints are saved in float32 (training's
    master weights); evaluated as they are, on an H200 without TF32, each of 11 processes sharing the card scored
    perplexity windows at about 17.7k tokens/s and the four perplexity-only evaluations of SmolLM2's conversions
    took over five minutes (docs/results/smollm2-h200-partial). The card's bf16 matrix rate is about 15x its plain
    fp32 rate."""
    if s.eval_dtype:
        return s.eval_dtype
    device = s.device or ("cuda" if _cuda() else "cpu")
    return "bfloat16" if device.startswith("cuda") else "float32"


def card_name(device: str | None = None) -> str:
    """The GPU that ``device`` (default: CUDA when available) names, or ``CPU``."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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


