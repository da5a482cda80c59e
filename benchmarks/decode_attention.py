"""Decode attention alone: one query per row over a 1024-token context, the kernels the engine could use.

For K/V heads 12 (MHA-144's layers) and 1 (MQA / MLKV layers, 12 query heads share it), batches 64/128/256, bf16,
head_dim 64, rows left-padded by 0-63 tokens: the time of one attention call and the K/V bytes it must read
(``B x H_kv x T x D x 2 x 2``) over that time, as a fraction of the copy bandwidth measured in the same run.

* ``engine``: ``mlkv.inference.attention.engine_attention`` as the engine's SDPA backend calls it: additive mask,
  memory-efficient SDPA, over the 256-column bucket (1280 columns for context 1024).
* ``engine_exact``: the same over exactly the used columns (rounded up to 16).
* ``flash_nomask``: SDPA's flash kernel with no mask (rows not padded; an upper bound for a dense kernel).
* ``flex``: ``torch.nn.attention.flex_attention`` compiled, a BlockMask of partial blocks whose ``mask_mod`` reads
  each row's padding and the current column from device tensors (so one compiled kernel serves every step).

    python benchmarks/decode_attention.py --out benchmarks/results/decode_attention_h200.json

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import finish  # noqa: E402
from mlkv.inference.attention import engine_attention  # noqa: E402
from mlkv.inference.bench.measure import measure_bandwidth  # noqa: E402


def timed(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def flex_setup(batch: int, kv_len: int, pad: torch.Tensor, col: torch.Tensor, block: int = 128):
    from torch.nn.attention.flex_attention import BlockMask

    n = -(-kv_len // block)
    dev = pad.device
    num = torch.full((batch, 1, 1), n, dtype=torch.int32, device=dev)
    idx = torch.arange(n, dtype=torch.int32, device=dev).expand(batch, 1, 1, n).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= pad[b]) & (kv_idx <= col[0])

    return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(1, kv_len))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=1024, help="tokens in every row's cache (default 1024)")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256], help="batch sizes timed")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_attention.json",
                        help="the JSON report (default benchmarks/results/decode_attention.json)")
    args = parser.parse_args(argv)
    from torch.nn.attention.flex_attention import flex_attention

    dev, dt, H, D, T = torch.device("cuda"), torch.bfloat16, 12, 64, args.context
    bw = measure_bandwidth(dev)["bytes_per_s"]
    torch._dynamo.config.cache_size_limit = 64  # one compiled kernel per (K/V heads, batch): past the default 8
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for h_kv in (12, 1):
        for B in args.batches:
            bucket = -(-(T + 1) // 256) * 256
            g = torch.Generator(device=dev).manual_seed(0)
            q = torch.randn(B, H, 1, D, device=dev, dtype=dt, generator=g)
            k = torch.randn(B, h_kv, bucket, D, device=dev, dtype=dt, generator=g)
            v = torch.randn(B, h_kv, bucket, D, device=dev, dtype=dt, generator=g)
            pad = torch.randint(0, 64, (B,), device=dev, generator=g)
            col = torch.tensor([T - 1], device=dev)
            cols = torch.arange(bucket, device=dev)
            allowed = (cols[None] >= pad[:, None]) & (cols[None] <= col)
            mask = torch.zeros(B, 1, 1, bucket, device=dev, dtype=dt).masked_fill_(~allowed[:, None, None], -1e30)
            exact = -(-T // 16) * 16
            ref = engine_attention(q, k, v, mask, D**-0.5)  # (B, 1, H, D)
            kv_bytes = B * h_kv * T * D * 2 * 2
            results = {
                "engine": timed(lambda: engine_attention(q, k, v, mask, D**-0.5)),
                "engine_exact": timed(lambda: engine_attention(q, k[:, :, :exact], v[:, :, :exact],
                                                               mask[..., :exact], D**-0.5)),
            }
            if h_kv == H:
                kk, vv = k[:, :, :T], v[:, :, :T]
                results["flash_nomask"] = timed(lambda: F.scaled_dot_product_attention(q, kk, vv))
            bm = flex_setup(B, T, pad, col)
            kk, vv = k[:, :, :T], v[:, :, :T]
            got = flex(q, kk, vv, block_mask=bm, scale=D**-0.5, enable_gqa=h_kv != H).transpose(1, 2)
            err = (got.float() - ref.float()).abs().max().item()
            results["flex"] = timed(lambda: flex(q, kk, vv, block_mask=bm, scale=D**-0.5, enable_gqa=h_kv != H))
            for name, sec in results.items():
                rows.append({"kv_heads": h_kv, "batch": B, "context": T, "kernel": name, "us": sec * 1e6,
                             "kv_bytes": kv_bytes, "fraction_of_copy_bw": kv_bytes / sec / bw,
                             **({"flex_max_abs_err_vs_engine": err} if name == "flex" else {})})
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, {torch.cuda.get_device_name(dev)}")
    print(f"{'H_kv':>4} {'batch':>6} {'kernel':<14} {'us':>9} {'of copy BW':>11}")
    for r in rows:
        print(f"{r['kv_heads']:>4} {r['batch']:>6} {r['kernel']:<14} {r['us']:>9.1f} {r['fraction_of_copy_bw']:>11.1%}")
    report = {"benchmark": "decode_attention", "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "copy_bytes_per_s": bw, "rows": rows}
    return finish(report, args.out)


if __name__ == "__main__":
    main()
