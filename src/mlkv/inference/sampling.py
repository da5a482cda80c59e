"""Choosing the next token inside a captured decode step: greedy, or temperature / top-k / top-p sampling.

Everything runs on the device without a host sync: the temperature and top-p values are read from device tensors
(so one captured graph serves every value), and the draw is an exponential race instead of ``multinomial``.
``Sampling.key`` is what changes the step's kernels, so the engine captures one graph per key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature ({self.temperature}) must be > 0 when sampling; use do_sample=False "
                                 "for greedy decoding")
            if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
                raise ValueError(f"top_k ({self.top_k}) must be a positive integer or None")
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise ValueError(f"top_p ({self.top_p}) must be in (0, 1] or None")

    @property
    def key(self) -> tuple:
        """What changes the captured step's kernels (temperature and top-p values live in device buffers)."""
        if not self.do_sample:
            return ("greedy",)
        return ("sample", int(self.top_k or 0), self.top_p is not None and self.top_p < 1)


def sample(logits: torch.Tensor, key: tuple, temperature: torch.Tensor, top_p: torch.Tensor,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row, ``(B,)`` from ``(B, V)`` logits, as ``key`` (``Sampling.key``) says;
    ``temperature`` and ``top_p`` are 1-element device tensors."""
    if key[0] == "greedy":
        return logits.argmax(-1)
    _, top_k, use_top_p = key
    x = logits.float() / temperature
    if top_k:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if use_top_p:
        sx, idx = torch.sort(x, dim=-1, descending=True)
        p = sx.softmax(-1)
        before = p.cumsum(-1) - p  # probability mass ranked above each token
        sx = sx.masked_fill(before > top_p, float("-inf"))  # the top token always stays
        x = x.scatter(-1, idx, sx)
    probs = x.softmax(-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(1e-20)
    return (probs / race).argmax(-1)  # = a draw from probs, without multinomial's host sync


__all__ = ["Sampling", "sample"]
