"""One layer's decode attention, four ways: mlkv's grouped split-K Triton kernel against SDPA and FlexAttention.

For 12 query heads of head_dim 64 (Pythia-160M's attention) in groups of 1, 3 and 12 query heads per K/V head
(MHA, GQA-4, MQA / MLKV), batches 1, 8, 64, 256 and contexts 512 to 8,192, bf16, rows left-padded by 0-63 tokens
(valid columns ``[pad, T)``):

* ``ours``: ``mlkv.inference.kernels.decode_attention`` (per-row ``[start, end)`` from device tensors, default split
  count).
* ``sdpa_mask``: SDPA as the engine calls it today: the group folded into the query axis, an additive mask.
* ``sdpa_flash``: SDPA's flash kernel without a mask (cannot express the padding; the dense upper bound).
* ``flex``: ``flex_attention`` compiled (its decode path for one query), ``enable_gqa``, a BlockMask whose
  ``mask_mod`` reads each row's ``[start, end)``.

Each number is the GPU time of one call inside a CUDA graph of many calls (what the engine's graphs see; eager
launch overhead is reported separately as ``us_eager``), over rotating copies of the cache so that reads come from
HBM, not L2 (``--warm-l2`` to reuse one copy; shapes under ~1.5 MB still fit 32 copies in L2, but those are
latency-bound anyway). The bandwidth column is the K/V bytes a call must read
(``B x H_kv x T x D x 2 x 2``) over its time, as a fraction of the device-copy bandwidth measured in the same run
((read + write) / time of a 1 GiB copy, the convention of ``mlkv bench``). Also reported: the max error against the
fp32 reference on the first rows for ``ours`` and ``sdpa_mask`` (the issue's bar: ours at most twice SDPA's).

    python benchmarks/decode_kernel.py --out benchmarks/results/decode_kernel_h200/decode_kernel.json
    python benchmarks/decode_kernel.py --kernels flex --batches 1 64 256 --contexts 1024 4096  # compiles per shape
    python benchmarks/decode_kernel.py --tune   # sweep BLOCK_N / warps / stages / splits on a few shapes

``--budget-s`` (default 480 s) stops starting new shapes so that one run fits a 10-minute device command; the
skipped shapes are listed in the report.

Prints a table and ends with one JSON line; ``--out`` also writes the JSON and a plot (``.png`` beside it). CUDA only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

KERNELS = ("ours", "sdpa_mask", "sdpa_flash", "flex")


def copy_bandwidth(device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """(bytes read + bytes written) / time of a device-to-device copy, median of ``iters``."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_(-1, 1)
    dst = torch.empty_like(src)
    times = []
    for i in range(iters + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * nbytes / sorted(times)[len(times) // 2]


def time_graph(fn, copies: int, calls: int = 40, reps: int = 5) -> float:
    """Seconds per call: ``calls`` calls (cycling over ``copies`` inputs) captured in one CUDA graph, replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            fn(i % copies)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / (reps * calls)


def time_eager(fn, copies: int, iters: int = 30) -> float:
    for i in range(3):
        fn(i % copies)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for i in range(iters):
        fn(i % copies)
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def make_inputs(B, H, H_kv, T, D, dtype, copies, max_pad, seed=0):
    """``copies`` independent (q, k, v) sets; one start/end for all (rows valid on ``[pad, T)``)."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    sets = [(torch.randn(B, H, 1, D, device=dev, dtype=dtype, generator=g),  # (B, H, 1, D)
             torch.randn(B, H_kv, T, D, device=dev, dtype=dtype, generator=g),  # (B, H_kv, T, D)
             torch.randn(B, H_kv, T, D, device=dev, dtype=dtype, generator=g)) for _ in range(copies)]
    start = torch.randint(0, max(1, min(max_pad, T - 1)), (B,), device=dev, generator=g).to(torch.int32)
    end = torch.full((B,), T, dtype=torch.int32, device=dev)
    return sets, start, end


def additive_mask(start, end, T, dtype):
    cols = torch.arange(T, device=start.device)
    allowed = (cols[None] >= start[:, None]) & (cols[None] < end[:, None])  # (B, T)
    mask = torch.zeros(allowed.shape[0], 1, 1, T, device=start.device, dtype=dtype)  # (B, 1, 1, T)
    return mask.masked_fill_(~allowed[:, None, None], torch.finfo(dtype).min)


def sdpa_grouped(q, k, v, mask, scale):
    """The engine's call: (B, H, 1, D) -> (B, H_kv, G, D) queries over (B, H_kv, T, D), optional mask."""
    B, H, _, D = q.shape
    out = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], H // k.shape[1], D), k, v, attn_mask=mask,
                                         scale=scale)  # (B, H_kv, G, D)
    return out.reshape(B, H, 1, D)


def kernel_fns(names, sets, start, end, scale, flex):
    """name -> fn(i) over input copy i."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from mlkv.inference.kernels import decode_attention

    T, dtype = sets[0][1].shape[2], sets[0][0].dtype
    fns = {}
    if "ours" in names:
        fns["ours"] = lambda i: decode_attention(*sets[i], start, end, scale)
    if "sdpa_mask" in names:
        mask = additive_mask(start, end, T, dtype)
        fns["sdpa_mask"] = lambda i: sdpa_grouped(*sets[i], mask, scale)
    if "sdpa_flash" in names:
        def flash(i):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa_grouped(*sets[i], None, scale)
        fns["sdpa_flash"] = flash
    if "flex" in names and flex is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx >= start[b]) & (kv_idx < end[b])

        bm = create_block_mask(mask_mod, start.shape[0], None, 1, T, device=start.device)
        gqa = sets[0][0].shape[1] != sets[0][1].shape[1]
        fns["flex"] = lambda i: flex(*sets[i], block_mask=bm, scale=scale, enable_gqa=gqa)
    return fns


def errors(fns, sets, start, end, scale, rows: int = 4) -> dict:
    """Max |error| against the fp32 reference on the first ``rows`` rows, for ours and sdpa_mask."""
    from mlkv.inference.kernels import decode_attention_reference

    q, k, v = (t[:rows] for t in sets[0])
    want = decode_attention_reference(q, k, v, start[:rows], end[:rows], scale)
    out = {}
    for name in ("ours", "sdpa_mask"):
        if name in fns:
            out[f"err_{name}"] = (fns[name](0)[:rows].float() - want).abs().max().item()
    return out


def measure_shape(args, G, B, T, bw, flex, l2_bytes) -> list[dict]:
    H, D, dtype = args.heads, args.head_dim, getattr(torch, args.dtype)
    H_kv = H // G
    kv_bytes = B * H_kv * T * D * 2 * dtype.itemsize
    copies = 1 if args.warm_l2 else max(1, min(args.max_copies, math.ceil(4 * l2_bytes / kv_bytes)))
    sets, start, end = make_inputs(B, H, H_kv, T, D, dtype, copies, args.max_pad)
    scale = D ** -0.5
    fns = kernel_fns(args.kernels, sets, start, end, scale, flex)
    errs = errors(fns, sets, start, end, scale)
    rows = []
    for name, fn in fns.items():
        row = {"group": G, "kv_heads": H_kv, "batch": B, "context": T, "kernel": name, "kv_bytes": kv_bytes,
               "copies": copies}
        try:
            row["us_eager"] = time_eager(fn, copies) * 1e6
            try:
                row["us"], row["timing"] = time_graph(fn, copies) * 1e6, "cuda_graph"
            except Exception as e:  # noqa: BLE001 - a kernel that cannot be captured is still timed eagerly
                row["us"], row["timing"], row["graph_error"] = row["us_eager"], "eager", repr(e)[:200]
            row["fraction_of_copy_bw"] = kv_bytes / (row["us"] * 1e-6) / bw
        except Exception as e:  # noqa: BLE001 - record and go on (e.g. no flash kernel for this shape)
            row["error"] = repr(e)[:300]
        rows.append(row)
    if rows:
        rows[0].update(errs)
    del sets, fns
    torch.cuda.empty_cache()
    return rows


def print_table(rows, bw, device_name: str):
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s ({device_name}); us per call in a CUDA graph, "
          f"[fraction of copy bandwidth]")
    names = [k for k in KERNELS if any(r["kernel"] == k for r in rows)]
    print(f"{'G':>3} {'H_kv':>4} {'B':>4} {'T':>5} {'KV MB':>8} " + " ".join(f"{n:>18}" for n in names)
          + f" {'err ours/sdpa':>16}")
    shapes = sorted({(r["group"], r["batch"], r["context"]) for r in rows})
    for G, B, T in shapes:
        rs = {r["kernel"]: r for r in rows if (r["group"], r["batch"], r["context"]) == (G, B, T)}
        first = next(iter(rs.values()))
        cells = []
        for n in names:
            r = rs.get(n, {})
            cells.append(f"{r['us']:>9.1f} [{r['fraction_of_copy_bw']:>5.0%}]" if "us" in r else f"{'-':>18}")
        e = rs.get("ours", {})
        err = f"{e.get('err_ours', float('nan')):.1e}/{e.get('err_sdpa_mask', float('nan')):.1e}"
        print(f"{G:>3} {first['kv_heads']:>4} {B:>4} {T:>5} {first['kv_bytes'] / 1e6:>8.1f} " + " ".join(cells)
              + f" {err:>16}")


def plot(rows, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    groups = sorted({r["group"] for r in rows})
    fig, axes = plt.subplots(2, len(groups), figsize=(5 * len(groups), 8), sharex="col", squeeze=False)
    for col, G in enumerate(groups):
        for name, marker in zip(KERNELS, "os^D"):
            pts = sorted((r["kv_bytes"] / 1e6, r["fraction_of_copy_bw"], r["us"]) for r in rows
                         if r["group"] == G and r["kernel"] == name and "us" in r)
            if pts:
                mb, frac, us = zip(*pts)
                axes[0][col].plot(mb, frac, marker, label=name, alpha=0.8)
                axes[1][col].plot(mb, us, marker, label=name, alpha=0.8)
        kv_heads = next(r["kv_heads"] for r in rows if r["group"] == G)
        axes[0][col].set_title(f"{kv_heads} K/V heads x {G} query heads each")
        axes[0][col].axhline(0.8, color="grey", lw=0.8, ls="--")
        axes[1][col].axhline(8, color="grey", lw=0.8, ls="--")
        for ax in (axes[0][col], axes[1][col]):
            ax.axvline(64, color="grey", lw=0.8, ls=":")
            ax.set_xscale("log")
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel("K+V bytes read per call (MB)")
    axes[0][0].set_ylabel("fraction of copy bandwidth (bar: 0.8 from 64 MB)")
    axes[1][0].set_ylabel("us per call (bar: 8 us at B=1)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def tune(args, bw) -> list[dict]:
    """Sweep the kernel's tile constants and split count on a few shapes; print the best per shape."""
    import importlib

    kmod = importlib.import_module("mlkv.inference.kernels.decode_attention")
    H, D, dtype = args.heads, args.head_dim, getattr(torch, args.dtype)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for G, B, T in [(12, 1, 2048), (12, 64, 1024), (12, 256, 2048), (3, 8, 4096), (1, 256, 2048), (1, 1, 1024)]:
        H_kv = H // G
        kv_bytes = B * H_kv * T * D * 2 * dtype.itemsize
        copies = max(1, min(args.max_copies, math.ceil(200e6 / kv_bytes)))
        sets, start, end = make_inputs(B, H, H_kv, T, D, dtype, copies, args.max_pad)
        best = None
        for block_n in (64, 128):
            base = kmod.choose_num_splits(B, H_kv, T, sms, block_n)
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    for splits in sorted({max(1, base // 2), base, min(kmod.MAX_SPLITS, base * 2)}):
                        cfg = {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
                        out = torch.empty_like(sets[0][0])

                        def fn(i, cfg=cfg, splits=splits, out=out):
                            kmod._launch(*sets[i], start, end, D ** -0.5, splits, out, config=cfg)
                        try:
                            us = time_graph(fn, copies) * 1e6
                        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                            print(f"  skip {cfg} splits={splits}: {repr(e)[:120]}")
                            continue
                        row = {"group": G, "batch": B, "context": T, **cfg, "splits": splits, "default": base,
                               "us": us, "fraction_of_copy_bw": kv_bytes / (us * 1e-6) / bw}
                        rows.append(row)
                        best = row if best is None or us < best["us"] else best
        default = [r for r in rows if (r["group"], r["batch"], r["context"]) == (G, B, T)
                   and (r["BLOCK_N"], r["num_warps"], r["num_stages"]) == tuple(kmod._config(D, dtype).values())
                   and r["splits"] == r["default"]]
        print(f"G={G:>2} B={B:>3} T={T:>5}: best {best}; default {default[0]['us'] if default else '-'} us")
        del sets
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 3, 12])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--max-pad", type=int, default=64, help="rows are left-padded by 0..max_pad-1 columns")
    parser.add_argument("--warm-l2", action="store_true", help="reuse one cache copy (reads may come from L2)")
    parser.add_argument("--max-copies", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting new shapes after this long")
    parser.add_argument("--tune", action="store_true", help="sweep the kernel's constants instead")
    parser.add_argument("--out", type=Path, help="write the JSON here and a plot beside it (.png)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode_kernel.py measures CUDA kernels and needs a CUDA device; none here.")
    began = time.time()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    props = torch.cuda.get_device_properties(dev)
    report = {"benchmark": "decode_kernel", "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "triton": _triton_version(), "sm_count": props.multi_processor_count, "copy_bytes_per_s": bw,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if args.tune:
        report["tune"] = tune(args, bw)
        return _finish(report, args.out)
    flex = _compiled_flex() if "flex" in args.kernels else None
    rows, skipped = [], []
    for G in args.groups:
        for B in args.batches:
            for T in args.contexts:
                if time.time() - began > args.budget_s:
                    skipped.append([G, B, T])
                    continue
                rows += measure_shape(args, G, B, T, bw, flex, getattr(props, "L2_cache_size", 50 << 20))
    print_table(rows, bw, report["device"])
    if skipped:
        print(f"out of --budget-s {args.budget_s}: skipped (G, B, T) {skipped}")
    report.update(rows=rows, skipped_for_budget=skipped, seconds=time.time() - began)
    if args.out:
        plot(rows, args.out.with_suffix(".png"))
    return _finish(report, args.out)


def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.cache_size_limit = 256  # one compiled kernel per shape (dynamic=False)
    torch._dynamo.config.accumulated_cache_size_limit = 1024
    return torch.compile(flex_attention, dynamic=False)


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _finish(report: dict, out: Path | None) -> dict:
    if out is not None:
        from report import finish

        return finish(report, out)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
