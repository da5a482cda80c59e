"""The token budget of a perplexity file (``mlkv eval --max-tokens``): how much of it is read, and which documents
the document-level pass scores.

A file is read one document at a time, and only until its documents hold ``max_tokens`` tokens, so a budget also
bounds the reading and tokenizing of a large file (Gutenberg's validation split holds about 5.4M tokens). The
document-level pass scores whole documents while they fit in the budget, then the longest prefix of the next one
that fits (cut at whitespace, so its words are whole); words and bytes are counted on what is scored. The counting
functions are passed in: the caller knows how its pass tokenizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = ["cut_document", "fit_documents", "read_until"]

Count = Callable[[str], int]  # a text's token count, as a pass scores it

#: Rounds of ``cut_document``'s search; each tokenizes a prefix of about the budget's size.
CUT_ROUNDS = 6


def read_until(documents: Iterable[str], counts: Iterable[Count], max_tokens: int | None) -> list[str]:
    """The first documents of ``documents``, until every count of ``counts`` has reached ``max_tokens`` over them
    (all of them if ``max_tokens`` is None); the documents after those are not read."""
    if max_tokens is None:
        return list(documents)
    counts = list(counts)
    kept, totals = [], [0] * len(counts)
    for doc in documents:
        kept.append(doc)
        totals = [total + count(doc) for total, count in zip(totals, counts)]
        if min(totals) >= max_tokens:
            break
    return kept


def _whitespace_before(text: str, end: int) -> int:
    """Where ``text[:end]`` ends between words: a word the cut splits is dropped, then the whitespace before it;
    ``end`` itself if that leaves nothing (a text of one word)."""
    i = end
    if i < len(text) and not text[i].isspace():  # the cut splits a word
        while i > 0 and not text[i - 1].isspace():
            i -= 1
    while i > 0 and text[i - 1].isspace():
        i -= 1
    return i if i > 0 else end


def cut_document(doc: str, count: Count, budget: int) -> str:
    """A prefix of ``doc``, cut at whitespace, of at most ``budget`` tokens by ``count`` (``""`` if none is found):
    the longest found in ``CUT_ROUNDS`` rounds that scale the cut by budget / tokens (the secant towards the
    budget), stopping early within 1% of it."""
    best, end, tokens = "", len(doc), count(doc)
    for _ in range(CUT_ROUNDS):
        if tokens <= 0 or budget <= 0:
            break
        end = _whitespace_before(doc, min(len(doc), int(end * budget / tokens)))
        if end <= 0:
            break
        tokens = count(doc[:end])
        if tokens <= budget and end > len(best):
            best = doc[:end]
        if 0.99 * budget <= tokens <= budget:
            break
    return best


def fit_documents(documents: Iterable[str], count: Count, max_tokens: int) -> tuple[list[str], bool]:
    """``(documents, cut)``: the whole documents that fit in ``max_tokens`` tokens by ``count``, then the part of
    the next one that fits (``cut_document``); ``cut`` says whether the budget ended the list."""
    kept, used = [], 0
    for doc in documents:
        tokens = count(doc)
        if used + tokens <= max_tokens:
            kept.append(doc)
            used += tokens
            continue
        part = cut_document(doc, count, max_tokens - used)
        if part:
            kept.append(part)
        return kept, True
    return kept, False
