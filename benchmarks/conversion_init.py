"""Step-0 quality of each conversion init on a real checkpoint: Gutenberg validation perplexity right after
conversion, before any training, for mean / pairwise / first and the data-aware least-squares fit (``lsq``).

    python benchmarks/conversion_init.py --base smollm2 --plans 30x1 10x3 6x1 --out benchmarks/results/conversion_init_cpu

Calibration and evaluation text are disjoint: calibration sequences come from the first validation books, the
scored sequences from later ones. Runs on the CPU (a 135M model, a few thousand tokens). Prints a table and ends
with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mlkv.data import load_hf_tokenizer, read_documents  # noqa: E402
from mlkv.data.paths import require_data_dir  # noqa: E402
from mlkv.files import atomic_json  # noqa: E402
from mlkv.model.calibrate import attention_inputs  # noqa: E402
from mlkv.model.convert import INITS, build_model, convert_state  # noqa: E402
from mlkv.model.gguf import is_gguf, materialize  # noqa: E402
from mlkv.model.sharing import resolve_plan  # noqa: E402
from mlkv.tables import fmt, text_table  # noqa: E402


def token_sequences(tok, data: Path, seq_len: int, count: int, skip_docs: int) -> torch.Tensor:
    """``count`` sequences of ``seq_len`` tokens from validation books after the first ``skip_docs``."""
    ids: list[int] = []
    for i, text in enumerate(read_documents(data / "corpus" / "gutenberg" / "val.jsonl.xz")):
        if i < skip_docs:
            continue
        ids += tok(text[:200_000])["input_ids"]
        if len(ids) >= seq_len * count:
            break
    return torch.tensor(ids[: seq_len * count]).view(count, seq_len)  # (count, T)


@torch.no_grad()
def perplexity(model, seqs: torch.Tensor, batch: int = 4) -> float:
    nll, n = 0.0, 0
    for s in range(0, seqs.shape[0], batch):
        x = seqs[s:s + batch]
        logits = model(x).logits[:, :-1].float()  # (B, T-1, V)
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        n += x[:, 1:].numel()
    return math.exp(nll / n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="smollm2", help="a .gguf, a known GGUF name (smollm2) or a HF checkpoint folder")
    p.add_argument("--plans", nargs="+", default=["30x1", "10x3", "6x1"], help="sharing plans to convert to")
    p.add_argument("--inits", nargs="+", default=list(INITS), help="conversion inits to compare")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--calibration-seqs", type=int, default=8, help="calibration sequences (lsq)")
    p.add_argument("--eval-seqs", type=int, default=8, help="scored sequences")
    p.add_argument("--data-dir", help="shared data folder (default: $MLKV_DATA or ../shared/data)")
    p.add_argument("--work", default="/tmp/mlkv-conversion-init", help="scratch folder for the dequantized base")
    p.add_argument("--out", help="folder for result.json")
    args = p.parse_args()
    torch.manual_seed(0)
    data = require_data_dir(args.data_dir)
    base = Path(args.base)
    if is_gguf(args.base):
        base = Path(args.work) / "base"
        if not (base / "config.json").is_file():
            materialize(args.base, base, overwrite=True)
    tok = load_hf_tokenizer(base)
    calib = token_sequences(tok, data, args.seq_len, args.calibration_seqs, skip_docs=0)
    evals = token_sequences(tok, data, args.seq_len, args.eval_seqs, skip_docs=20)
    state, config = convert_state(base, plan=f"{config_layers(base)}x{config_kv(base)}")
    original = build_model(state, config).eval()
    started = time.time()
    inputs = attention_inputs(original, calib)
    rows = [{"plan": f"original {config.sharing.structure}", "init": "-", "ppl": perplexity(original, evals)}]
    for name in args.plans:
        for init in args.inits:
            plan_state, plan_config = convert_state(base, plan=name, init=init,
                                                    calibration=inputs if init == "lsq" else None)
            rows.append({"plan": resolve_plan(name, config.num_hidden_layers, config.num_attention_heads,
                                                 config.num_key_value_heads).structure,
                         "init": init, "ppl": perplexity(build_model(plan_state, plan_config).eval(), evals)})
            print(f"{rows[-1]['plan']:>6} {init:>8}: ppl {rows[-1]['ppl']:,.1f}", flush=True)
    table = [{**r, "ppl": fmt(r["ppl"], ",.1f")} for r in rows]
    print(text_table(table))
    result = {"base": str(args.base), "seq_len": args.seq_len, "calibration_tokens": calib.numel(),
              "eval_tokens": evals.numel(), "seconds": round(time.time() - started, 1), "rows": rows,
              "device": "cpu", "torch": torch.__version__}
    if args.out:
        atomic_json(Path(args.out) / "result.json", result)
    print(json.dumps(result))
    return 0


def config_layers(base: Path) -> int:
    return json.loads((base / "config.json").read_text())["num_hidden_layers"]


def config_kv(base: Path) -> int:
    cfg = json.loads((base / "config.json").read_text())
    return cfg.get("num_key_value_heads") or cfg["num_attention_heads"]


if __name__ == "__main__":
    raise SystemExit(main())
