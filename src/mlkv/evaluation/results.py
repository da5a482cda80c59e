"""Evaluation results: the JSON files ``mlkv eval`` writes, and the tables made from them.

A result is the harness's output dict plus an ``"mlkv"`` section (model, KV cache size, perplexities, ...).
``save_results`` writes one atomically, ``load_results`` reads one back (a file, or a checkpoint folder holding
``eval_results.json``), ``markdown_table`` renders one result, and ``compare`` renders the MLKV paper's table across
checkpoints. ``average_accuracy`` is the paper's "avg of 4" (``mlkv reproduce``'s report uses it too).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlkv import tables
from mlkv.evaluation.task_selection import PAPER_TASKS
from mlkv.files import atomic_json

__all__ = ["PAPER_COLUMNS", "RESULTS_FILE", "TASK_COLUMNS", "average_accuracy", "column_header", "column_key",
           "column_metric", "column_value", "compare", "compare_rows", "load_results", "markdown_table",
           "save_results", "summary", "task_metric"]

#: The one metric each task's column shows in a table with a column per task (``compare``, and ``mlkv reproduce``'s
#: report through ``column_metric`` / ``column_header`` / ``column_value``), and the column's header, which names it:
#: accuracy for the paper's four tasks (the paper's "avg of 4" is their mean), length-normalised accuracy for
#: HellaSwag (the metric it is usually reported in). Other tasks show ``acc``.
TASK_COLUMNS: dict[str, tuple[str, str]] = {
    "arc_easy": ("acc", "ARC-e acc"),
    "lambada_openai": ("acc", "LAMBADA acc (ppl)"),
    "piqa": ("acc", "PIQA acc"),
    "sciq": ("acc", "SciQ acc"),
    "hellaswag": ("acc_norm", "HellaSwag acc_norm"),
}
#: The tasks of ``compare``'s columns, in order.
PAPER_COLUMNS: tuple[str, ...] = tuple(TASK_COLUMNS)
#: File name of a checkpoint's results inside its directory.
RESULTS_FILE = "eval_results.json"


# ---- files ----------------------------------------------------------------------------------------------------------
def save_results(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``results`` as JSON atomically (``mlkv.files.atomic_json``: numpy scalars and sets converted)."""
    return atomic_json(path, results)


def load_results(path_or_dir: str | os.PathLike) -> dict[str, Any]:
    """Results saved by ``save_results``: a JSON file, or a checkpoint directory holding ``eval_results.json``."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation results at {path} (run `mlkv eval` on the checkpoint first)")
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    results.setdefault("mlkv", {}).setdefault("results_path", str(path))
    return results


# ---- numbers --------------------------------------------------------------------------------------------------------
def task_metric(results: dict[str, Any], task: str, metric: str) -> float | None:
    """A task's metric (``"acc"``, ``"acc_norm"``, ``"perplexity"``, ...) without a filter, or None if missing."""
    value = results.get("results", {}).get(task, {}).get(f"{metric},none")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def column_metric(task: str) -> str:
    """The metric of ``task``'s column (``TASK_COLUMNS``; ``acc`` for a task not listed there)."""
    return TASK_COLUMNS.get(task, ("acc", ""))[0]


def column_header(task: str) -> str:
    """The header of ``task``'s column: its short name and metric, e.g. ``HellaSwag acc_norm``."""
    return TASK_COLUMNS[task][1] if task in TASK_COLUMNS else f"{task} {column_metric(task)}"


def column_key(task: str) -> str:
    """The key of ``task``'s column in JSON rows (``compare_rows``), naming the metric: ``hellaswag_acc_norm``."""
    return f"{task}_{column_metric(task)}"


def column_value(results: dict[str, Any], task: str) -> float | None:
    """The value in ``task``'s column: ``task_metric`` of ``column_metric(task)``."""
    return task_metric(results, task, column_metric(task))


def average_accuracy(results: dict[str, Any]) -> float | None:
    """The MLKV paper's "avg of 4": mean accuracy over ``PAPER_TASKS``; None unless all four were evaluated."""
    accs = [task_metric(results, task, "acc") for task in PAPER_TASKS]
    return sum(accs) / len(accs) if all(a is not None for a in accs) else None


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The compact form ``mlkv eval`` prints as its last line: per-task metrics, perplexities, KV bytes/token."""
    metrics = {
        task: {k.partition(",")[0]: v for k, v in values.items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
        for task, values in results.get("results", {}).items()
    }
    info = results.get("mlkv", {})
    ppl = {}
    for name, entry in info.get("perplexity", {}).items():
        ppl[name] = {"token_perplexity": entry["token_level"]["perplexity"]}
        if "document_level" in entry:
            ppl[name].update({k: entry["document_level"][k]
                              for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")})
    return {"model": info.get("model"), "kv_bytes_per_token": info.get("kv_cache", {}).get("bytes_per_token"),
            "results_path": info.get("results_path"), "tasks": metrics, "perplexity": ppl}


# ---- one result as markdown -----------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    return tables.fmt(value, ".4f")


def _task_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    n_samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        n = n_samples.get(task, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append([task, metric, _cell(value), _cell(stderr), _cell(n)])
    return rows


def _perplexity_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, entry in results.get("mlkv", {}).get("perplexity", {}).items():
        token = entry.get("token_level", {})
        label = f"{name} (ppl)"
        rows.append([label, f"token_perplexity (len {token.get('max_length')}, stride {token.get('stride')})",
                     _cell(token.get("perplexity")), tables.MISSING, _cell(token.get("scored_tokens"))])
        doc = entry.get("document_level")
        if doc:
            for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
                rows.append([label, metric, _cell(doc[metric]), tables.MISSING, _cell(doc["documents"])])
    return rows


def markdown_table(results: dict[str, Any]) -> str:
    """One checkpoint's results as markdown: every task metric (with stderr and sample count) and perplexity."""
    info = results.get("mlkv", {})
    kv = info.get("kv_cache", {})
    title = f"**{info.get('name', 'model')}**"
    if kv:
        title += f" — KV {kv.get('structure')} ({kv.get('bytes_per_token'):,} bytes/token, {kv.get('dtype')})"
    if info.get("limit"):
        title += f" — limit {info['limit']} per task"
    rows = _task_rows(results) + _perplexity_rows(results)
    return title + "\n\n" + tables.markdown_table(rows, ["task", "metric", "value", "± stderr", "n"])


# ---- the paper's table across checkpoints ---------------------------------------------------------------------------
def compare_rows(paths_or_dirs: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per results file / checkpoint directory: config, KV bytes/token, each column's metric (keys by
    ``column_key``: ``piqa_acc``, ``hellaswag_acc_norm``, ...), LAMBADA ppl, the paper's avg of 4."""
    rows = []
    for item in paths_or_dirs:
        results = load_results(item)
        info = results.get("mlkv", {})
        row: dict[str, Any] = {
            "config": info.get("name") or Path(item).stem,
            "structure": info.get("kv_cache", {}).get("structure"),
            "kv_bytes_per_token": info.get("kv_cache", {}).get("bytes_per_token"),
            "limit": info.get("limit"),
            "path": info.get("results_path"),
        }
        for task in PAPER_COLUMNS:
            row[column_key(task)] = column_value(results, task)
        row["lambada_openai_ppl"] = task_metric(results, "lambada_openai", "perplexity")
        row["avg_of_4"] = average_accuracy(results)
        rows.append(row)
    return rows


def compare(paths_or_dirs: Sequence[str | os.PathLike]) -> str:
    """The MLKV paper's results table across checkpoints (accuracies in %, LAMBADA perplexity in brackets).

    ``avg of 4`` averages ARC-e, LAMBADA, PIQA and SciQ accuracy as the paper does; HellaSwag is shown beside them
    (acc_norm). Every header names its metric (``TASK_COLUMNS``).
    """
    header = ["config", "KV bytes/token"] + [column_header(task) for task in PAPER_COLUMNS] + ["avg of 4 (acc)"]
    table_rows = []
    for row in compare_rows(paths_or_dirs):
        name = row["config"] + (f" ({row['structure']})" if row["structure"] else "")
        if row["limit"]:
            name += f" [limit {row['limit']}]"
        cells = [name, _cell(row["kv_bytes_per_token"])]
        for task in PAPER_COLUMNS:
            cell = tables.fmt(row[column_key(task)], ".2f", pct=True)
            if task == "lambada_openai" and row["lambada_openai_ppl"] is not None:
                cell += f" ({row['lambada_openai_ppl']:.1f})"
            cells.append(cell)
        cells.append(tables.fmt(row["avg_of_4"], ".2f", pct=True))
        table_rows.append(cells)
    return tables.markdown_table(table_rows, header)
