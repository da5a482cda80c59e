"""The benchmark's settings, declared once: ``run_bench`` takes them and ``mlkv bench`` builds its flags from them.

Each field is a flag (``batch`` -> ``--batch``; a bool ``hf`` -> ``--hf`` / ``--no-hf``); its docstring is the
flag's help. ``None`` means "the default for the model and device", filled in by ``run_bench``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlkv.inference.attention import DECODE_ATTENTION
from mlkv.settings import setting

__all__ = ["BenchSettings", "parse_bucket"]


@dataclass
class BenchSettings:
    plans: list[str] | None = setting(None, metavar="PLAN")
    """Sharing plans (names or comma lists; default: the paper's nine on a 12x12 shape, else MHA and MQA; a
    checkpoint: its own plan)."""
    budget_gb: float | None = setting(None, group="memory search")
    """Memory budget of the max-batch / max-context searches in GB (default: the card's memory; on CPU a simulated
    allocator with 4 GB)."""
    context: int | None = setting(None, group="memory search")
    """Context of the max-batch search (default 2048, at most max_position_embeddings)."""
    context_batch: int = setting(64, group="memory search")
    """Batch of the max-context search."""
    search: bool = setting(True, group="memory search")
    """Run the max-batch / max-context searches (--no-search skips them)."""
    batch: list[int | str] | None = setting(None, group="generate runs", metavar="N")
    """Batch sizes of the generate runs (numbers or comma lists; default 1 64)."""
    prompt_len: int | None = setting(None, group="generate runs")
    """Prompt length of the generate runs (default 512, at most a quarter of max_position_embeddings)."""
    new_tokens: int | None = setting(None, group="generate runs")
    """New tokens of the generate runs (default 128; 32 with --quick)."""
    step_context: int | None = setting(None, group="decode-step runs")
    """Context of the decode-step runs (default 1024, at most half of max_position_embeddings)."""
    step_batch: list[int | str] | None = setting(None, group="decode-step runs", metavar="N")
    """Batch sizes of the decode-step runs (default 1 64 128 256; 1 64 with --quick)."""
    step_tokens: int | None = setting(None, group="decode-step runs")
    """Decode steps timed per step run (default 32; 16 with --quick)."""
    device: str | None = None
    """cuda or cpu (default: cuda when available)."""
    dtype: str | None = None
    """bf16 (default on cuda), fp16 or fp32 (default on cpu)."""
    repeats: int | None = None
    """Timed engine runs per point, median (default 3; 1 with --quick)."""
    bucket: int | str | None = setting("auto", metavar="N|auto|none")
    """Engine decode steps attend over the used cache columns rounded up to this many (auto: 256, or the whole
    cache when compiled; none: the whole cache)."""
    decode_attention: str = setting("sdpa", choices=DECODE_ATTENTION)
    """The engine's decode attention: sdpa (PyTorch's, with the mask), triton (mlkv's grouped split-K kernel, CUDA)
    or auto (the kernel where it supports the model). Run the bench once per choice to compare them."""
    hf: bool = setting(True, group="transformers")
    """Time transformers' generate() (dynamic and static cache) next to the engine (--no-hf skips it)."""
    hf_repeats: int = setting(1, group="transformers")
    """Timed transformers runs per point (median)."""
    hf_max_batch: int = setting(64, group="transformers")
    """Largest batch run through transformers."""
    hf_compile: bool = setting(False, group="transformers")
    """Let transformers auto-compile its static-cache path (slow to compile per shape)."""
    compile: bool = setting(False, group="compiled engine")
    """Also time the engine with torch.compile'd decode steps (generate and step runs with batch <=
    --compile-max-batch; one compilation per plan and run shape, run last)."""
    compile_plans: list[str] | None = setting(None, group="compiled engine", metavar="PLAN")
    """Plans for --compile (default: all)."""
    compile_max_batch: int = setting(1, group="compiled engine")
    """Largest batch of the generate and step runs timed with --compile."""
    deadline_s: float | None = None
    """Skip transformers runs, searches and compiled runs once this many seconds have passed."""
    quick: bool = False
    """Fewer tokens, repeats and batch sizes."""
    seed: int = 0
    """Seed of the random weights and prompts."""
    out: str | None = None
    """Directory for inference.json / .csv / plots (default: write nothing)."""
    progress: bool = True
    """Show a progress bar on stderr (--no-progress hides it)."""
    strict: bool = setting(False, cli=False)
    """Raise on a failed measurement instead of recording it in meta["errors"] and going on."""


def parse_bucket(value: str | int | None) -> int | str | None:
    """``--bucket``: ``"auto"``, ``"none"`` (-> ``None``) or a number of cache columns."""
    if value is None or isinstance(value, int) or value == "auto":
        return value
    if value == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--bucket ({value!r}) must be a positive integer, 'none' or 'auto'") from None
