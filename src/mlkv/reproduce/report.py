"""The reproduction's report: one row per run, the distillation gap, the init comparison, plots and ``report.md``.

``report_rows`` summarizes every evaluation (perplexities, task metrics, the paper's "avg of 4" from
``mlkv.evaluation.results.average_accuracy``) with its plan's KV cache size; ``render_report`` writes the markdown
from ``results.json``'s content. The plots need matplotlib (the ``plot`` extra), imported when they are drawn.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlkv import tables
from mlkv.evaluation.results import average_accuracy, task_metric
from mlkv.model.convert import INITS
from mlkv.model.sharing import resolve_plan
from mlkv.reproduce.config import Settings, plan_of, run_name

__all__ = ["distillation_gap", "init_comparison", "plot_pareto", "plot_uptrain_loss", "render_report",
           "report_rows", "summarize"]


# ---- numbers ----------------------------------------------------------------------------------------------------
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


def report_rows(evals: dict[str, dict], base_config) -> list[dict]:
    """``summarize`` of every evaluation plus its plan: config name, structure, KV heads and fp16 KV bytes/token at
    the base's shape (``base_config``)."""
    rows = []
    for name, res in evals.items():
        row = summarize(name, res)
        plan = resolve_plan(plan_of(name), base_config.num_hidden_layers, base_config.num_attention_heads)
        row.update(config=plan_of(name), structure=plan.structure, kv_heads=plan.total_kv_heads,
                   kv_bytes_per_token=plan.kv_bytes_per_token(base_config.head_dim, "fp16"))
        rows.append(row)
    return rows


def distillation_gap(by_run: dict[str, dict]) -> dict | None:
    """The fraction of a perplexity gap that distillation closes, at equal uptraining tokens. Against the base (as
    the issue asks) and against MHA-144 uptrained for the same tokens (the fair control when extra tokens still
    improve the base itself)."""
    gap = {}
    kd, lm = (by_run.get(k, {}).get("gutenberg_ppl") for k in ("MLKV-6-distill", "MLKV-6-lm"))
    for ref_name in ("base", "MHA-144-lm"):
        ref = by_run.get(ref_name, {}).get("gutenberg_ppl")
        if None not in (ref, lm, kd):  # a gap exists only when LM-uptrained MLKV-6 is worse than the reference
            gap[ref_name] = {"reference_ppl": ref, "lm_ppl": lm, "distill_ppl": kd,
                             "fraction_closed": (lm - kd) / (lm - ref) if lm > ref else None}
    return gap or None


def init_comparison(s: Settings, by_run: dict) -> dict | None:
    """Gutenberg perplexity per conversion init and data order, their mean, and the best init per plan."""
    table = {}
    for plan in s.init_plans:
        per_init = {}
        for init in INITS:
            ppl = [by_run.get(run_name(plan, "lm", init, k), {}).get("gutenberg_ppl") for k in range(s.init_seeds)]
            ppl = [p for p in ppl if p is not None]
            if ppl:
                per_init[init] = {"ppl": ppl, "mean": sum(ppl) / len(ppl)}
        if per_init:
            table[plan] = {"inits": per_init, "best": min(per_init, key=lambda i: per_init[i]["mean"])}
    return table or None


# ---- plots ------------------------------------------------------------------------------------------------------
def _pyplot():
    from mlkv.errors import require_extra

    matplotlib = require_extra("matplotlib", "mlkv reproduce's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(rows: list[dict], by_run: dict[str, dict], path: Path) -> None:
    """Quality against KV bytes/token: Gutenberg perplexity of every lm and distill run, the base as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for objective, marker in (("-lm", "o"), ("-distill", "s")):
        pts = [(r["kv_bytes_per_token"], r["gutenberg_ppl"], r["config"]) for r in rows
               if r["run"].endswith(objective) and r["gutenberg_ppl"]]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=objective.strip("-"))
            for x, y, label in pts:
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if by_run.get("base", {}).get("gutenberg_ppl"):
        ax.axhline(by_run["base"]["gutenberg_ppl"], ls="--", c="gray", label="base (MHA, no uptraining)")
    ax.set(xscale="log", xlabel="KV cache bytes / token (fp16)", ylabel="Gutenberg val perplexity",
           title="Quality vs KV cache size")
    ax.legend()
    _save(plt, fig, path)


def plot_uptrain_loss(train_dirs: dict[str, Path], path: Path) -> None:
    """The training loss of every uptraining run against its step (from each run's ``metrics.jsonl``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, folder in train_dirs.items():
        log = folder / "metrics.jsonl"
        if not log.is_file():
            continue
        pts = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        pts = [p for p in pts if "loss" in p and "step" in p]
        if pts:
            ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], label=name, lw=1)
    ax.set(xlabel="step", ylabel="training loss", title="Uptraining loss")
    ax.legend(fontsize=6, ncol=2)
    _save(plt, fig, path)


def _save(plt, fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- report.md --------------------------------------------------------------------------------------------------
def _pct(value) -> str:
    return tables.fmt(value, ".2f", pct=True)


def _num(value, digits: int = 2) -> str:
    return tables.fmt(value, f",.{digits}f")


MAIN_COLUMNS = ["run", "config", "KV heads", "KV B/token", "Gutenberg ppl", "WikiText word ppl", "ARC-e",
                "LAMBADA acc (ppl)", "PIQA", "SciQ", "HellaSwag (norm)", "avg of paper's 4"]


def _main_table(rows: list[dict]) -> list[str]:
    cells = [[r["run"], f"{r['config']} ({r['structure']})", r["kv_heads"], _num(r["kv_bytes_per_token"]),
              _num(r["gutenberg_ppl"]), _num(r["wikitext_word_ppl"]), _pct(r["arc_easy_acc"]),
              f"{_pct(r['lambada_acc'])} ({_num(r['lambada_ppl'], 1)})", _pct(r["piqa_acc"]), _pct(r["sciq_acc"]),
              _pct(r["hellaswag_acc_norm"]), _pct(r["avg_paper4"])] for r in rows]
    return [tables.markdown_table(cells, MAIN_COLUMNS)]


def _distillation_section(results: dict) -> list[str]:
    gap, st = results["distillation_gap"], results["settings"]
    lines = ["", "## Distillation", "",
             f"`distill`: KL to the base's logits + {st.get('distill_hidden', 0.0):g} x the layer-wise hidden-state "
             f"distance to the base; every uptraining run at peak lr {st.get('uptrain_lr', 6e-4):g}, equal tokens.",
             ""]
    for ref_name, g in (gap or {}).items():
        head = (f"- Against {ref_name} (Gutenberg val ppl {g['reference_ppl']:.2f}): LM-uptrained MLKV-6 has "
                f"{g['lm_ppl']:.2f}, distilled MLKV-6 {g['distill_ppl']:.2f}; ")
        if g["fraction_closed"] is None:
            lines.append(head + "no gap to close (LM-uptrained MLKV-6 is not worse than the reference).")
        else:
            verb = "closes" if g["fraction_closed"] >= 0 else "widens it: a negative fraction,"
            lines.append(head + f"distillation {verb} {100 * g['fraction_closed']:.1f}% of the gap.")
    if not gap:
        lines.append("Not measured (MLKV-6 lm and distill runs are both needed).")
    return lines


def _init_section(inits: dict | None) -> list[str]:
    if not inits:
        return []
    rows = []
    for plan, t in inits.items():
        cells = [", ".join(f"{p:.2f}" for p in t["inits"][i]["ppl"]) + f" (mean {t['inits'][i]['mean']:.2f})"
                 if i in t["inits"] else tables.MISSING for i in INITS]
        rows.append([plan, *cells, t["best"]])
    return ["", "## Conversion inits (Gutenberg val ppl after equal LM uptraining; one value per data order)", "",
            tables.markdown_table(rows, ["plan", *INITS, "best"])]


def _bench_section(bench: dict | None) -> list[str]:
    if not bench:
        return []
    meta = bench.get("meta", {})
    rows = []
    for plan, r in bench.get("summary", {}).items():
        at_batch = r.get("max_batch_decode_batch", r.get("max_batch"))
        tok_s = _num(r.get("max_batch_decode_tok_s"), 0) + (f" (at batch {at_batch:,})"
                                                            if at_batch != r.get("max_batch") else "")
        rows.append([plan, _num(r.get("kv_bytes_per_token")), _num(r.get("gen_b1_step_ms"), 3),
                     _num(r.get("gen_b64_step_ms"), 3), _num(r.get("max_batch")), tok_s])
    columns = ["config", "KV B/token", "decode ms/step b1", "b64",
               f"max batch @ ctx {meta.get('settings', {}).get('context', '?')}", "decode tokens/s at max batch"]
    lines = ["", f"## Inference (mlkv engine, {meta.get('device_name', '?')}, {meta.get('dtype', '?')}, "
                 "the base's shape with random weights)", "", tables.markdown_table(rows, columns)]
    if meta.get("errors"):
        # the first sentence of each (an allocator's OOM message runs to a paragraph; bench.json keeps it all)
        lines += ["", "Benchmark errors: " + "; ".join(re.split(r"(?<=[a-z0-9)])\. (?=[A-Z])", e)[0]
                                                     for e in meta["errors"])]
    skipped = [f"{r['plan']}: {', '.join(r['skipped'])}" for r in bench.get("plans") or [] if r.get("skipped")]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    return lines


def render_report(results: dict) -> str:
    """``report.md`` from the content of ``results.json``."""
    s = results["settings"]
    lines = ["# MLKV reproduction" + (" (smoke run: numbers are meaningless)" if s["smoke"] else ""), "",
             f"- card: {results['card']}", f"- time: {results['seconds'] / 60:.1f} min",
             f"- command: `{results['command']}`", f"- git commit: `{results['git_commit']}`",
             f"- base: {'converted from ' + s['base'] if s['base'] else 'pretrained here'}; hidden {s['hidden_size']}, "
             f"12 layers x 12 heads; {s['base_tokens']} base tokens, {s['uptrain_tokens']} uptraining tokens per run, "
             f"seq {s['seq_len']}; tasks limit {s['limit'] or 'none (full sets)'}", ""]
    lines += _main_table(results["rows"])
    lines += _distillation_section(results)
    lines += _init_section(results.get("init_comparison"))
    lines += ["", "## Plots", "", "![Pareto](plots/pareto.png)", "", "![Uptraining loss](plots/uptrain_loss.png)"]
    lines += _bench_section(results.get("bench"))
    return "\n".join(lines) + "\n"
