"""The model a reproduction starts from (``--base``) and its shape, known before any work starts.

``pretrain``: a 12 x 12 MHA model pretrained by the run itself (the paper's grid applies as printed). ``smollm2``
(or another known name), a ``.gguf`` file, or a Hugging Face folder of the Llama family (or any family
``mlkv convert`` reads): a real pretrained model, converted as it is. Its shape comes from its config alone (a GGUF's
through transformers' GGUF reader, a few seconds; no weights are read), so that the plans can be checked against it
at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlkv.errors import UsageError
from mlkv.model.sharing import PAPER_PRESETS, PAPER_SHAPE, SharingPlan, default_grid, resolve_plan

__all__ = ["PRETRAIN", "Source", "describe_source", "canonical_plan", "max_served"]

PRETRAIN = "pretrain"


@dataclass(frozen=True)
class Source:
    """The base model's attention shape. ``kind``: ``pretrain``, ``gguf`` or ``folder``."""

    spec: str
    kind: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def real(self) -> bool:
        """A pretrained checkpoint from outside (not a base trained by the run)."""
        return self.kind != PRETRAIN

    @property
    def paper_shaped(self) -> bool:
        """The paper's 12 x 12 MHA shape, where its plan names (MHA-144 ... MLKV-1) apply."""
        return (self.layers, self.heads) == PAPER_SHAPE and self.kv_heads == self.heads

    def plan(self, name: str | SharingPlan) -> SharingPlan:
        """``name`` resolved on this shape (a GQA source keeps its K/V heads as the most a producer may have)."""
        return resolve_plan(name, self.layers, self.heads, kv_heads=self.kv_heads)

    @property
    def identity(self) -> str:
        """The plan that leaves the model as it is: every layer its own K/V with all of the source's K/V heads."""
        return canonical_plan(self, f"{self.layers}x{self.kv_heads}")

    def grid(self) -> list[str]:
        """The plans compared by default: the paper's nine on its shape, else ``default_grid`` of the source."""
        if self.paper_shaped:
            return list(PAPER_PRESETS)
        return [canonical_plan(self, p) for p in default_grid(self.layers, self.heads, self.kv_heads)]

    def describe(self) -> str:
        what = "pretrained by this run" if not self.real else f"{self.spec} ({self.kind})"
        return (f"{what}: {self.layers} layers x {self.heads} query heads, {self.kv_heads} K/V heads per layer, "
                f"head_dim {self.head_dim}")


def canonical_plan(source: Source, name: str | SharingPlan) -> str:
    """One spelling per plan: the paper's name on its shape (``mlkv-6`` and ``6x1`` -> ``MLKV-6``), else the
    structure (``mha`` on SmolLM2 -> ``30x3``). Raises ``ValueError`` naming the plan for one the shape cannot take."""
    plan = source.plan(name)
    if source.paper_shaped:
        for preset in PAPER_PRESETS:
            paper = source.plan(preset)
            if (paper.kv_source_layers, paper.num_key_value_heads) == (plan.kv_source_layers,
                                                                         plan.num_key_value_heads):
                return preset
    return plan.structure


def max_served(plan: SharingPlan) -> int:
    """The most layers one producer serves (1: no cross-layer sharing)."""
    return max(len(plan.served_by(p)) for p in plan.producers)


def describe_source(base: str, hidden_size: int = 384) -> Source:
    """The ``Source`` of ``--base``: ``pretrain``, a known GGUF name or ``.gguf`` path, or a checkpoint folder."""
    if base == PRETRAIN:
        return Source(PRETRAIN, PRETRAIN, *PAPER_SHAPE, PAPER_SHAPE[1], hidden_size // PAPER_SHAPE[1])
    from mlkv.model.gguf import is_gguf

    if is_gguf(base):
        return _gguf_source(base)
    path = Path(base).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--base {base}: neither 'pretrain', a known model (smollm2), a .gguf file nor a "
                                f"checkpoint folder ({path} does not exist)")
    from mlkv.model.convert import mlkv_config_from_hf, read_hf_config

    config = mlkv_config_from_hf(read_hf_config(path))
    return Source(str(base), "folder", config.num_hidden_layers, config.num_attention_heads,
                  config.num_key_value_heads, config.head_dim)


def _gguf_source(base: str) -> Source:
    from mlkv.errors import require_extra
    from mlkv.model.gguf import SUPPORTED, resolve_gguf

    path = resolve_gguf(base)  # a named error for a missing package or file
    require_extra("gguf", f"--base {base}")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if config.model_type not in SUPPORTED:
        raise UsageError(f"--base {base}: a {config.model_type!r} GGUF; mlkv converts the Llama family "
                         f"({', '.join(SUPPORTED)})")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Source(str(base), "gguf", config.num_hidden_layers, heads, config.num_key_value_heads or heads, head_dim)
