"""The reproduction's report: one row per evaluated model, the paper's findings, the distillation gap, the init
comparison, the published scores beside the original's, and ``report.md``.

``report_rows`` summarizes every evaluation (perplexities, task metrics, the paper's "avg of 4" from
``mlkv.evaluation.results.average_accuracy``) with its plan, init, stage and KV cache size; ``build_results`` is the
content of ``results.json`` (and draws the plots); ``mlkv.reproduce.markdown`` writes ``report.md`` from it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from mlkv import tables
from mlkv.evaluation.results import average_accuracy, task_metric
from mlkv.reproduce.config import Settings, source_of
from mlkv.reproduce.findings import distillation_gap, paper_findings
from mlkv.reproduce.runs import comparison_inits, init_of, plan_of, run_name

__all__ = ["summarize", "report_rows", "init_comparison", "build_results", "published_comparison", "PUBLISHED"]

#: Published zero-shot scores of known originals (percent, keyed by report-row column), with their source. For
#: SmolLM2-135M-Instruct the only figures at hand are third-party: a model page on the Hub lists these 0-shot
#: lm-evaluation-harness scores for the Instruct baseline (the bf16 release, not the Q4_1 file run here). The
#: model's own card, in the stored copies searched, has no evaluation table.
PUBLISHED = {"smollm2-135m": {
    "model": "SmolLM2-135M-Instruct",
    "scores": {"arc_easy_acc": 54.12, "hellaswag_acc_norm": 42.99, "piqa_acc_norm": 66.92},
    "not_evaluated_here": {"arc_challenge_acc_norm": 27.73},
    "source": "third-party: the Hugging Face Hub model page lldois/SmolLM2-135M-Reasoning-SLERP-Champion, its "
              "0-shot figures for the SmolLM2-135M-Instruct baseline (bf16 release; quoted, not re-derived here)",
    "tolerance_points": 3.0}}

# ---- rows ---------------------------------------------------------------------------------------------------------
def summarize(name: str, res: dict) -> dict:
    """One report row: perplexities and task metrics of a run's evaluation."""
    row = {"run": name}
    ppl = res.get("mlkv", {}).get("perplexity", {})
    row["gutenberg_ppl"] = ppl.get("gutenberg_val", {}).get("token_level", {}).get("perplexity")
    row["wikitext_word_ppl"] = ppl.get("wikitext2", {}).get("document_level", {}).get("word_perplexity")
    row["lambada_acc"] = task_metric(res, "lambada_openai", "acc")
    row["lambada_ppl"] = task_metric(res, "lambada_openai", "perplexity")
    for task in ("piqa", "arc_easy", "sciq"):
        row[f"{task}_acc"] = task_metric(res, task, "acc")
    row["piqa_acc_norm"] = task_metric(res, "piqa", "acc_norm")
    row["hellaswag_acc_norm"] = task_metric(res, "hellaswag", "acc_norm")
    row["avg_paper4"] = average_accuracy(res)
    return row


def _stage(name: str) -> str:
    if name == "base":
        return "original"
    return "step 0" if re.search(r"-step0(-|$)", name) else "distill" if "-distill" in name else "lm"


def report_rows(evals: dict[str, dict], s: Settings) -> list[dict]:
    """``summarize`` of every evaluation plus its plan (config name, structure, producers, KV heads and fp16 KV
    bytes/token at the original's shape), conversion init, stage (original, step 0, lm, distill) and whether it is
    a main run (main init, first data order)."""
    source = source_of(s)
    rows = []
    for name, res in evals.items():
        row = summarize(name, res)
        config = plan_of(name, source.identity)
        plan = source.plan(config)
        init = init_of(name, s.init)
        row.update(config=config, structure=plan.structure, producers=plan.num_producers,
                   kv_heads=plan.total_kv_heads, kv_bytes_per_token=plan.kv_bytes_per_token(source.head_dim, "fp16"),
                   init=init, stage=_stage(name), main=init in (None, s.init) and not re.search(r"-s\d+$", name))
        rows.append(row)
    return rows


def init_comparison(s: Settings, by_run: dict) -> dict | None:
    """Gutenberg perplexity per conversion init and data order (step 0 and uptrained), their mean, the best init
    per plan, and the inits skipped as the same function as another."""
    if not s.init_comparison:
        return None
    table = {}
    for plan in s.init_plans:
        kept, skipped = comparison_inits(s, plan)
        per_init = {}
        for init in [s.init, *kept]:
            ppl = [by_run.get(run_name(plan, "lm", init, k, s.init), {}).get("gutenberg_ppl")
                   for k in range(s.init_seeds)]
            ppl = [p for p in ppl if p is not None]
            step0 = by_run.get(f"{plan}-step0" + ("" if init == s.init else f"-{init}"), {}).get("gutenberg_ppl")
            if ppl:
                per_init[init] = {"ppl": ppl, "mean": sum(ppl) / len(ppl), "step0_ppl": step0}
        if per_init or skipped:
            best = min(per_init, key=lambda i: per_init[i]["mean"]) if per_init else None
            table[plan] = {"inits": per_init, "best": best, "skipped": skipped}
    return table or None


def published_key(base: str) -> str:
    """``PUBLISHED``'s key of ``--base``: a known name (``smollm2``), or a GGUF file named after its model
    (``.../SmolLM2-135M-Instruct.Q4_1.gguf``, as the device chain passes it), through ``mlkv.model.gguf.ALIASES``."""
    from mlkv.model.gguf import ALIASES

    name = Path(base).name.lower()
    if name.endswith(".gguf"):
        name = name[:-len(".gguf")].rsplit(".", 1)[0]  # drop the quantization suffix (.q4_1)
    return ALIASES.get(name, name)


def published_comparison(s: Settings, by_run: dict[str, dict]) -> dict | None:
    """The base's published scores (``PUBLISHED``) beside the original's before uptraining: per score the
    difference in points and whether it is within the entry's tolerance (None where this run has no number)."""
    pub = PUBLISHED.get(published_key(s.base))
    if pub is None:
        return None
    original = by_run.get("base") or {}
    rows = []
    for key, published in pub["scores"].items():
        ours = original.get(key)
        diff = None if ours is None else 100 * ours - published
        rows.append({"score": key, "this_run": None if ours is None else 100 * ours, "published": published,
                     "difference_points": diff,
                     "within_tolerance": None if diff is None else abs(diff) <= pub["tolerance_points"]})
    return {**pub, "comparison": rows}


def build_results(s: Settings, out: Path, evals: dict[str, dict], train_dirs: dict[str, Path], bench: dict | None,
                  *, seconds: float, command: str, git_commit: str, card: str) -> dict:
    """The content of ``results.json``; draws the plots into ``out/plots``."""
    from mlkv.reproduce.plots import plot_pareto, plot_uptrain_loss

    rows = report_rows(evals, s)
    by_run = {r["run"]: r for r in rows}
    plot_pareto(rows, out / "plots" / "pareto.png")
    plot_uptrain_loss(train_dirs, out / "plots" / "uptrain_loss.png")
    return {"settings": dataclasses.asdict(s), "rows": rows, "findings": paper_findings(s, by_run),
            "distillation_gap": distillation_gap(s, by_run), "init_comparison": init_comparison(s, by_run),
            "published": published_comparison(s, by_run), "bench": bench, "seconds": seconds, "command": command,
            "git_commit": git_commit, "card": card}

