"""Which layer reads which keys/values, and what the KV cache costs.

A sharing plan is one explicit list, ``kv_source_layers``: entry ``i`` is the layer whose keys/values layer ``i``
attends to. A layer whose source is itself is a *producer* (it owns K/V projections and a cache slot); every other
layer is a *consumer* of an earlier producer. Inside a producer, ``num_key_value_heads`` K/V heads are shared by
groups of query heads (GQA/MQA).

Names resolve to plans (``resolve_plan``):

* ``PxK`` (``12x12``, ``6x1``, ``4x12``): P producers spread as in the MLKV paper, K KV heads each.
* ``mha`` / ``mqa``: every layer a producer with all heads / one head.
* ``gqa-N``: N KV heads spread evenly over all layers.
* ``mlkv-N``: N producers x 1 head when N <= layers. On the paper's 12-layer x 12-head shape every paper name
  (``MHA-144`` ... ``MLKV-1``) resolves exactly as the paper's table.
* ``cla-K``: cross-layer attention, groups of K adjacent layers share the first layer's K/V, all heads kept.
* an explicit list ``0,0,2,2`` (optionally ``:K`` for K heads per producer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The MLKV paper's grid on Pythia-160M (12 layers x 12 heads): name -> (producer layers, KV heads per producer).
PAPER_GRID: dict[str, tuple[int, int]] = {
    "mha-144": (12, 12),
    "gqa-48": (12, 4),
    "mlkv-48": (4, 12),
    "mqa-12": (12, 1),
    "mlkv-12": (4, 3),
    "mlkv-6": (6, 1),
    "mlkv-4": (4, 1),
    "mlkv-2": (2, 1),
    "mlkv-1": (1, 1),
}
PAPER_SHAPE = (12, 12)  # (layers, heads) the paper's names were defined on

# Display names in the paper's order, for tables.
PAPER_PRESETS: list[str] = ["MHA-144", "GQA-48", "MLKV-48", "MQA-12", "MLKV-12", "MLKV-6", "MLKV-4", "MLKV-2", "MLKV-1"]


def producer_layers(num_layers: int, num_producers: int) -> list[int]:
    """Producer positions as in the paper: ``[0] + [int((i+1)*L/n) for i in range(n-1)]``."""
    if not 1 <= num_producers <= num_layers:
        raise ValueError(
            f"number of producer layers ({num_producers}) must be between 1 and num_hidden_layers ({num_layers})"
        )
    return [0] + [int((i + 1) * num_layers / num_producers) for i in range(num_producers - 1)]


def sources_from_producers(num_layers: int, producers: list[int]) -> list[int]:
    """Each layer reads the nearest producer at or before it."""
    sources, current = [], None
    wanted = set(producers)
    for layer in range(num_layers):
        if layer in wanted:
            current = layer
        sources.append(current if current is not None else layer)
    return sources


@dataclass(frozen=True)
class SharingPlan:
    """A validated per-layer KV sharing map. Build it with ``SharingPlan(...)`` or ``resolve_plan(name, ...)``."""

    kv_source_layers: tuple[int, ...]
    num_key_value_heads: int
    num_attention_heads: int
    name: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "kv_source_layers", tuple(int(s) for s in self.kv_source_layers))
        validate_sharing(list(self.kv_source_layers), self.num_key_value_heads, self.num_attention_heads)

    # ---- derived values -------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.kv_source_layers)

    @property
    def producers(self) -> list[int]:
        return [i for i, s in enumerate(self.kv_source_layers) if s == i]

    @property
    def num_producers(self) -> int:
        return len(self.producers)

    @property
    def consumers(self) -> list[int]:
        return [i for i, s in enumerate(self.kv_source_layers) if s != i]

    @property
    def total_kv_heads(self) -> int:
        return self.num_producers * self.num_key_value_heads

    @property
    def structure(self) -> str:
        """The plan's structural name, ``<producer layers>x<KV heads per producer>``."""
        return f"{self.num_producers}x{self.num_key_value_heads}"

    def is_producer(self, layer: int) -> bool:
        return self.kv_source_layers[layer] == layer

    def served_by(self, producer: int) -> list[int]:
        """Layers (the producer included) that read ``producer``'s K/V."""
        return [i for i, s in enumerate(self.kv_source_layers) if s == producer]

    def kv_sharing_modes(self) -> list[str | None]:
        """transformers' per-layer cache modes: ``"reuse"`` layers get a ``DummyLayer`` that allocates nothing."""
        return [None if self.is_producer(i) else "reuse" for i in range(self.num_layers)]

    # ---- cache math -----------------------------------------------------------------------------------------------
    def kv_bytes_per_token(self, head_dim: int, dtype: torch.dtype | str = "float16") -> int:
        """2 (K and V) x producer layers x KV heads x head_dim x bytes per element."""
        return 2 * self.total_kv_heads * head_dim * dtype_bytes(dtype)

    def kv_bytes_per_sequence(self, head_dim: int, context: int, dtype: torch.dtype | str = "float16") -> int:
        return self.kv_bytes_per_token(head_dim, dtype) * context


#: Bytes per element of the dtypes the cache math usually meets (a torch dtype is read by its itemsize).
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "float8_e4m3fn": 1}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32",
                 "fp8": "float8_e4m3fn"}


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype or its name (``"fp16"``, ``"bfloat16"``, ``"float32"`` ...)."""
    if not isinstance(dtype, str):
        return dtype.itemsize
    name = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name in DTYPE_BYTES:
        return DTYPE_BYTES[name]
    import torch

    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"dtype ({dtype!r}) is not a torch dtype name; use e.g. fp16, bf16 or fp32")
    return getattr(torch, name).itemsize


def validate_sharing(kv_source_layers: list[int], num_key_value_heads: int, num_attention_heads: int,
                     num_hidden_layers: int | None = None) -> None:
    """Raise ``ValueError`` naming the field, the value and the rule for any invalid plan."""
    if num_key_value_heads < 1:
        raise ValueError(f"num_key_value_heads ({num_key_value_heads}) must be at least 1")
    if num_attention_heads % num_key_value_heads != 0:
        raise ValueError(
            f"num_attention_heads ({num_attention_heads}) must be divisible by num_key_value_heads "
            f"({num_key_value_heads})"
        )
    if num_hidden_layers is not None and len(kv_source_layers) != num_hidden_layers:
        raise ValueError(
            f"kv_source_layers has {len(kv_source_layers)} entries but num_hidden_layers is {num_hidden_layers}: "
            "the list length must equal the number of layers"
        )
    if not kv_source_layers:
        raise ValueError("kv_source_layers ([]) must name a source for every layer: at least one producer is needed")
    if kv_source_layers[0] != 0:
        raise ValueError(f"kv_source_layers[0] ({kv_source_layers[0]}) must be 0: layer 0 must be a producer")
    for layer, source in enumerate(kv_source_layers):
        if source < 0:
            raise ValueError(f"kv_source_layers[{layer}] ({source}) must be a layer index >= 0")
        if source > layer:
            raise ValueError(
                f"kv_source_layers[{layer}] ({source}) comes after its consumer: a source may not come after "
                "the layer that reads it"
            )
        if kv_source_layers[source] != source:
            raise ValueError(
                f"kv_source_layers[{layer}] ({source}) is itself a consumer of layer {kv_source_layers[source]}: "
                "the source of a consumer must itself be a producer"
            )


def plan_from_structure(num_layers: int, num_heads: int, num_producers: int, kv_heads: int,
                        name: str | None = None) -> SharingPlan:
    """``num_producers`` producers placed as in the paper, each with ``kv_heads`` KV heads."""
    producers = producer_layers(num_layers, num_producers)
    return SharingPlan(tuple(sources_from_producers(num_layers, producers)), kv_heads, num_heads, name)


def _factorizations(total: int, num_layers: int, num_heads: int) -> list[str]:
    return [f"{p}x{total // p}" for p in range(1, num_layers + 1)
            if total % p == 0 and total // p >= 1 and num_heads % (total // p) == 0]


def resolve_plan(name: str | list[int] | SharingPlan, num_layers: int, num_heads: int,
                 kv_heads: int | None = None) -> SharingPlan:
    """Turn a plan name (see the module docstring) or an explicit list into a validated ``SharingPlan``.

    ``kv_heads``: the source model's K/V heads per layer, for a GQA source (SmolLM2: 9 query heads, 3 K/V heads).
    Names that mean "every head" (``mha``, ``cla-K``, an explicit list without ``:K``) then keep the source's K/V
    heads, and a plan with more K/V heads per producer than the source has is refused: its extra heads would be
    copies that only enlarge the cache."""
    source_kv = kv_heads or num_heads
    plan = _resolve(name, num_layers, num_heads, source_kv)
    if plan.num_key_value_heads > source_kv:
        raise ValueError(
            f"plan {plan.name or name!r} gives each producer {plan.num_key_value_heads} K/V heads, more than the "
            f"source model's {source_kv}: the extra heads would be copies that only enlarge the cache; use at most "
            f"{source_kv} (e.g. {plan.num_producers}x{source_kv})")
    return plan


def _resolve(name: str | list[int] | SharingPlan, num_layers: int, num_heads: int, source_kv: int) -> SharingPlan:
    if isinstance(name, SharingPlan):
        if name.num_layers != num_layers or name.num_attention_heads != num_heads:
            raise ValueError(
                f"plan is for {name.num_layers} layers x {name.num_attention_heads} heads, model has "
                f"{num_layers} x {num_heads}"
            )
        return name
    if isinstance(name, (list, tuple)):
        validate_sharing(list(name), source_kv, num_heads, num_layers)
        return SharingPlan(tuple(name), source_kv, num_heads, None)
    key = name.strip().lower()
    display = name.strip()

    if (num_layers, num_heads) == PAPER_SHAPE and key in PAPER_GRID:
        p, k = PAPER_GRID[key]
        return plan_from_structure(num_layers, num_heads, p, k, display.upper())
    if key == "mha":  # every layer a producer with every K/V head of the source
        return plan_from_structure(num_layers, num_heads, num_layers, source_kv,
                                   "MHA" if source_kv == num_heads else f"{num_layers}x{source_kv}")
    if key == "mqa":
        return plan_from_structure(num_layers, num_heads, num_layers, 1, "MQA")
    if m := re.fullmatch(r"(\d+)x(\d+)", key):
        return plan_from_structure(num_layers, num_heads, int(m[1]), int(m[2]), display)
    if m := re.fullmatch(r"cla-(\d+)", key):
        k = int(m[1])
        if k < 1:
            raise ValueError(f"cla group size ({k}) must be at least 1")
        producers = list(range(0, num_layers, k))
        return SharingPlan(tuple(sources_from_producers(num_layers, producers)), source_kv, num_heads, display)
    if m := re.fullmatch(r"(mha|mqa|gqa|mlkv)-(\d+)", key):
        kind, total = m[1], int(m[2])
        if total < 1:
            raise ValueError(f"plan name {name!r}: the number of KV heads ({total}) must be at least 1")
        options = ", ".join(_factorizations(total, num_layers, num_heads)) or "none fits this shape"
        if kind == "mha" and total == num_layers * num_heads:
            return plan_from_structure(num_layers, num_heads, num_layers, num_heads, display.upper())
        if kind == "mqa" and total == num_layers:
            return plan_from_structure(num_layers, num_heads, num_layers, 1, display.upper())
        if kind == "gqa" and total % num_layers == 0 and num_heads % (total // num_layers) == 0:
            return plan_from_structure(num_layers, num_heads, num_layers, total // num_layers, display.upper())
        if kind == "mlkv" and 1 <= total <= num_layers:
            return plan_from_structure(num_layers, num_heads, total, 1, display.upper())
        raise ValueError(
            f"plan name {name!r} is ambiguous or impossible for a model with {num_layers} layers x {num_heads} heads "
            f"(its meaning in the MLKV paper holds for 12 x 12); use the explicit form <producer layers>x<KV heads>, "
            f"e.g. one of: {options}"
        )
    if re.fullmatch(r"\d+", key):
        raise ValueError(f"plan name {name!r} is a single number: did you mean {key}x1 or mlkv-{key}?")
    if re.fullmatch(r"\d+(\s*,\s*\d+)*(:\d+)?", key):
        sources, _, heads = key.partition(":")
        validate_sharing([int(s) for s in sources.split(",")], int(heads) if heads else source_kv, num_heads,
                         num_layers)
        return SharingPlan(tuple(int(s) for s in sources.split(",")), int(heads) if heads else source_kv,
                           num_heads, display)
    raise ValueError(
        f"plan name {name!r} is not understood: use <producers>x<kv heads> (e.g. 6x1), mha, mqa, gqa-N, mlkv-N, "
        "cla-K, a paper name (MHA-144 ... MLKV-1) or an explicit list like 0,0,2,2[:kv_heads]"
    )


def default_grid(num_layers: int, num_heads: int, kv_heads: int | None = None) -> list[str]:
    """The plans to compare on a shape, in the paper's spirit.

    The paper's nine names on its 12 x 12 MHA shape. For a GQA/MQA source with K K/V heads per layer (L layers):
    the original LxK; at 1/K of its cache, cross-layer (L/K)xK against in-layer Lx1; at 1/(2K), (L/2K)xK against
    (L/2)x1; then 6x1, 3x1, 2x1 and 1x1 (SmolLM2, 30 x 9 with 3 K/V heads: 30x3, 10x3, 30x1, 5x3, 15x1, 6x1, 3x1,
    2x1, 1x1). Any other MHA shape: mha and mqa."""
    k = kv_heads or num_heads
    if (num_layers, num_heads) == PAPER_SHAPE and k == num_heads:
        return list(PAPER_PRESETS)
    if k == num_heads:
        return ["mha", "mqa"]
    names = [f"{num_layers}x{k}"]
    for fraction in (k, 2 * k):
        if k > 1 and num_layers // fraction >= 1:
            names += [f"{num_layers // fraction}x{k}", f"{max(1, num_layers * k // fraction)}x1"]
    names += [f"{p}x1" for p in (6, 3, 2, 1) if p <= num_layers]
    return list(dict.fromkeys(names))  # in order, without repeats


def paper_grid(num_layers: int = 12, num_heads: int = 12) -> list[SharingPlan]:
    """The paper's nine configurations (only defined on the 12 x 12 shape)."""
    return [resolve_plan(n, num_layers, num_heads) for n in PAPER_PRESETS]
