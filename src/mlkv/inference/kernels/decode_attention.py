"""Grouped split-K decode attention: one query per row against a static K/V cache, in two Triton kernels.

Shapes. ``q`` is (B, H, D) or (B, H, 1, D); the output has ``q``'s shape and dtype. ``k_cache`` / ``v_cache`` are
(B, H_kv, T_max, D) views of the static cache, possibly non-contiguous slices of a bigger buffer (any strides, but
the last dimension contiguous). ``start`` / ``end`` are int32 (or int64) device tensors of shape (B,): row ``b``
attends to columns ``[start[b], end[b])`` (left padding and per-row positions without a mask tensor), clamped to
``[0, T_max)``. Query head ``h`` reads K/V head ``h // G`` with ``G = H // H_kv`` (the grouping of
``repeat_interleave`` / ``enable_gqa``).

Why pack the group into M. A decode step has one query per head, so a program that handles one query head does a
(1 x D) @ (D x N) product: the tensor cores idle and, worse, the G query heads that share a K/V head each re-read
it. One program per (row, K/V head, split) instead loads the G queries as the M rows of a tile (padded to a power
of two >= 16, the smallest ``tl.dot`` shape; the padding rows are loaded as zeros and never stored), so each K/V
block is read from HBM once for the whole group: a layer reads exactly its cache, whatever G is. If G exceeds 64 the
group is cut into several M blocks along grid axis 1 (each re-reads the head; no real model here has such a G).

Why split K (FlashDecoding). With one K/V head and a small batch, (B x H_kv) programs cannot fill 132 SMs: the
issue measured SDPA's memory-efficient kernel at 19 us for B=1 where MHA takes 6. So each row's valid columns are
also divided over ``num_splits`` programs (grid axis 2). ``num_splits`` depends only on (B, H_kv, T_max, SM count)
(``choose_num_splits``), never on data, so one CUDA graph per (batch, cache-length) bucket captures it. Inside a
row, the split boundaries follow that row's own ``[start, end)`` (in BLOCK_N-aligned blocks): ragged rows get
balanced splits, and a split left with no block (short row, more splits than blocks, empty row) writes
``lse = -inf`` and zeros.

How the merge works. Split ``s`` computes, for its columns C_s, the running max m_s and sum l_s of
``2^(x - m_s)`` (scores pre-multiplied by ``scale * log2(e)`` so ``exp2`` is used), and stores the normalised partial
output ``o_s = sum_j 2^(x_j - m_s) v_j / l_s`` (fp32) and ``lse_s = m_s + log2(l_s)`` (-inf when C_s is empty). The
second kernel reads the S partials of one (row, head) as an (S x D) tile: with ``M = max_s lse_s`` and
``w_s = 2^(lse_s - M)``, the exact softmax over all columns is ``sum_s w_s o_s / sum_s w_s``. If every split is
empty (``start == end``) all ``w_s`` are zero and the output is zeros, not NaN. With one split there is nothing to
merge: stage 1 writes the normalised output straight into ``out`` and the second kernel is not launched.

Tuning (H100 / H200, bf16/fp16). The kernel is bound by HBM reads, so the tile only has to keep enough bytes in
flight: BLOCK_N = 128 columns for D = 64 and 64 for D = 128 make every K and V tile 16 KB; 4 warps (M is only 16,
more warps would only split N further); 3 pipeline stages, so the next block's K and V are in flight (cp.async)
while the current one is multiplied. Compiled for sm_90 (Triton 3.6, bf16, D = 64) that is 72 KB of shared memory
and 106 registers, no spills: three programs resident per SM. fp32 (tests, the engine's fp32 equality check) uses
BLOCK_N = 32 and 2 stages, with IEEE dots instead of TF32. ``choose_num_splits`` aims at ``4 x SMs`` programs
(a bit over one wave of three per SM, so short rows and the tail even out), never more splits than BLOCK_N blocks
in ``T_max`` nor than ``MAX_SPLITS``. These are first guesses from the shapes, not measurements:
``benchmarks/decode_kernel.py --tune`` sweeps BLOCK_N, warps, stages and the split count on the real GPU.

Entry points: ``decode_attention`` (the op ``torch.ops.mlkv.decode_attention``, opaque to ``torch.compile`` through
its fake implementation, capturable in CUDA graphs: no host sync, scratch from the caching allocator),
``decode_attention_reference`` (eager fp32, the ground truth) and ``supported`` (when the engine may use it). Triton
is imported lazily, on the first launch, so importing this module needs only torch. Under ``TRITON_INTERPRET=1`` the
kernels run on CPU tensors in Triton's interpreter; it must be set before Triton is first imported (Triton's own
``tl.cdiv``, ``tl.max``... are decorated then), and ``import torch._dynamo`` (so transformers, so ``mlkv``) already
imports Triton: set it in the environment of the process.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["decode_attention", "decode_attention_reference", "supported", "choose_num_splits", "MAX_SPLITS"]

LOG2E = 1.4426950408889634
MAX_SPLITS = 128  # the merge loads all splits of a (row, head) as one (next_pow2(S) x D) tile
MAX_BLOCK_M = 64  # query heads per tile; a larger group is cut into several M blocks
HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile and launch constants (see the module docstring for why)."""
    if dtype == torch.float32:
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_N": 128 if head_dim <= 64 else 64, "num_warps": 4, "num_stages": 3}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(batch: int, kv_heads: int, t_max: int, sm_count: int, block_n: int = 128) -> int:
    """Splits per (row, K/V head): enough programs for ``4 x sm_count``, at most one per BLOCK_N block of ``t_max``
    and at most ``MAX_SPLITS``. A pure function of shapes, so a CUDA graph captured per bucket stays valid."""
    want = -(-4 * sm_count // max(batch * kv_heads, 1))
    blocks = max(-(-t_max // block_n), 1)
    return max(1, min(want, blocks, MAX_SPLITS))


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None = None) -> bool:
    """Whether ``decode_attention`` can run these tensors on the GPU; otherwise the engine keeps SDPA.

    CUDA tensors with Triton installed, bf16/fp16/fp32 (all three the same), head_dim 64 or 128, H a multiple of
    H_kv, the last dimension contiguous, q of shape (B, H, D) or (B, H, 1, D) and caches (B, H_kv, T, D)."""
    tensors = [q, k_cache] + ([] if v_cache is None else [v_cache])
    if not all(t.is_cuda and t.device == q.device and t.dtype == q.dtype for t in tensors):
        return False
    if q.dtype not in DTYPES or not _triton_available():
        return False
    if k_cache.dim() != 4 or q.dim() not in (3, 4) or (q.dim() == 4 and q.shape[2] != 1):
        return False
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    if D not in HEAD_DIMS or k_cache.shape[0] != B or k_cache.shape[-1] != D or H % k_cache.shape[1]:
        return False
    if v_cache is not None and v_cache.shape != k_cache.shape:
        return False
    return all(t.stride(-1) == 1 for t in tensors)


def decode_attention_reference(q, k_cache, v_cache, start, end, scale: float) -> torch.Tensor:
    """Eager fp32 ground truth: softmax over columns ``[start, end)`` of each row; an empty row gives zeros.
    Returns fp32 in ``q``'s shape."""
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    qf = q.reshape(B, Hkv, H // Hkv, D).float()  # (B, H_kv, G, D): query head h = kv * G + g
    scores = torch.einsum("bkgd,bktd->bkgt", qf, k_cache.float()) * scale  # (B, H_kv, G, T)
    cols = torch.arange(T, device=q.device)
    valid = (cols[None] >= start[:, None].long()) & (cols[None] < end[:, None].long())  # (B, T)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all -inf row (empty) gives NaN: make it zeros
    out = torch.einsum("bkgt,bktd->bkgd", probs, v_cache.float())  # (B, H_kv, G, D)
    return out.reshape(q.shape)  # (B, H, D) or (B, H, 1, D)


def decode_attention(q, k_cache, v_cache, start, end, scale: float, *, num_splits: int | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per row over the columns ``[start, end)`` of a static cache (module docstring: shapes).

    ``num_splits``: programs per (row, K/V head) along the sequence; ``None`` picks ``choose_num_splits`` from the
    shapes and the SM count. ``out``: optional destination in ``q``'s shape and dtype (last dimension contiguous).
    Dispatches to ``torch.ops.mlkv.decode_attention`` / ``decode_attention_out``."""
    splits = 0 if num_splits is None else int(num_splits)
    if splits < 0 or splits > MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS} (or None), got {num_splits}")
    if out is None:
        return torch.ops.mlkv.decode_attention(q, k_cache, v_cache, start, end, float(scale), splits)
    torch.ops.mlkv.decode_attention_out(q, k_cache, v_cache, start, end, float(scale), splits, out)
    return out


def _check(q, k_cache, v_cache, start, end) -> None:
    """Shape-only checks (no device sync)."""
    if q.dim() not in (3, 4) or (q.dim() == 4 and q.shape[2] != 1):
        raise ValueError(f"q must be (B, H, D) or (B, H, 1, D), got {tuple(q.shape)}")
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[-1] != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches must be (B, H_kv, T, D) matching q {tuple(q.shape)}: "
                         f"k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if H % k_cache.shape[1]:
        raise ValueError(f"{H} query heads are not a multiple of {k_cache.shape[1]} K/V heads")
    if start.shape != (B,) or end.shape != (B,) or {start.dtype, end.dtype} - {torch.int32, torch.int64}:
        raise ValueError(f"start and end must be int32/int64 of shape ({B},), got {tuple(start.shape)} "
                         f"{start.dtype} and {tuple(end.shape)} {end.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache)):
        raise ValueError("q, k_cache and v_cache need a contiguous last dimension")


@torch.library.custom_op("mlkv::decode_attention_out", mutates_args=("out",))
def _decode_attention_out(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
                          end: torch.Tensor, scale: float, num_splits: int, out: torch.Tensor) -> None:
    _check(q, k_cache, v_cache, start, end)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must match q: {tuple(out.shape)} {out.dtype} vs {tuple(q.shape)} {q.dtype}")
    _launch(q, k_cache, v_cache, start, end, scale, num_splits, out)


@_decode_attention_out.register_fake
def _(q, k_cache, v_cache, start, end, scale, num_splits, out) -> None:
    return None


@torch.library.custom_op("mlkv::decode_attention", mutates_args=())
def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
                      end: torch.Tensor, scale: float, num_splits: int) -> torch.Tensor:
    _check(q, k_cache, v_cache, start, end)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch(q, k_cache, v_cache, start, end, scale, num_splits, out)
    return out


@_decode_attention.register_fake
def _(q, k_cache, v_cache, start, end, scale, num_splits):
    return q.new_empty(q.shape)


def _f32_dot(dtype: torch.dtype) -> bool:
    """fp32 operands and IEEE dots: for fp32 inputs (no TF32), and for bf16 under the interpreter, whose ``tl.dot``
    multiplies bf16 bit patterns as integers (Triton 3.6 keeps bf16 as uint16 in numpy)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting())


def _launch(q, k_cache, v_cache, start, end, scale, num_splits, out, config: dict | None = None) -> None:
    """Both stages on the current stream. Only shapes and strides reach the host: nothing syncs. ``config``
    overrides ``_config`` (BLOCK_N, num_warps, num_stages): for ``benchmarks/decode_kernel.py --tune`` only."""
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    if B == 0 or H == 0:
        return
    stage1, merge = _kernels()
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    cfg = {**_config(D, q.dtype), **(config or {})}
    block_m = min(max(16, 1 << (G - 1).bit_length()), MAX_BLOCK_M)  # next power of two of G, within [16, 64]
    m_blocks = -(-G // block_m)
    if num_splits == 0:
        sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
            if q.is_cuda else 4
        num_splits = choose_num_splits(B, Hkv, T, sms, cfg["BLOCK_N"])
    q3, o3 = q.reshape(B, H, D), out.view(B, H, D)  # (B, H, D): drop the length-1 query axis if present
    direct = num_splits == 1
    if direct:
        part_o, part_lse = out, out  # unused by stage 1 when DIRECT
    else:
        part_o = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)  # (B, H, S, D)
        part_lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)  # (B, H, S)
    stage1[(B, Hkv * m_blocks, num_splits)](
        q3, k_cache, v_cache, start, end, part_o, part_lse, o3, scale * LOG2E,
        q3.stride(0), q3.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o3.stride(0), o3.stride(1),
        H, G, T, num_splits, M_BLOCKS=m_blocks, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], HEAD_DIM=D,
        DIRECT=direct, F32_DOT=_f32_dot(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if not direct:
        merge[(B * H,)](part_o, part_lse, o3, H, o3.stride(0), o3.stride(1), num_splits,
                        BLOCK_S=max(2, 1 << (num_splits - 1).bit_length()), HEAD_DIM=D, num_warps=4)


@functools.lru_cache(maxsize=None)
def _kernels():
    """Import Triton and define the two kernels, once (``triton.jit`` reads ``TRITON_INTERPRET`` here; Triton's own
    library functions read it when Triton is first imported)."""
    try:
        import triton
        import triton.language as tl
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("mlkv's decode_attention kernel needs Triton (pip install triton); "
                           "the engine falls back to SDPA when `supported` is False") from e
    return _define_stage1(triton, tl), _define_merge(triton, tl)


def _define_stage1(triton, tl):
    @triton.jit
    def _stage1(Q, K, V, Start, End, PartO, PartLse, Out, qk_scale,
                stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                stride_ob, stride_oh, H, G, T, num_splits,
                M_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                DIRECT: tl.constexpr, F32_DOT: tl.constexpr):
        """Program (row b, K/V head x M block, split s): its share of the row's blocks for G packed query heads."""
        b = tl.program_id(0)
        kv = tl.program_id(1) // M_BLOCKS
        g = (tl.program_id(1) % M_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)  # (M,) heads within the group
        s_id = tl.program_id(2)
        heads = kv * G + g  # (M,) query heads
        row_ok = g < G
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None],
                    other=0.0)  # (M, D)
        if F32_DOT:
            q = q.to(tl.float32)
        start = tl.maximum(tl.load(Start + b).to(tl.int32), 0)
        end = tl.minimum(tl.load(End + b).to(tl.int32), T)  # never read past the cache view
        first = start // BLOCK_N
        n_blocks = tl.where(end > start, tl.cdiv(end, BLOCK_N) - first, 0)
        per_split = tl.cdiv(n_blocks, num_splits)
        lo = first + s_id * per_split
        hi = tl.minimum(lo + per_split, first + n_blocks)
        K += b.to(tl.int64) * stride_kb + kv.to(tl.int64) * stride_kh
        V += b.to(tl.int64) * stride_vb + kv.to(tl.int64) * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for blk in range(lo, hi):  # online softmax over this split's blocks
            cols = blk * BLOCK_N + tl.arange(0, BLOCK_N)  # (N,)
            ok = (cols >= start) & (cols < end)
            k = tl.load(K + cols[:, None] * stride_kt + dims[None, :], mask=ok[:, None], other=0.0)  # (N, D)
            if F32_DOT:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))  # (M, N) fp32
            s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block of a split holds a valid column
            alpha = tl.exp2(m_i - m_new)  # (M,)
            p = tl.exp2(s - m_new[:, None])  # (M, N)
            v = tl.load(V + cols[:, None] * stride_vt + dims[None, :], mask=ok[:, None], other=0.0)  # (N, D)
            if F32_DOT:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)  # (M, D) fp32
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        has = l_i > 0  # False for an empty split: then acc is 0 and lse is -inf
        o = acc / tl.where(has, l_i, 1.0)[:, None]  # (M, D)
        if DIRECT:
            tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                     o.to(Out.dtype.element_ty), mask=row_ok[:, None])
        else:
            part = (b * H + heads) * num_splits + s_id  # (M,) index into (B, H, S)
            tl.store(PartO + part[:, None] * HEAD_DIM + dims[None, :], o, mask=row_ok[:, None])
            tl.store(PartLse + part, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")),
                     mask=row_ok)

    return _stage1


def _define_merge(triton, tl):
    @triton.jit
    def _merge(PartO, PartLse, Out, H, stride_ob, stride_oh, num_splits,
               BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Program (row, query head): the lse-weighted mean of its splits' normalised partial outputs."""
        pid = tl.program_id(0)  # b * H + h
        b = pid // H
        h = pid % H
        splits = tl.arange(0, BLOCK_S)
        dims = tl.arange(0, HEAD_DIM)
        ok = splits < num_splits
        lse = tl.load(PartLse + pid * num_splits + splits, mask=ok, other=float("-inf"))  # (S,)
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)  # all splits empty: weights become 0, not NaN
        w = tl.exp2(lse - top)  # (S,)
        o = tl.load(PartO + (pid * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None],
                    other=0.0)  # (S, D)
        den = tl.sum(w, 0)
        res = tl.sum(w[:, None] * o, 0) / tl.where(den > 0, den, 1.0)  # (D,)
        tl.store(Out + b * stride_ob + h * stride_oh + dims, res.to(Out.dtype.element_ty))

    return _merge
