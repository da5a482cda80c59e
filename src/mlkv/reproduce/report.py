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

__all__ = ["summarize", "report_rows", "init_comparison", "build_results", "PUBLISHED"]

#: Published zero-shot scores of known originals, with their source. SmolLM2-135M-Instruct: none found. The stored
#: copies of its model card that a search of the project's reference material returned have no evaluation table, so
#: the column stays empty rather than quoting numbers from memory or third-party pages.
PUBLISHED = {"smollm2-135m": {"model": "SmolLM2-135M-Instruct", "scores": {}, "source": None,
                              "note": "not found: the stored copies of the HuggingFaceTB/SmolLM2-135M-Instruct model "
                                      "card have no evaluation table (searched), so no published score is quoted"}}


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


def _published(s: Settings) -> dict | None:
    from mlkv.model.gguf import ALIASES

    key = ALIASES.get(s.base.lower(), s.base.lower())
    return PUBLISHED.get(key)


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
            "published": _published(s), "bench": bench, "seconds": seconds, "command": command,
            "git_commit": git_commit, "card": card}

