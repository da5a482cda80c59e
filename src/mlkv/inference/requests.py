"""What a ``generate`` call asks for, checked and in one form: prompts as lists of ids, one stop set per row."""

from __future__ import annotations

import torch


def normalize_prompts(prompts, vocab_size: int) -> list[list[int]]:
    """Prompts (lists of ids of any lengths, 1-D tensors, or a 2-D tensor) as lists of ints, each non-empty and
    inside the vocabulary."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise ValueError(f"prompts tensor must be (batch, length), got shape {tuple(prompts.shape)}")
        rows = prompts.tolist()
    else:
        rows = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
    if not rows:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if min(r) < 0 or max(r) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size})")
    return [[int(t) for t in r] for r in rows]


def stop_lists(stop_tokens, batch: int, eos_token_id=None) -> list[list[int]]:
    """One list of stop ids per row from ``generate``'s ``stop_tokens`` (see ``MLKVEngine.generate``); ``None``
    means ``eos_token_id`` (an id, a list of ids or ``None``)."""
    if stop_tokens is None:
        stop_tokens = [] if eos_token_id is None else eos_token_id
    if isinstance(stop_tokens, torch.Tensor):
        stop_tokens = stop_tokens.tolist()
    if isinstance(stop_tokens, int):
        return [[stop_tokens]] * batch
    stop_tokens = list(stop_tokens)
    if any(s is None or isinstance(s, (list, tuple, torch.Tensor)) for s in stop_tokens):  # one entry per row
        if len(stop_tokens) != batch:
            raise ValueError(f"per-row stop_tokens has {len(stop_tokens)} entries for {batch} prompts")
        rows = []
        for s in stop_tokens:
            s = [] if s is None else s.tolist() if isinstance(s, torch.Tensor) else s
            rows.append([int(t) for t in ([s] if isinstance(s, int) else s)])
        return rows
    return [[int(t) for t in stop_tokens]] * batch


__all__ = ["normalize_prompts", "stop_lists"]
