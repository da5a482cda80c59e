"""Perplexity of a text file, two ways.

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

``perplexity_file`` runs both on a file: a raw WikiText file (``*.raw``; split into articles as
``EleutherAI/wikitext_document_level`` does, detokenized by the harness's ``wikitext_detokenizer``) or any file
``mlkv.data.read_documents`` reads (``.txt``, ``.jsonl[.xz|.gz|.bz2]`` with a ``text`` field, ...). ``wikitext2`` and
``gutenberg`` name the shared WikiText-2 test file and the Gutenberg validation split. The harness's helpers
(lm-eval, the ``eval`` extra) are imported when a function needs them.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mlkv.data import read_documents
from mlkv.data.paths import DATA_ENV, DATA_FLAG, DataFileNotFoundError, data_file
from mlkv.errors import UsageError, require_extra
from mlkv.evaluation.model_info import model_device
from mlkv.evaluation.task_configs.converters import read_wikitext_pages
from mlkv.evaluation.token_budget import fit_documents, read_until

__all__ = ["PERPLEXITY_FILES", "model_max_length", "perplexity", "perplexity_file", "read_perplexity_documents",
           "resolve_perplexity_path", "rolling_loglikelihoods", "wikitext_detokenize", "word_byte_perplexity"]

#: Short names for the shared perplexity files (relative to the data folder).
PERPLEXITY_FILES: dict[str, str] = {
    "wikitext2": "eval/wikitext2/wiki.test.raw",
    "gutenberg": "corpus/gutenberg/val.jsonl.xz",
}


def model_max_length(model, tokenizer=None) -> int:
    """The context length the harness uses for this model (``lm_eval.models.utils.resolve_max_length``)."""
    utils = require_extra("lm_eval.models.utils", "the harness's context length")
    return utils.resolve_max_length(model.config, tokenizer)


@torch.no_grad()
def _score_windows(model, windows: Sequence[tuple[list[int], list[int]]], batch_size: int = 1,
                   desc: str | None = None, progress: bool = True) -> list[float]:
    """Summed log-probability of each window's targets.

    A window is ``(inputs, targets)``: the last ``len(targets)`` positions of ``inputs`` predict ``targets`` (the
    harness's convention for ``(context + continuation)[-(max_length + 1):][:-1]``). Windows are batched
    longest first and right-padded, which leaves a causal model's logits at the real positions unchanged. The
    progress bar counts input tokens, the measure of the work, so its rate and ETA hold while windows shrink.
    """
    device = model_device(model)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    out = [0.0] * len(windows)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(total=sum(len(inputs) for inputs, _ in windows), desc=desc, disable=not progress, unit="tok",
               unit_scale=True)
    for batch in batches:
        width = len(windows[batch[0]][0])
        ids = torch.zeros((len(batch), width), dtype=torch.long)  # (B, W), right-padded
        for row, index in enumerate(batch):
            inputs = windows[index][0]
            ids[row, :len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        logits = model(input_ids=ids.to(device), use_cache=False).logits  # (B, W, V)
        for row, index in enumerate(batch):
            inputs, targets = windows[index]
            if not targets:
                continue
            n, end = len(targets), len(inputs)
            logprobs = torch.log_softmax(logits[row, end - n:end].float(), dim=-1)  # (n, V)
            target = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
            out[index] = logprobs.gather(-1, target[:, None]).sum().item()
        bar.update(sum(len(windows[index][0]) for index in batch))
    bar.close()
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
        raise UsageError(f"stride ({stride}) must be between 1 and max_length ({max_length})")
    tokens = tokenizer(text)["input_ids"]
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise UsageError(f"text too short for perplexity: {len(tokens)} token(s)")
    windows, prev_end = [], 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + max_length, len(tokens))
        first_target = max(prev_end, begin + 1)  # a window's first token has no context inside the window
        if first_target < end:
            windows.append((tokens[begin:end - 1], tokens[first_target:end]))
        prev_end = end
        if end == len(tokens):
            break
    logprobs = _score_windows(model, windows, batch_size, desc="perplexity, token-level", progress=progress)
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


def _rolling(model, tokenizer, documents: Sequence[str], max_length: int, batch_size: int,
             progress: bool) -> tuple[list[float], int]:
    """``rolling_loglikelihoods`` and the number of tokens they score."""
    utils = require_extra("lm_eval.utils", "rolling log-likelihoods")
    prefix = _prefix_token_id(tokenizer)
    windows, owner = [], []
    for doc_index, doc in enumerate(documents):
        for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=_harness_encode(tokenizer, doc), prefix_token=prefix, max_seq_len=max_length,
                context_len=1)):
            windows.append(((context + continuation)[-(max_length + 1):][:-1], continuation))
            owner.append(doc_index)
    logprobs = _score_windows(model, windows, batch_size, desc="perplexity, document-level", progress=progress)
    totals = [0.0] * len(documents)
    for doc_index, logprob in zip(owner, logprobs):
        totals[doc_index] += logprob
    return totals, sum(len(continuation) for _, continuation in windows)


def rolling_loglikelihoods(model, tokenizer, documents: Sequence[str], max_length: int | None = None,
                           batch_size: int = 1, progress: bool = True) -> list[float]:
    """Log-likelihood of each whole document, as the harness's ``HFLM.loglikelihood_rolling`` computes it.

    Tokens are split into disjoint windows of ``max_length`` predicted tokens (``get_rolling_token_windows`` with
    ``context_len=1`` + ``make_disjoint_window``); the first window is conditioned on the prefix token (BOS, else
    EOS), each later one on the token before it, and the last one on as much preceding text as fits.
    """
    max_length = max_length or model_max_length(model, tokenizer)
    return _rolling(model, tokenizer, documents, max_length, batch_size, progress)[0]


def word_byte_perplexity(model, tokenizer, documents: Sequence[str],
                         detokenize: Callable[[str], str] | None = None, max_length: int | None = None,
                         batch_size: int = 1, progress: bool = True) -> dict[str, Any]:
    """Word perplexity, byte perplexity and bits per byte as the harness's ``wikitext`` task reports them.

    The model scores ``detokenize(doc)`` (identity by default) with ``rolling_loglikelihoods``; words
    (``len(re.split(r"\\s+", doc))``) and UTF-8 bytes are counted on the original ``doc``.
    """
    targets = [detokenize(doc) if detokenize else doc for doc in documents]
    max_length = max_length or model_max_length(model, tokenizer)
    totals, scored = _rolling(model, tokenizer, targets, max_length, batch_size, progress)
    loglikelihood = sum(totals)
    words = sum(len(re.split(r"\s+", doc)) for doc in documents)
    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    return {
        "word_perplexity": math.exp(-loglikelihood / words),
        "byte_perplexity": math.exp(-loglikelihood / n_bytes),
        "bits_per_byte": -loglikelihood / n_bytes / math.log(2),
        "loglikelihood": loglikelihood,
        "scored_tokens": scored,
        "words": words,
        "bytes": n_bytes,
        "documents": len(documents),
        "max_length": max_length,
    }


def wikitext_detokenize(page: str) -> str:
    """The harness's WikiText detokenizer (``lm_eval/tasks/wikitext/preprocess_wikitext.py``) on one page."""
    wikitext = require_extra("lm_eval.tasks.wikitext.preprocess_wikitext", "the WikiText detokenizer")
    return wikitext.wikitext_detokenizer({"page": page})


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


def read_perplexity_documents(path: str | os.PathLike, limit: int | None = None,
                              counts: Iterable[Callable[[str], int]] = (),
                              max_tokens: int | None = None) -> tuple[str, list[str]]:
    """``(kind, documents)`` of a perplexity file: ``"wikitext"`` pages of a ``*.raw`` file, else ``"documents"``
    as ``mlkv.data.read_documents`` reads them. ``limit`` keeps the first documents; with ``max_tokens``, reading
    stops once the documents hold that many tokens by each of ``counts`` (``token_budget.read_until``)."""
    path = Path(path)
    if path.suffix == ".raw":
        kind, documents = "wikitext", read_wikitext_pages(path)[:limit]
    else:
        kind, documents = "documents", read_documents(path, max_documents=limit)
    return kind, read_until(documents, counts, max_tokens)


def perplexity_file(model, tokenizer, path: str | os.PathLike, max_length: int | None = None,
                    stride: int | None = None, batch_size: int = 1, limit: int | None = None,
                    max_tokens: int | None = None, document_level: bool = True,
                    progress: bool = True) -> dict[str, Any]:
    """Token-level (sliding window) and, if ``document_level``, harness-style word/byte perplexity of a file.

    The token-level text is the documents joined by ``"\\n"`` for WikiText pages (which gives back the raw file
    less its leading blank line) and by ``"\\n\\n"`` otherwise; the document-level numbers score each document on
    its own (WikiText pages after the harness's detokenizer). ``limit`` keeps the first documents. ``max_tokens``
    bounds both passes (``mlkv.evaluation.token_budget``): the token-level text is cut at that many tokens, the
    document-level pass scores whole documents while they fit and the part of the next one that fits, and the file
    is read only as far as they need.
    """
    max_length = max_length or model_max_length(model, tokenizer)
    detokenize = wikitext_detokenize if Path(path).suffix == ".raw" else None

    @functools.cache  # counted while reading and again while fitting the budget
    def scored(doc: str) -> int:  # the tokens the document-level pass scores for doc
        return len(_harness_encode(tokenizer, detokenize(doc) if detokenize else doc))

    def joined(doc: str) -> int:  # the tokens doc surely adds to the joined text (its ends may merge at a join)
        return max(0, len(tokenizer(doc)["input_ids"]) - 2)

    counts = [joined, scored] if document_level else [joined]
    kind, documents = read_perplexity_documents(path, limit, counts, max_tokens)
    text = ("\n" if kind == "wikitext" else "\n\n").join(documents)
    result = {"file": str(path), "kind": kind, "documents": len(documents), "limit": limit, "max_tokens": max_tokens,
              "token_level": perplexity(model, tokenizer, text, max_length, stride, batch_size, max_tokens,
                                        progress=progress)}
    if document_level:
        docs, cut = fit_documents(documents, scored, max_tokens) if max_tokens else (documents, False)
        result["document_level"] = {**word_byte_perplexity(model, tokenizer, docs, detokenize, max_length,
                                                           batch_size, progress), "last_document_cut": cut}
    return result
