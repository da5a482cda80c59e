"""Zero-shot tasks through the real lm-evaluation-harness, used as a library.

``run_tasks`` runs ``simple_evaluate`` on a ``BatchedHFLM`` (``mlkv.evaluation.harness``) wrapping the model, with a
``TaskManager`` over ``mlkv/evaluation/task_configs`` -- copies of the harness's own task YAMLs (same prompts and
metrics, same task names) that read the shared local files (see ``mlkv.evaluation.task_configs.converters``).
``data_source="hub"`` uses the harness's built-in tasks and hub datasets instead (an unreachable Hub raises
``HubUnreachableError``, which points to the local data). Tasks of the user's own, task YAML files and folders of
them, run beside either (``mlkv.evaluation.task_selection`` says how a ``tasks`` list is read). The harness's own
log is kept quiet (``mlkv.evaluation.harness_log``).

``request_cache=DIR`` keeps the harness's built requests (prompts and continuations, the same for every model) in a
subfolder of ``DIR`` named by a fingerprint of the task YAMLs, the task data files and the harness's version; later
full-set evaluations load them instead of building them again (43.2 s of host time per model, profiled, for the
paper's five tasks; ``benchmarks/eval_host_cost.py``). The harness stores them with ``dill`` (a pickle): point it
only at a folder of your own.

The shipped task lists and name checks import nothing heavy; lm-eval (the ``eval`` extra) is imported when a task
runs or a task folder is indexed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlkv.data.paths import data_file, default_data_dir
from mlkv.errors import UsageError, require_extra
from mlkv.evaluation.harness_log import quiet_harness
from mlkv.evaluation.model_info import describe_model, model_device
from mlkv.evaluation.task_checks import check_user_tasks
from mlkv.evaluation.task_configs import TASK_FILES, TASKS_DIR
from mlkv.evaluation.task_selection import (DEFAULT_TASKS, PAPER_TASKS, SUPPORTED_TASKS, TaskSelection,
                                            UnknownTaskError, check_tasks, select_tasks, task_manager)
from mlkv.model.loading import load_model

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_TASKS", "PAPER_TASKS", "SUPPORTED_TASKS", "HubUnreachableError", "TaskSelection",
           "UnknownTaskError", "build_request_cache", "check_task_files", "check_tasks", "request_cache_dir",
           "run_tasks", "select_tasks", "task_manager"]


class HubUnreachableError(UsageError):
    """The Hugging Face Hub could not be reached for a task's dataset; the message says what to use offline."""


def check_task_files(tasks: Sequence[str], data_dir: str | os.PathLike | None = None) -> None:
    """Raise ``DataFileNotFoundError`` (naming the file, --data-dir and $MLKV_DATA) for a missing file of a shipped
    task (other names read their own data and are skipped)."""
    for name in tasks:
        for relative in TASK_FILES.get(name, ()):
            data_file(data_dir, relative)


def request_cache_dir(root: str | os.PathLike, names: Sequence[str], data_dir: str | os.PathLike | None) -> Path:
    """The folder under ``root`` for the harness's request cache of local tasks ``names``: its name is a fingerprint
    of everything the built requests depend on (the task YAMLs and the converters that load their documents, the
    data files' paths, sizes and modification times, the harness's and ``datasets``' versions), because the
    harness's own cache key is only the task name. Cached requests are matched to freshly loaded documents by
    position, so a stale cache would score old prompts against new labels."""
    lm_eval = require_extra("lm_eval", "zero-shot tasks")
    datasets = require_extra("datasets", "zero-shot tasks")
    parts = [getattr(lm_eval, "__version__", ""), datasets.__version__]
    parts += [path.read_text() for path in sorted(TASKS_DIR.glob("*.py"))]
    for name in sorted(names):
        parts.append((TASKS_DIR / f"{name}.yaml").read_text())
        for rel in TASK_FILES.get(name, ()):
            path = data_file(data_dir, rel)
            stat = path.stat()
            parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return Path(root) / f"requests-{digest}"


def build_request_cache(tasks: str | Sequence[str], root: str | os.PathLike,
                        data_dir: str | os.PathLike | None = None) -> Path:
    """Build every document's requests of the local ``tasks`` once and cache them under ``root`` (see
    ``request_cache_dir``), so that evaluations run in parallel afterwards all load them; returns the folder.

    It runs ``simple_evaluate`` itself, with a model that answers every request with a constant, so that the cache
    keys (which name the shots, the fewshot-as-multiturn flag and more) are exactly those of a real evaluation."""
    lm_eval = require_extra("lm_eval", "zero-shot tasks")
    from lm_eval.api.model import LM

    class _RequestsOnly(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [0.0] * len(requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return [""] * len(requests)

    manager = task_manager("local", data_dir)
    selection = select_tasks(tasks, "local", manager=manager)
    if selection.user_names:
        raise UsageError(f"the request cache is for mlkv's shipped tasks ({', '.join(SUPPORTED_TASKS)}), not for "
                         f"your own task YAMLs ({', '.join(sorted(selection.user_names))})")
    names = list(selection.names)
    check_task_files(names, data_dir)
    folder = request_cache_dir(root, names, data_dir)
    with _request_cache_path(folder), quiet_harness():
        lm_eval.simple_evaluate(model=_RequestsOnly(), tasks=names, task_manager=manager, bootstrap_iters=0,
                                cache_requests=True)
    return folder


@contextlib.contextmanager
def _request_cache_path(folder: Path):
    """lm-eval's request cache is one module-level folder: point it at ``folder`` for a while, then back."""
    import lm_eval.caching.cache as request_cache

    old, request_cache.PATH = request_cache.PATH, str(folder)
    try:
        yield
    finally:
        request_cache.PATH = old


def run_tasks(model, tasks: str | Sequence[str] | TaskSelection = DEFAULT_TASKS, limit: int | None = None,
              batch_size: int | str = 8, device: str | None = None, data_dir: str | os.PathLike | None = None,
              tokenizer=None, data_source: str = "local", dtype: str | torch.dtype | None = None,
              max_length: int | None = None, bootstrap_iters: int = 1000, log_samples: bool = False,
              request_cache: str | os.PathLike | None = None,
              include_path: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """Zero-shot evaluation with lm-evaluation-harness; returns the harness's output plus an ``"mlkv"`` section.

    ``model`` is a checkpoint directory (loaded with ``load_model`` on ``device``) or a loaded model (used where it
    is; ``tokenizer`` then is a tokenizer or its directory, default ``model.name_or_path``). ``tasks``: names, task
    YAML files and folders of them, or a ``TaskSelection`` already made of them (``mlkv.evaluation.task_selection``);
    ``include_path``: more folders of task YAMLs whose tasks ``tasks`` may name (the harness's include path).
    ``limit`` evaluates the first ``limit`` documents of each task. ``bootstrap_iters`` is for the stderr of
    non-mean metrics (LAMBADA perplexity; the harness's CLI default is 100000). Task names and data files are
    checked before anything is loaded. ``request_cache``: a folder for the harness's request cache (shipped local
    tasks, full sets only: with ``limit`` the harness would build every document to fill it), see the module doc.
    The harness's own log is quiet (``mlkv.evaluation.harness_log``); an unreachable Hub raises
    ``HubUnreachableError``.
    """
    lm_eval = require_extra("lm_eval", "zero-shot tasks")
    from mlkv.evaluation.harness import BatchedHFLM

    with quiet_harness():
        selection = tasks if isinstance(tasks, TaskSelection) else select_tasks(tasks, data_source, include_path,
                                                                               data_dir)
        manager = selection.manager or task_manager(data_source, data_dir, selection.include_paths)
        if data_source == "local":
            check_task_files(selection.shipped, data_dir)
        if selection.user_names:
            check_user_tasks(selection)
        start = time.time()
        source = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", None)
        model, tokenizer = _model_and_tokenizer(model, tokenizer, device, dtype)
        lm = BatchedHFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                         max_length=max_length)
        cached = request_cache is not None and limit is None and data_source == "local" and not selection.user_names
        cache_folder = request_cache_dir(request_cache, selection.names, data_dir) if cached else None
        with _request_cache_path(cache_folder) if cached else contextlib.nullcontext(), _hub_errors(selection):
            output = lm_eval.simple_evaluate(
                model=lm, tasks=list(selection.specs), limit=limit, task_manager=manager,
                bootstrap_iters=bootstrap_iters, log_samples=log_samples, cache_requests=cached,
            )
    output = dict(output)
    output["mlkv"] = {
        **describe_model(model, source),
        "tasks": list(selection.names),
        "task_yamls": {n: s for n, s in zip(selection.names, selection.specs) if n != s} or None,
        "include_path": [str(p) for p in selection.include_paths] or None,
        "limit": limit,
        "data_source": data_source,
        "data_dir": str(default_data_dir(data_dir).resolve()) if data_source == "local" else None,
        "batch_size": batch_size,
        "device": str(model_device(model)),
        "max_length": lm.max_length,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "request_cache": str(cache_folder) if cached else None,
        "seconds": round(time.time() - start, 1),
    }
    return output


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub request raises: ``datasets``' and ``huggingface_hub``'s ``ConnectionError`` (built in),
    and ``requests``' own (an ``OSError``), if ``requests`` is installed."""
    try:
        from requests.exceptions import ConnectionError as RequestsConnectionError
    except ImportError:
        return (ConnectionError,)
    return ConnectionError, RequestsConnectionError


@contextlib.contextmanager
def _hub_errors(selection: TaskSelection):
    """An unreachable Hub while the harness loads task data becomes ``HubUnreachableError``, saying what to do."""
    try:
        yield
    except _connection_errors() as exc:
        if selection.user_names:
            hint = ("a task YAML of yours reads a Hub dataset (dataset_path): point it at local files instead, e.g. "
                    "dataset_path: json with dataset_kwargs: {data_files: {test: /path/to/data.jsonl}}")
        else:
            hint = (f"use the local copies of the task data: --data-source local (the default; tasks "
                    f"{', '.join(SUPPORTED_TASKS)}; files under --data-dir / $MLKV_DATA)")
        raise HubUnreachableError(f"the Hugging Face Hub is unreachable ({exc}); {hint}") from exc


def _model_and_tokenizer(model, tokenizer, device: str | None, dtype: str | torch.dtype | None):
    """``run_tasks``'s model: a checkpoint directory loaded with its tokenizer (``mlkv.model.loading.load_model``), or
    a loaded model moved to ``device`` if given, with ``tokenizer`` (an object, or a directory; default the model's
    ``name_or_path``)."""
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, device, dtype, tokenizer)
    if device is not None:
        model = model.to(device)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        source = tokenizer or getattr(model, "name_or_path", None)
        if not source:
            raise UsageError("run_tasks needs a tokenizer for a model object without name_or_path")
        tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer
