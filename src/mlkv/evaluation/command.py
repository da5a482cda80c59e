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
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlkv.devices import check_device
from mlkv.errors import UsageError, require_extra
from mlkv.evaluation.model_info import describe_model, model_device
from mlkv.evaluation.perplexity import PERPLEXITY_FILES, perplexity_file, resolve_perplexity_path
from mlkv.evaluation.results import RESULTS_FILE, compare, compare_rows, markdown_table, save_results, summary
from mlkv.evaluation.task_checks import check_user_tasks
from mlkv.evaluation.task_selection import DEFAULT_TASKS, SUPPORTED_TASKS, TaskSelection, select_tasks
from mlkv.evaluation.tasks import check_task_files, run_tasks
from mlkv.model.loading import load_model
from mlkv.settings import add_arguments, field_docs, from_args, setting

__all__ = ["EvalSettings", "add_eval_arguments", "evaluate_checkpoint", "run_eval_command"]


@dataclass
class EvalSettings:
    """What ``mlkv eval`` evaluates and how (one flag per field, except the positional ``model``)."""

    model: str | None = setting(None, cli=False)
    """checkpoint directory (any AutoModelForCausalLM directory)"""
    tasks: list[str] | None = setting(None, metavar="TASK", group="what to evaluate")
    """zero-shot tasks, space or comma separated: names (listed below), or your own task as a task YAML file or a
    folder of them in lm-eval's format (all its tasks run); default without --perplexity: the paper's four tasks
    and HellaSwag"""
    include_path: list[str] = setting(default_factory=list, aliases=("--include_path",), metavar="DIR",
                                      group="what to evaluate")
    """folders of your own task YAMLs (lm-eval's --include_path) whose tasks --tasks names"""
    perplexity: list[str] = setting(default_factory=list, metavar="FILE", group="what to evaluate")
    """text files to compute perplexity on: paths (.raw WikiText, .txt, .jsonl[.xz]) or a short name of a shared
    file (listed below)"""
    limit: int | None = setting(None, group="what to evaluate")
    """evaluate only the first N documents of each task (questions) and of each perplexity file (documents:
    WikiText-2 articles; gutenberg: whole books, so bound its work with --max-tokens instead)"""
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
    """token budget per perplexity file: the token-level pass scores its first N tokens and the document-level
    (word/byte) pass at most N tokens of whole documents, the last one cut at the budget; documents past it are not
    read"""
    bootstrap_iters: int = setting(1000, group="scoring")
    """bootstrap iterations for the stderr of LAMBADA perplexity"""
    log_samples: bool = setting(False, group="output")
    """keep per-sample outputs in the results JSON"""
    output: str | None = setting(None, group="output")
    """results JSON (default: DIR/eval_results.json; DIR/eval_results_limitN.json with --limit)"""


#: ``mlkv eval --help``'s example of a task of your own (the README shows the same).
CUSTOM_TASK_EXAMPLE = """\
your own task, on local files: a task YAML in lm-eval's format, or a folder of them. For a file
/data/capitals.jsonl with lines like {"country": "France", "choices": ["Paris", "Lyon"], "answer": 0},
capitals.yaml:
  task: capitals
  dataset_path: json
  dataset_kwargs:
    data_files: {test: /data/capitals.jsonl}
  test_split: test
  output_type: multiple_choice
  doc_to_text: "Q: What is the capital of {{country}}?\\nA:"
  doc_to_choice: choices
  doc_to_target: answer
  metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]
then: mlkv eval runs/mlkv6-up --tasks capitals.yaml piqa
(relative data_files paths start from the working directory; the shipped tasks stay available by name)"""


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``mlkv eval DIR [--perplexity FILE...] [--tasks ...] [--limit N] [--compare ...]``; the help's
    epilog (after any the parser has) lists the tasks and shows a task of your own."""
    parser.add_argument("model", nargs="?", help=field_docs(EvalSettings)["model"])
    add_arguments(parser, EvalSettings)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the epilog's YAML keeps its lines
    lists = [f"default tasks: {', '.join(DEFAULT_TASKS)}",
             f"supported with local data: {', '.join(SUPPORTED_TASKS)} (any lm-eval task with --data-source hub)",
             f"perplexity short names: {', '.join(PERPLEXITY_FILES)} (gutenberg's documents are whole books: bound "
             f"the work with --max-tokens, e.g. --perplexity gutenberg --max-tokens 200000)"]
    ours = "\n".join(textwrap.fill(line, 100, subsequent_indent="  ") for line in lists) + "\n\n" + CUSTOM_TASK_EXAMPLE
    parser.epilog = f"{parser.epilog}\n\n{ours}" if parser.epilog else ours
    return parser


def _task_selection(s: EvalSettings) -> TaskSelection | None:
    """The tasks to run, checked before the model loads: the given ones (names, task YAML files, folders), else the
    default tasks unless only perplexity was asked for."""
    if s.tasks:
        return select_tasks(s.tasks, s.data_source, s.include_path, data_dir=s.data_dir)
    if s.include_path:
        raise UsageError("--include-path names folders of task YAMLs: give the tasks to run from them with --tasks")
    return None if s.perplexity else select_tasks(DEFAULT_TASKS, s.data_source, data_dir=s.data_dir)


def evaluate_checkpoint(s: EvalSettings) -> dict[str, Any]:
    """Load ``s.model`` once, compute the requested perplexities and tasks, and return the merged results. Every
    flag, task YAML and data file is checked first."""
    check_device(s.device)
    if s.limit is not None and s.limit < 1:
        raise UsageError(f"--limit must be positive, got {s.limit}")
    if s.max_tokens is not None and s.max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2 (a token is scored given the one before it), got "
                         f"{s.max_tokens}")
    tasks = _task_selection(s)
    ppl_paths = {str(name): resolve_perplexity_path(name, s.data_dir) for name in s.perplexity}
    if tasks is not None and s.data_source == "local":
        check_task_files(tasks.shipped, s.data_dir)
    if tasks is not None and tasks.user_names:
        check_user_tasks(tasks)
    model, tokenizer = load_model(s.model, s.device, s.dtype, s.tokenizer)
    if tasks is not None:
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
