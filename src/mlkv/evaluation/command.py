"""``mlkv eval``: evaluate a checkpoint (zero-shot tasks, perplexity) and compare results across checkpoints.

The flags are the fields of ``EvalSettings`` (``mlkv.settings``: each field's docstring is its help). Importing this
module needs no optional package, so ``mlkv eval --help`` works with the base install; evaluating a checkpoint needs
lm-evaluation-harness (``pip install 'mlkv[eval]'``), which ``run_eval_command`` checks first. ``--compare`` alone
only reads result files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlkv.checkpoints import load_model
from mlkv.errors import UsageError, require_extra
from mlkv.evaluation.model_info import describe_model, model_device
from mlkv.evaluation.perplexity import PERPLEXITY_FILES, perplexity_file, resolve_perplexity_path
from mlkv.evaluation.results import RESULTS_FILE, compare, compare_rows, markdown_table, save_results, summary
from mlkv.evaluation.tasks import DEFAULT_TASKS, SUPPORTED_TASKS, check_task_files, check_tasks, run_tasks
from mlkv.settings import add_arguments, field_docs, from_args, setting

__all__ = ["EvalSettings", "add_eval_arguments", "evaluate_checkpoint", "run_eval_command"]


@dataclass
class EvalSettings:
    """What ``mlkv eval`` evaluates and how (one flag per field, except the positional ``model``)."""

    model: str | None = setting(None, cli=False)
    """checkpoint directory (any AutoModelForCausalLM directory)"""
    tasks: list[str] | None = setting(None, group="what to evaluate")
    """zero-shot tasks, space or comma separated (default without --perplexity: the paper's four tasks and
    HellaSwag; the task names are listed below)"""
    perplexity: list[str] = setting(default_factory=list, metavar="FILE", group="what to evaluate")
    """text files to compute perplexity on: paths (.raw WikiText, .txt, .jsonl[.xz]) or a short name of a shared
    file (listed below)"""
    limit: int | None = setting(None, group="what to evaluate")
    """evaluate only the first N documents of each task / perplexity file"""
    compare: list[str] | None = setting(None, metavar="RESULTS", group="what to evaluate")
    """print the paper's table across these results files / checkpoint directories (the evaluated checkpoint, if
    any, is added)"""
    batch_size: int = setting(8, group="model")
    """sequences per forward pass, for the tasks and the perplexity windows"""
    device: str | None = setting(None, group="model")
    """torch device (default: cuda if available, else cpu)"""
    dtype: str | None = setting(None, choices=["auto", "float32", "float16", "bfloat16"], group="model")
    """model dtype (default: float32 on CPU, the checkpoint's dtype on GPU)"""
    tokenizer: str | None = setting(None, group="model")
    """tokenizer directory (default: the checkpoint directory)"""
    data_dir: str | None = setting(None, group="data")
    """shared data folder (default: $MLKV_DATA, else ../shared/data)"""
    data_source: str = setting("local", choices=["local", "hub"], group="data")
    """task data: the local copies under --data-dir, or the harness's hub datasets"""
    max_length: int | None = setting(None, group="scoring")
    """context length for perplexity windows and the harness (default: the model's)"""
    stride: int | None = setting(None, group="scoring")
    """sliding-window stride for token-level perplexity (default: max_length / 2)"""
    max_tokens: int | None = setting(None, group="scoring")
    """score only the first N tokens of each file in the token-level perplexity"""
    bootstrap_iters: int = setting(1000, group="scoring")
    """bootstrap iterations for the stderr of LAMBADA perplexity"""
    log_samples: bool = setting(False, group="output")
    """keep per-sample outputs in the results JSON"""
    output: str | None = setting(None, group="output")
    """results JSON (default: DIR/eval_results.json; DIR/eval_results_limitN.json with --limit)"""


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``mlkv eval DIR [--perplexity FILE...] [--tasks ...] [--limit N] [--compare ...]``."""
    parser.add_argument("model", nargs="?", help=field_docs(EvalSettings)["model"])
    add_arguments(parser, EvalSettings)
    parser.epilog = (f"default tasks: {', '.join(DEFAULT_TASKS)}; supported with local data: "
                     f"{', '.join(SUPPORTED_TASKS)} (any lm-eval task with --data-source hub). Perplexity short "
                     f"names: {', '.join(PERPLEXITY_FILES)}.")
    return parser


def _task_names(s: EvalSettings) -> list[str]:
    """The tasks to run: the given ones (local names checked here; hub names by ``run_tasks``, against the harness's
    task index), else the default tasks unless only perplexity was asked for."""
    if s.tasks:
        return check_tasks(s.tasks) if s.data_source == "local" else list(s.tasks)
    return [] if s.perplexity else list(DEFAULT_TASKS)


def evaluate_checkpoint(s: EvalSettings) -> dict[str, Any]:
    """Load ``s.model`` once, compute the requested perplexities and tasks, and return the merged results."""
    if s.limit is not None and s.limit < 1:
        raise UsageError(f"--limit must be positive, got {s.limit}")
    tasks = _task_names(s)
    ppl_paths = {str(name): resolve_perplexity_path(name, s.data_dir) for name in s.perplexity}
    if s.data_source == "local":
        check_task_files(tasks, s.data_dir)
    model, tokenizer = load_model(s.model, s.device, s.dtype, s.tokenizer)
    if tasks:
        results = run_tasks(model, tasks, limit=s.limit, batch_size=s.batch_size, data_dir=s.data_dir,
                            tokenizer=tokenizer, data_source=s.data_source, max_length=s.max_length,
                            bootstrap_iters=s.bootstrap_iters, log_samples=s.log_samples)
    else:
        results = {"mlkv": {**describe_model(model, s.model), "tasks": [], "limit": s.limit,
                            "device": str(model_device(model))}}
    results["mlkv"]["perplexity"] = {
        name: perplexity_file(model, tokenizer, path, s.max_length, s.stride, s.batch_size, s.limit, s.max_tokens)
        for name, path in ppl_paths.items()
    }
    return results


def _evaluate_and_save(s: EvalSettings) -> tuple[dict[str, Any], Path]:
    """``evaluate_checkpoint``, its harness output sent to stderr, saved to ``--output`` (or beside the model)."""
    require_extra("lm_eval", "mlkv eval")  # before anything is loaded: the message names the extra to install
    require_extra("datasets", "mlkv eval")
    with contextlib.redirect_stdout(sys.stderr):  # stdout: only the tables and the JSON line
        results = evaluate_checkpoint(s)
    output = Path(s.output) if s.output else Path(s.model) / (
        f"eval_results_limit{s.limit}.json" if s.limit else RESULTS_FILE)
    results["mlkv"]["results_path"] = str(output)
    save_results(results, output)
    return results, output


def run_eval_command(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint (zero-shot tasks through lm-evaluation-harness on local copies of the data, perplexity
    of text files) and/or compare saved results in the paper's table. Prints markdown, then one JSON line.

    Returns the exit code: 0, or 2 after printing the error for a missing data file or package, an unknown task or
    arguments that do not fit together.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = from_args(EvalSettings, args)
    try:
        if s.model is None and not s.compare:
            raise UsageError("give a checkpoint directory to evaluate, or --compare RESULTS...")
        line: dict[str, Any] = {}
        compared = list(s.compare or [])
        if s.model is not None:
            results, output = _evaluate_and_save(s)
            print(markdown_table(results))
            line = summary(results)
            if compared:
                compared.append(output)
        if compared:
            if s.model is not None:
                print()
            print(compare(compared))
            line["compare"] = compare_rows(compared)
    except (UsageError, FileNotFoundError) as exc:  # data files, tasks, extras, flags that do not fit
        print(f"mlkv eval: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(line, default=str))
    return 0
