"""Offline evaluation of MLKV (or any ``AutoModelForCausalLM``) checkpoints.

Two kinds of numbers:

* **Perplexity** of a text file.

  - ``perplexity``: token-level perplexity with a sliding window, as in the Hugging Face guide "Perplexity of
    fixed-length models": windows of ``max_length`` tokens start every ``stride`` tokens; each window scores only
    the tokens that no earlier window scored (the overlapping context is "labels = -100"), so every token after the
    first is scored once, with up to ``max_length - 1`` tokens of context. The mean is weighted by the tokens
    actually scored (the guide's code counts one token too few in windows after the first; this counts exactly).
  - ``word_byte_perplexity``: WikiText-style word perplexity, byte perplexity and bits per byte exactly as
    lm-evaluation-harness's ``wikitext`` task computes them: document-level ``loglikelihood_rolling`` (the
    harness's ``get_rolling_token_windows`` + ``make_disjoint_window`` with the model's ``max_length``), then
    ``exp(-sum ll / sum words)``, ``exp(-sum ll / sum bytes)`` and ``-sum ll / sum bytes / ln 2``, with words
    counted by ``re.split(r"\\s+", doc)`` and bytes as UTF-8 on the document *before* the WikiText detokenizer.
  - ``perplexity_file`` runs both on a file: a raw WikiText file (``*.raw``; split into articles as
    ``EleutherAI/wikitext_document_level`` does, detokenized by the harness's ``wikitext_detokenizer``) or any
    file ``mlkv.data.pipeline.read_documents`` reads (``.txt``, ``.jsonl[.xz|.gz|.bz2]`` with a ``text`` field, ...).
    ``wikitext2`` and ``gutenberg`` name the shared WikiText-2 test file and the Gutenberg validation split.

* **Zero-shot tasks** with the real lm-evaluation-harness as a library (``run_tasks``): ``simple_evaluate`` on an
  ``HFLM`` wrapping the model, with a ``TaskManager`` over ``mlkv/tasks`` -- copies of the harness's own task
  YAMLs (same prompts and metrics, same task names) that read the shared local files (see
  ``mlkv.evaluation.tasks.converters``). ``data_source="hub"`` uses the harness's built-in tasks and hub datasets instead.
  ``request_cache=DIR`` keeps the harness's built requests (prompts and continuations, the same for every model)
  in a subfolder of ``DIR`` named by a fingerprint of the task YAMLs, the task data files and the harness's
  version; later full-set evaluations load them instead of building them again (43.2 s of host time per model,
  profiled, for the paper's five tasks; ``benchmarks/eval_host_cost.py``). The harness stores them with ``dill``
  (a pickle): point it only at a folder of your own.

Results are the harness's output dict plus an ``"mlkv"`` section (model, KV cache size, perplexities, ...);
``save_results`` writes them atomically, ``markdown_table`` renders one result, ``compare`` renders the MLKV
paper's table across checkpoints. ``add_eval_arguments`` / ``run_eval_command`` are the ``mlkv eval`` command.

The shared data folder is ``--data-dir`` / ``data_dir=``, else ``$MLKV_DATA``, else ``../shared/data`` (from the
working directory, then from the repository root).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mlkv.data.pipeline import read_documents
from mlkv.model.sharing import SharingPlan
from mlkv.evaluation.tasks import TASKS_DIR
from mlkv.evaluation.tasks.converters import (DATA_ENV, DATA_FLAG, TASK_FILES, DataFileNotFoundError, data_file,
                                   read_wikitext_pages, resolve_data_dir)

# ``import mlkv`` (the package this module belongs to) registers MLKVConfig / MLKVForCausalLM with transformers'
# Auto classes, so ``AutoModelForCausalLM.from_pretrained`` below loads MLKV checkpoints too.

__all__ = [
    "DEFAULT_TASKS",
    "SUPPORTED_TASKS",
    "DataFileNotFoundError",
    "EvalUsageError",
    "UnknownTaskError",
    "add_eval_arguments",
    "compare",
    "compare_rows",
    "kv_cache_info",
    "load_model",
    "load_results",
    "markdown_table",
    "perplexity",
    "perplexity_file",
    "rolling_loglikelihoods",
    "run_eval_command",
    "run_tasks",
    "save_results",
    "word_byte_perplexity",
]

logger = logging.getLogger(__name__)

#: Tasks with local copies (``mlkv/tasks/*.yaml``), in the harness's names.
SUPPORTED_TASKS: tuple[str, ...] = tuple(TASK_FILES)
#: The MLKV paper's four tasks plus HellaSwag.
DEFAULT_TASKS: tuple[str, ...] = ("arc_easy", "lambada_openai", "piqa", "sciq", "hellaswag")
#: Columns of ``compare``: (task, header); the paper's "avg of 4" averages the first four.
PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("arc_easy", "ARC-e"),
    ("lambada_openai", "LAMBADA acc (ppl)"),
    ("piqa", "PIQA"),
    ("sciq", "SciQ"),
    ("hellaswag", "HellaSwag"),
)
PAPER_AVERAGE_TASKS: tuple[str, ...] = ("arc_easy", "lambada_openai", "piqa", "sciq")
#: File name of a checkpoint's results inside its directory.
RESULTS_FILE = "eval_results.json"
#: Short names for the shared perplexity files (relative to the data folder).
PERPLEXITY_FILES: dict[str, str] = {
    "wikitext2": "eval/wikitext2/wiki.test.raw",
    "gutenberg": "corpus/gutenberg/val.jsonl.xz",
}


class UnknownTaskError(ValueError):
    """A task name that is not supported; the message lists the supported ones."""


class EvalUsageError(ValueError):
    """Arguments of an evaluation that do not fit together (the message says why)."""


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError as exc:  # pragma: no cover - lm-eval is a test dependency
        raise ImportError("evaluation needs lm-evaluation-harness: pip install 'mlkv[eval]' (lm-eval==0.4.13)") from exc
    return lm_eval


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_dir: str | os.PathLike, device: str | None = None, dtype: str | torch.dtype | None = None,
               tokenizer: str | os.PathLike | None = None):
    """Load ``(model, tokenizer)`` from a checkpoint directory (any ``AutoModelForCausalLM`` one, MLKV included).

    ``dtype`` None means float32 on CPU and the checkpoint's own dtype elsewhere; ``tokenizer`` defaults to the
    checkpoint directory.
    """
    from transformers import AutoModelForCausalLM

    from mlkv.data.pipeline import load_hf_tokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"not a model checkpoint directory (no config.json): {model_dir}")
    device = device or default_device()
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else "auto"
    elif isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tok_source = Path(tokenizer) if tokenizer else model_dir
    eos = model.config.eos_token_id
    try:
        tok = load_hf_tokenizer(tok_source, eos[0] if isinstance(eos, list) else eos)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"no tokenizer found in {tok_source} (save one with the checkpoint or pass --tokenizer): {exc}"
        ) from exc
    return model, tok


def kv_cache_info(config, dtype: str | torch.dtype = "fp16") -> dict[str, Any]:
    """KV cache size of a model config: producer layers x KV heads x head_dim x 2 (K and V) x bytes per value.

    MLKV configs give ``kv_source_layers`` (layers that read another layer's KV cost nothing); any other HF config
    counts every layer, with ``num_key_value_heads`` (default: all heads) and ``head_dim`` (default:
    ``hidden_size / num_attention_heads``).
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    sources = getattr(config, "kv_source_layers", None) or list(range(config.num_hidden_layers))
    plan = SharingPlan(tuple(sources), kv_heads, heads)
    return {
        "layers": plan.num_layers,
        "kv_layers": plan.num_producers,
        "kv_heads_per_layer": kv_heads,
        "total_kv_heads": plan.total_kv_heads,
        "head_dim": head_dim,
        "structure": plan.structure,
        "dtype": str(dtype),
        "bytes_per_token": plan.kv_bytes_per_token(head_dim, dtype),
    }


def describe_model(model, source: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``"mlkv"`` section's model fields: name, path, type, dtype, parameters and KV cache size."""
    path = str(source) if source is not None else getattr(model, "name_or_path", "") or ""
    name = (Path(path).resolve().name if Path(path).exists() else Path(path).name) if path else ""
    return {
        "model": path,
        "name": name or type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "dtype": str(getattr(model, "dtype", "")).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "kv_cache": kv_cache_info(model.config),
    }


def model_max_length(model, tokenizer=None) -> int:
    """The context length the harness uses for this model (``lm_eval.models.utils.resolve_max_length``)."""
    _require_lm_eval()
    from lm_eval.models.utils import resolve_max_length

    return resolve_max_length(model.config, tokenizer)


# ----------------------------------------------------------------------------------------------------------
# Scoring token windows
# ----------------------------------------------------------------------------------------------------------


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _score_windows(model, windows: Sequence[tuple[list[int], list[int]]], batch_size: int = 1,
                   desc: str | None = None, progress: bool = True) -> list[float]:
    """Summed log-probability of each window's targets.

    A window is ``(inputs, targets)``: the last ``len(targets)`` positions of ``inputs`` predict ``targets`` (the
    harness's convention for ``(context + continuation)[-(max_length + 1):][:-1]``). Windows are batched
    longest first and right-padded, which leaves a causal model's logits at the real positions unchanged.
    """
    device = _model_device(model)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    out = [0.0] * len(windows)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        width = len(windows[batch[0]][0])
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            inputs = windows[index][0]
            ids[row, :len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        logits = model(input_ids=ids.to(device), use_cache=False).logits
        for row, index in enumerate(batch):
            inputs, targets = windows[index]
            if not targets:
                continue
            n, end = len(targets), len(inputs)
            logprobs = torch.log_softmax(logits[row, end - n:end].float(), dim=-1)
            target = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
            out[index] = logprobs.gather(-1, target[:, None]).sum().item()
    return out


def perplexity(model, tokenizer, text: str, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 1, max_tokens: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Token-level sliding-window perplexity of ``text`` (the HF guide "Perplexity of fixed-length models").

    ``max_length`` defaults to the model's context length, ``stride`` to ``max_length // 2``. Window ``k`` covers
    tokens ``[k * stride, k * stride + max_length)`` and scores the tokens after the previous window's end; the
    loop stops at the window that reaches the end of the text. ``max_tokens`` truncates the tokenized text.
    Returns ``perplexity`` = exp(nll_sum / scored_tokens) and the counts.
    """
    max_length = max_length or model_max_length(model, tokenizer)
    stride = stride or max(1, max_length // 2)
    if not 1 <= stride <= max_length:
        raise EvalUsageError(f"stride ({stride}) must be between 1 and max_length ({max_length})")
    tokens = tokenizer(text)["input_ids"]
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise EvalUsageError(f"text too short for perplexity: {len(tokens)} token(s)")
    windows, prev_end = [], 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + max_length, len(tokens))
        first_target = max(prev_end, begin + 1)  # a window's first token has no context inside the window
        if first_target < end:
            windows.append((tokens[begin:end - 1], tokens[first_target:end]))
        prev_end = end
        if end == len(tokens):
            break
    logprobs = _score_windows(model, windows, batch_size, desc="perplexity", progress=progress)
    scored = sum(len(t) for _, t in windows)
    nll = -sum(logprobs)
    return {
        "perplexity": math.exp(nll / scored),
        "nll_sum": nll,
        "scored_tokens": scored,
        "text_tokens": len(tokens),
        "windows": len(windows),
        "max_length": max_length,
        "stride": stride,
    }


def _prefix_token_id(tokenizer) -> int:
    """The harness's prefix for rolling windows: BOS, else EOS (``HFLM.prefix_token_id``)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _harness_encode(tokenizer, text: str) -> list[int]:
    """``HFLM.tok_encode`` for a causal model: the tokenizer's defaults, no special tokens if ``text`` starts with
    the prefix token's text."""
    prefix = tokenizer.decode(_prefix_token_id(tokenizer))
    if prefix and text.startswith(prefix):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def rolling_loglikelihoods(model, tokenizer, documents: Sequence[str], max_length: int | None = None,
                           batch_size: int = 1, progress: bool = True) -> list[float]:
    """Log-likelihood of each whole document, as the harness's ``HFLM.loglikelihood_rolling`` computes it.

    Tokens are split into disjoint windows of ``max_length`` predicted tokens (``get_rolling_token_windows`` with
    ``context_len=1`` + ``make_disjoint_window``); the first window is conditioned on the prefix token (BOS, else
    EOS), each later one on the token before it, and the last one on as much preceding text as fits.
    """
    _require_lm_eval()
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    max_length = max_length or model_max_length(model, tokenizer)
    prefix = _prefix_token_id(tokenizer)
    windows, owner = [], []
    for doc_index, doc in enumerate(documents):
        for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                token_list=_harness_encode(tokenizer, doc), prefix_token=prefix, max_seq_len=max_length,
                context_len=1)):
            windows.append(((context + continuation)[-(max_length + 1):][:-1], continuation))
            owner.append(doc_index)
    logprobs = _score_windows(model, windows, batch_size, desc="rolling loglikelihood", progress=progress)
    totals = [0.0] * len(documents)
    for doc_index, logprob in zip(owner, logprobs):
        totals[doc_index] += logprob
    return totals


def word_byte_perplexity(model, tokenizer, documents: Sequence[str],
                         detokenize: Callable[[str], str] | None = None, max_length: int | None = None,
                         batch_size: int = 1, progress: bool = True) -> dict[str, Any]:
    """Word perplexity, byte perplexity and bits per byte as the harness's ``wikitext`` task reports them.

    The model scores ``detokenize(doc)`` (identity by default) with ``rolling_loglikelihoods``; words
    (``len(re.split(r"\\s+", doc))``) and UTF-8 bytes are counted on the original ``doc``.
    """
    targets = [detokenize(doc) if detokenize else doc for doc in documents]
    max_length = max_length or model_max_length(model, tokenizer)
    loglikelihood = sum(rolling_loglikelihoods(model, tokenizer, targets, max_length, batch_size, progress))
    words = sum(len(re.split(r"\s+", doc)) for doc in documents)
    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    return {
        "word_perplexity": math.exp(-loglikelihood / words),
        "byte_perplexity": math.exp(-loglikelihood / n_bytes),
        "bits_per_byte": -loglikelihood / n_bytes / math.log(2),
        "loglikelihood": loglikelihood,
        "words": words,
        "bytes": n_bytes,
        "documents": len(documents),
        "max_length": max_length,
    }


def wikitext_detokenize(page: str) -> str:
    """The harness's WikiText detokenizer (``lm_eval/tasks/wikitext/preprocess_wikitext.py``) on one page."""
    _require_lm_eval()
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    return wikitext_detokenizer({"page": page})


def resolve_perplexity_path(name: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Path:
    """A perplexity file: a short name (``wikitext2``, ``gutenberg``) in the data folder, or a path."""
    if str(name) in PERPLEXITY_FILES:
        return data_file(data_dir, PERPLEXITY_FILES[str(name)])
    path = Path(name).expanduser()
    if not path.exists():
        raise DataFileNotFoundError(
            f"perplexity file not found: {path} (give a path, or one of {', '.join(PERPLEXITY_FILES)} for the shared "
            f"files under {DATA_FLAG} / ${DATA_ENV})"
        )
    return path


def read_perplexity_documents(path: str | os.PathLike, limit: int | None = None) -> tuple[str, list[str]]:
    """``(kind, documents)`` of a perplexity file: ``"wikitext"`` pages of a ``*.raw`` file, else ``"documents"``
    as ``mlkv.data.pipeline.read_documents`` reads them. ``limit`` keeps the first documents."""
    path = Path(path)
    if path.suffix == ".raw":
        pages = read_wikitext_pages(path)
        return "wikitext", pages[:limit] if limit else pages
    return "documents", list(read_documents(path, max_documents=limit))


def perplexity_file(model, tokenizer, path: str | os.PathLike, max_length: int | None = None,
                    stride: int | None = None, batch_size: int = 1, limit: int | None = None,
                    max_tokens: int | None = None, document_level: bool = True,
                    progress: bool = True) -> dict[str, Any]:
    """Token-level (sliding window) and, if ``document_level``, harness-style word/byte perplexity of a file.

    The token-level text is the documents joined by ``"\\n"`` for WikiText pages (which gives back the raw file
    less its leading blank line) and by ``"\\n\\n"`` otherwise, cut at ``max_tokens`` tokens if given; the document-level numbers score every
    document whole, on its own (WikiText pages after the harness's detokenizer). ``limit`` keeps the first
    documents.
    """
    kind, documents = read_perplexity_documents(path, limit)
    max_length = max_length or model_max_length(model, tokenizer)
    text = ("\n" if kind == "wikitext" else "\n\n").join(documents)
    result = {"file": str(path), "kind": kind, "documents": len(documents), "limit": limit,
              "token_level": perplexity(model, tokenizer, text, max_length, stride, batch_size, max_tokens,
                                        progress=progress)}
    if document_level:
        detokenize = wikitext_detokenize if kind == "wikitext" else None
        result["document_level"] = word_byte_perplexity(model, tokenizer, documents, detokenize, max_length,
                                                        batch_size, progress)
    return result


# ----------------------------------------------------------------------------------------------------------
# Zero-shot tasks through lm-evaluation-harness
# ----------------------------------------------------------------------------------------------------------


def check_tasks(tasks: str | Sequence[str], data_source: str = "local", manager=None) -> list[str]:
    """Task names as a list (comma-separated strings are split); raises ``UnknownTaskError`` for unknown ones.

    With ``data_source="local"`` the supported tasks are ``SUPPORTED_TASKS``; with ``"hub"`` any task the
    harness knows (``manager``: a built-in ``TaskManager`` to ask, else one is built, which takes seconds).
    """
    if data_source not in ("local", "hub"):
        raise EvalUsageError(f"data_source must be 'local' or 'hub', not {data_source!r}")
    names = [t.strip() for item in ([tasks] if isinstance(tasks, str) else tasks) for t in item.split(",")]
    names = [t for t in names if t]
    if not names:
        raise UnknownTaskError(f"no tasks given; supported: {', '.join(SUPPORTED_TASKS)}")
    if data_source == "local":
        unknown = [t for t in names if t not in SUPPORTED_TASKS]
        if unknown:
            raise UnknownTaskError(
                f"unknown task(s): {', '.join(unknown)}. Supported with local data: {', '.join(SUPPORTED_TASKS)} "
                f"(any lm-eval task with --data-source hub)"
            )
    else:
        known = set((manager or task_manager("hub")).all_tasks)
        unknown = [t for t in names if t not in known]
        if unknown:
            raise UnknownTaskError(f"unknown lm-eval task(s): {', '.join(unknown)}; locally supported: "
                                   f"{', '.join(SUPPORTED_TASKS)}")
    return names


def check_task_files(tasks: Sequence[str], data_dir: str | os.PathLike | None = None) -> None:
    """Raise ``DataFileNotFoundError`` (naming the file, --data-dir and $MLKV_DATA) for a missing task file."""
    for name in tasks:
        for relative in TASK_FILES[name]:
            data_file(data_dir, relative)


def task_manager(data_source: str = "local", data_dir: str | os.PathLike | None = None):
    """The harness's ``TaskManager``: our local task copies only (``"local"``), or the built-in tasks (``"hub"``)."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if data_source == "hub":
        return TaskManager()
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                       metadata={"mlkv_data_dir": str(resolve_data_dir(data_dir).resolve())})


def request_cache_dir(root: str | os.PathLike, names: Sequence[str], data_dir: str | os.PathLike | None) -> Path:
    """The folder under ``root`` for the harness's request cache of local tasks ``names``: its name is a fingerprint
    of everything the built requests depend on (the task YAMLs and the converters that load their documents, the
    data files' paths, sizes and modification times, the harness's and ``datasets``' versions), because the
    harness's own cache key is only the task name. Cached requests are matched to freshly loaded documents by
    position, so a stale cache would score old prompts against new labels."""
    import hashlib

    import datasets

    lm_eval = _require_lm_eval()
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
    lm_eval = _require_lm_eval()
    from lm_eval.api.model import LM

    class _RequestsOnly(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [0.0] * len(requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return [""] * len(requests)

    manager = task_manager("local", data_dir)
    names = check_tasks(tasks, "local", manager)
    check_task_files(names, data_dir)
    folder = request_cache_dir(root, names, data_dir)
    with _request_cache_path(folder):
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


def run_tasks(model, tasks: str | Sequence[str] = DEFAULT_TASKS, limit: int | None = None,
              batch_size: int | str = 8, device: str | None = None, data_dir: str | os.PathLike | None = None,
              tokenizer=None, data_source: str = "local", dtype: str | torch.dtype | None = None,
              max_length: int | None = None, bootstrap_iters: int = 1000, log_samples: bool = False,
              request_cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """Zero-shot evaluation with lm-evaluation-harness; returns the harness's output plus an ``"mlkv"`` section.

    ``model`` is a checkpoint directory (loaded with ``load_model`` on ``device``) or a loaded model (used where it
    is; ``tokenizer`` then is a tokenizer or its directory, default ``model.name_or_path``). ``limit`` evaluates the
    first ``limit`` documents of each task. ``bootstrap_iters`` is for the stderr of non-mean metrics (LAMBADA
    perplexity; the harness's CLI default is 100000). Data files are checked before anything is loaded.
    ``request_cache``: a folder for the harness's request cache (local tasks, full sets only: with ``limit`` the
    harness would build every document to fill it), see the module doc.
    """
    lm_eval = _require_lm_eval()
    from mlkv.evaluation.harness import BatchedHFLM

    manager = task_manager(data_source, data_dir)
    names = check_tasks(tasks, data_source, manager)
    if data_source == "local":
        check_task_files(names, data_dir)
    start = time.time()
    if isinstance(model, (str, os.PathLike)):
        source = model
        model, tokenizer = load_model(model, device, dtype, tokenizer)
    else:
        source = getattr(model, "name_or_path", None)
        if device is not None:
            model = model.to(device)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            if not (tokenizer or source):
                raise EvalUsageError("run_tasks needs a tokenizer for a model object without name_or_path")
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or source)
    lm = BatchedHFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                     max_length=max_length)
    cached = request_cache is not None and limit is None and data_source == "local"
    cache_folder = request_cache_dir(request_cache, names, data_dir) if cached else None
    with _request_cache_path(cache_folder) if cached else contextlib.nullcontext():
        output = lm_eval.simple_evaluate(
            model=lm, tasks=names, limit=limit, task_manager=manager,
            bootstrap_iters=bootstrap_iters, log_samples=log_samples, cache_requests=cached,
        )
    output = dict(output)
    output["mlkv"] = {
        **describe_model(model, source),
        "tasks": names,
        "limit": limit,
        "data_source": data_source,
        "data_dir": str(resolve_data_dir(data_dir).resolve()) if data_source == "local" else None,
        "batch_size": batch_size,
        "device": str(_model_device(model)),
        "max_length": lm.max_length,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "request_cache": str(cache_folder) if cached else None,
        "seconds": round(time.time() - start, 1),
    }
    return output


# ----------------------------------------------------------------------------------------------------------
# Results: JSON files and tables
# ----------------------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    """JSON for what the harness's output may hold besides plain types (numpy scalars, sets, dtypes, callables)."""
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    return str(obj)


def save_results(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``results`` as JSON atomically (a temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def _metric(results: dict[str, Any], task: str, metric: str) -> float | None:
    value = results.get("results", {}).get(task, {}).get(f"{metric},none")
    return value if isinstance(value, (int, float)) else None


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–" if value is None or value == "N/A" else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


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
            rows.append([task, metric, _fmt(value), _fmt(stderr), _fmt(n)])
    return rows


def _perplexity_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, entry in results.get("mlkv", {}).get("perplexity", {}).items():
        token = entry.get("token_level", {})
        label = f"{name} (ppl)"
        rows.append([label, f"token_perplexity (len {token.get('max_length')}, stride {token.get('stride')})",
                     _fmt(token.get("perplexity")), "–", _fmt(token.get("scored_tokens"))])
        doc = entry.get("document_level")
        if doc:
            for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
                rows.append([label, metric, _fmt(doc[metric]), "–", _fmt(doc["documents"])])
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


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
    return title + "\n\n" + _table(["task", "metric", "value", "± stderr", "n"], rows)


def compare_rows(paths_or_dirs: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per results file / checkpoint directory: config, KV bytes/token, per-task acc, LAMBADA ppl, avg."""
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
        for task, _ in PAPER_COLUMNS:
            row[task] = _metric(results, task, "acc")
        row["lambada_openai_ppl"] = _metric(results, "lambada_openai", "perplexity")
        paper = [row[t] for t in PAPER_AVERAGE_TASKS]
        row["avg_of_4"] = sum(paper) / len(paper) if all(v is not None for v in paper) else None
        rows.append(row)
    return rows


def compare(paths_or_dirs: Sequence[str | os.PathLike]) -> str:
    """The MLKV paper's results table across checkpoints (accuracies in %, LAMBADA perplexity in brackets).

    ``avg of 4`` averages ARC-e, LAMBADA, PIQA and SciQ as the paper does; HellaSwag is shown beside them.
    """
    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.2f}"

    header = ["config", "KV bytes/token"] + [h for _, h in PAPER_COLUMNS] + ["avg of 4"]
    table_rows = []
    for row in compare_rows(paths_or_dirs):
        name = row["config"] + (f" ({row['structure']})" if row["structure"] else "")
        if row["limit"]:
            name += f" [limit {row['limit']}]"
        cells = [name, _fmt(row["kv_bytes_per_token"])]
        for task, _ in PAPER_COLUMNS:
            cell = pct(row[task])
            if task == "lambada_openai" and row["lambada_openai_ppl"] is not None:
                cell += f" ({row['lambada_openai_ppl']:.1f})"
            cells.append(cell)
        cells.append(pct(row["avg_of_4"]))
        table_rows.append(cells)
    return _table(header, table_rows)


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    """The compact JSON line the command ends with."""
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


# ----------------------------------------------------------------------------------------------------------
# Command line: mlkv eval
# ----------------------------------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``mlkv eval DIR [--perplexity FILE...] [--tasks ...] [--limit N] [--compare ...]``."""
    parser.add_argument("model", nargs="?", help="checkpoint directory (any AutoModelForCausalLM directory)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help=f"zero-shot tasks, space or comma separated (default without --perplexity: "
                             f"{','.join(DEFAULT_TASKS)}; supported: {','.join(SUPPORTED_TASKS)})")
    parser.add_argument("--perplexity", nargs="+", default=[], metavar="FILE",
                        help=f"text files to compute perplexity on: paths (.raw WikiText, .txt, .jsonl[.xz]) or "
                             f"{', '.join(PERPLEXITY_FILES)} for the shared files")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N documents of each task / perplexity file")
    parser.add_argument("--compare", nargs="+", default=None, metavar="RESULTS",
                        help="print the paper's table across these results files / checkpoint directories "
                             "(the evaluated checkpoint, if any, is added)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                        help="model dtype (default: float32 on CPU, the checkpoint's dtype on GPU)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint directory)")
    parser.add_argument("--data-dir", default=None,
                        help=f"shared data folder (default: ${DATA_ENV}, else ../shared/data)")
    parser.add_argument("--data-source", choices=["local", "hub"], default="local",
                        help="task data: the local copies under --data-dir, or the harness's hub datasets")
    parser.add_argument("--max-length", type=int, default=None,
                        help="context length for perplexity windows and the harness (default: the model's)")
    parser.add_argument("--stride", type=int, default=None,
                        help="sliding-window stride for token-level perplexity (default: max_length / 2)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="score only the first N tokens of each file in the token-level perplexity")
    parser.add_argument("--bootstrap-iters", type=int, default=1000,
                        help="bootstrap iterations for the stderr of LAMBADA perplexity")
    parser.add_argument("--log-samples", action="store_true", help="keep per-sample outputs in the results JSON")
    parser.add_argument("--output", default=None,
                        help=f"results JSON (default: DIR/{RESULTS_FILE}; DIR/eval_results_limitN.json with --limit)")
    return parser


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """Load ``args.model`` once, compute the requested perplexities and tasks, and return the merged results."""
    if args.limit is not None and args.limit < 1:
        raise EvalUsageError(f"--limit must be positive, got {args.limit}")
    if args.tasks:  # hub task names are checked by run_tasks, against the harness's task index
        tasks = check_tasks(args.tasks) if args.data_source == "local" else list(args.tasks)
    else:
        tasks = [] if args.perplexity else list(DEFAULT_TASKS)
    ppl_paths = {str(name): resolve_perplexity_path(name, args.data_dir) for name in args.perplexity}
    if args.data_source == "local":
        check_task_files(tasks, args.data_dir)
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.tokenizer)
    if tasks:
        results = run_tasks(model, tasks, limit=args.limit, batch_size=args.batch_size, data_dir=args.data_dir,
                            tokenizer=tokenizer, data_source=args.data_source, max_length=args.max_length,
                            bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples)
    else:
        results = {"mlkv": {**describe_model(model, args.model), "tasks": [], "limit": args.limit,
                            "device": str(_model_device(model))}}
    results["mlkv"]["perplexity"] = {
        name: perplexity_file(model, tokenizer, path, args.max_length, args.stride, args.batch_size, args.limit,
                              args.max_tokens)
        for name, path in ppl_paths.items()
    }
    return results


def run_eval_command(args: argparse.Namespace) -> int:
    """``mlkv eval``: evaluate a checkpoint and/or compare results; prints markdown, then one JSON line.

    Returns the exit code: 0, or 2 after printing the error for a missing data file, an unknown task or
    arguments that do not fit together.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.model is None and not args.compare:
            raise EvalUsageError("give a checkpoint directory to evaluate, or --compare RESULTS...")
        summary: dict[str, Any] = {}
        compared = list(args.compare or [])
        if args.model is not None:
            with contextlib.redirect_stdout(sys.stderr):  # stdout: only the tables and the JSON line
                results = evaluate_checkpoint(args)
            output = Path(args.output) if args.output else Path(args.model) / (
                f"eval_results_limit{args.limit}.json" if args.limit else RESULTS_FILE)
            results["mlkv"]["results_path"] = str(output)
            save_results(results, output)
            print(markdown_table(results))
            summary = _summary(results)
            if compared:
                compared.append(output)
        if compared:
            if args.model is not None:
                print()
            print(compare(compared))
            summary["compare"] = compare_rows(compared)
    except (DataFileNotFoundError, UnknownTaskError, EvalUsageError, FileNotFoundError) as exc:
        print(f"mlkv eval: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=_json_default))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m mlkv.evaluate``), the same as ``mlkv eval``."""
    parser = add_eval_arguments(argparse.ArgumentParser(prog="mlkv eval", description=__doc__.splitlines()[0]))
    return run_eval_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
