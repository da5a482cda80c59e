#!/usr/bin/env python
"""Harness parity on real weights: lm-evaluation-harness's own ``hf`` backend against ``mlkv eval``'s path.

    MLKV_DATA=../shared/data python benchmarks/harness_parity.py [--limit 50] [--out DIR]

The same model is scored twice on the same local task files (mlkv's task copies, ``mlkv.evaluation.tasks``), with
the same ``--limit``, in fp32 on the CPU:

* lm-eval's ``HFLM`` loading the dequantized SmolLM2-135M-Instruct folder by path (``--hf``, default
  ``/tmp/smol-hf``; written with ``mlkv.model.gguf.materialize("smollm2", ...)`` when missing), which gives
  transformers' ``LlamaForCausalLM``;
* ``mlkv.evaluation.tasks.run_tasks`` (what ``mlkv eval`` runs: ``load_model`` + ``BatchedHFLM``) on its identity
  mlkv conversion (``--mlkv``, default ``/tmp/smol-30x3``; converted with plan ``30x3`` when missing).

It prints, per task and metric, both values and their absolute difference in points (perplexity: relative
difference), plus the largest difference of any single request's log-likelihood; the bar is 0.1 points on every
accuracy. Ends with one JSON line, also written to ``DIR/result.json``.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import finish  # noqa: E402

from mlkv import tables  # noqa: E402
from mlkv.data.paths import default_data_dir  # noqa: E402
from mlkv.evaluation import tasks  # noqa: E402

BAR_POINTS = 0.1
ACCURACIES = ("acc", "acc_norm")


def ensure_models(hf: Path, converted: Path) -> None:
    """The dequantized HF folder and its identity conversion, written only when missing."""
    if not hf.exists():
        from mlkv.model.gguf import materialize

        materialize("smollm2", hf)
    if not converted.exists():
        from mlkv.model.convert import convert_checkpoint

        convert_checkpoint(hf, converted, plan="30x3")


def score_with_lm_eval(hf: Path, names: list[str], limit: int, batch_size: int, data: Path) -> tuple[dict, float]:
    """lm-eval's own ``hf`` backend (``HFLM`` loading the folder by path) on mlkv's local task copies."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    start = time.time()
    lm = HFLM(pretrained=str(hf), backend="causal", device="cpu", batch_size=batch_size, dtype="float32")
    out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=tasks.task_manager("local", data),
                                  bootstrap_iters=0, log_samples=True)
    out["model_class"] = type(lm.model).__name__
    return out, time.time() - start


def score_with_mlkv(converted: Path, names: list[str], limit: int, batch_size: int, data: Path) -> tuple[dict, float]:
    """``mlkv eval``'s path: ``run_tasks`` on the checkpoint folder (``load_model`` + ``BatchedHFLM``)."""
    start = time.time()
    out = tasks.run_tasks(converted, names, limit=limit, batch_size=batch_size, device="cpu", dtype="float32",
                          data_dir=data, bootstrap_iters=0, log_samples=True)
    return out, time.time() - start


def request_loglikelihoods(output: dict, task: str) -> dict[tuple[int, int], float]:
    """``{(doc_id, request index): log-likelihood}`` from the harness's logged samples."""
    values = {}
    for sample in output["samples"][task]:
        for index, resp in enumerate(sample["resps"]):
            values[(sample["doc_id"], index)] = float(resp[0][0])
    return values


def compare_task(theirs: dict, ours: dict, task: str) -> list[dict]:
    """One row per metric of ``task``: both values and their difference."""
    rows = []
    lls_theirs, lls_ours = request_loglikelihoods(theirs, task), request_loglikelihoods(ours, task)
    if lls_theirs.keys() != lls_ours.keys():
        raise RuntimeError(f"{task}: the two backends answered different requests")
    max_ll = max(abs(lls_theirs[k] - lls_ours[k]) for k in lls_theirs)
    for key, value in theirs["results"][task].items():
        metric, _, filt = key.partition(",")
        if not filt or "_stderr" in metric or not isinstance(value, (int, float)):
            continue
        mine = ours["results"][task][key]
        row = {"task": task, "metric": metric, "lm_eval_hf": value, "mlkv": mine,
               "n": theirs["n-samples"][task]["effective"], "requests": len(lls_theirs),
               "max_abs_loglikelihood_diff": max_ll}
        if metric in ACCURACIES:
            row["abs_diff_points"] = abs(100 * value - 100 * mine)
        else:
            row["rel_diff"] = abs(value - mine) / abs(value) if value else abs(mine)
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    cells = []
    for r in rows:
        pct = r["metric"] in ACCURACIES
        diff = f"{r['abs_diff_points']:.2f} pt" if pct else f"{r['rel_diff']:.1e} rel"
        cells.append([r["task"], r["metric"], tables.fmt(r["lm_eval_hf"], ".2f" if pct else ".4f", pct=pct),
                      tables.fmt(r["mlkv"], ".2f" if pct else ".4f", pct=pct), diff, r["n"],
                      f"{r['max_abs_loglikelihood_diff']:.1e}"])
    return tables.text_table(cells, ["task", "metric", "lm-eval hf", "mlkv eval", "|diff|", "n",
                                     "max |d loglik|"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path, default=Path("/tmp/smol-hf"),
                    help="dequantized HF folder (default: %(default)s)")
    ap.add_argument("--mlkv", type=Path, default=Path("/tmp/smol-30x3"),
                    help="its identity mlkv conversion (default: %(default)s)")
    ap.add_argument("--tasks", nargs="+", default=list(tasks.DEFAULT_TASKS), help="local tasks (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=50, help="documents per task (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default: %(default)s)")
    ap.add_argument("--data-dir", default=None, help="shared data folder (default: $MLKV_DATA, else ../shared/data)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/harness_parity_cpu"),
                    help="folder for result.json (default: %(default)s)")
    args = ap.parse_args(argv)
    import torch

    torch.manual_seed(0)
    data = default_data_dir(args.data_dir)
    names = tasks.check_tasks(args.tasks)
    ensure_models(args.hf, args.mlkv)
    theirs, t_theirs = score_with_lm_eval(args.hf, names, args.limit, args.batch_size, data)
    ours, t_ours = score_with_mlkv(args.mlkv, names, args.limit, args.batch_size, data)
    rows = [row for task in names for row in compare_task(theirs, ours, task)]
    print(render(rows))
    worst = max(r["abs_diff_points"] for r in rows if "abs_diff_points" in r)
    report = {
        "bar_points": BAR_POINTS, "max_abs_diff_points": worst, "pass": worst <= BAR_POINTS,
        "limit": args.limit, "tasks": names, "hf": str(args.hf), "mlkv": str(args.mlkv),
        "hf_model_class": theirs["model_class"], "mlkv_model_type": ours["mlkv"]["model_type"],
        "kv_structure": ours["mlkv"]["kv_cache"]["structure"],
        "dtype": "float32", "device": "cpu", "batch_size": args.batch_size,
        "seconds": {"lm_eval_hf": round(t_theirs, 1), "mlkv": round(t_ours, 1)},
        "lm_eval_version": ours["mlkv"].get("lm_eval_version"), "torch_version": torch.__version__,
        "rows": rows,
    }
    return finish(report, args.out / "result.json")


if __name__ == "__main__":
    main()
