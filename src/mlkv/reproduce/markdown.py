"""``report.md`` from the content of ``results.json``: the header (what ran, how long, how much disk), the original
and its step-0 conversions, the uptrained models, the init comparison, the paper's findings with their numbers, the
distillation gap, the published scores beside the original's, the plots and the inference benchmark."""

from __future__ import annotations

import re

from mlkv import tables
from mlkv.reproduce.findings import CHANCE_AVERAGE, NOT_MEASURED

__all__ = ["render_report", "COLUMNS"]

COLUMNS = ["run", "config", "init", "KV heads", "KV B/token", "Gutenberg ppl", "WikiText-2 word ppl", "ARC-e acc",
           "LAMBADA acc (ppl)", "PIQA acc", "SciQ acc", "HellaSwag acc_norm", "avg acc, paper's 4"]

#: What results written before the evaluation dtype was recorded were evaluated in.
OLD_EVAL_DTYPE = "the checkpoints' own dtype"


def _pct(value) -> str:
    return tables.fmt(value, ".2f", pct=True)


def _num(value, digits: int = 2) -> str:
    return tables.fmt(value, f",.{digits}f")


def _cells(r: dict) -> list:
    return [r["run"], r["config"] if r["config"] == r["structure"] else f"{r['config']} ({r['structure']})",
            r["init"] or "(original)", r["kv_heads"], _num(r["kv_bytes_per_token"], 0), _num(r["gutenberg_ppl"]),
            _num(r["wikitext_word_ppl"]), _pct(r["arc_easy_acc"]),
            f"{_pct(r['lambada_acc'])} ({_num(r['lambada_ppl'], 1)})", _pct(r["piqa_acc"]), _pct(r["sciq_acc"]),
            _pct(r["hellaswag_acc_norm"]), _pct(r["avg_paper4"])]


def _header(results: dict) -> list[str]:
    s, src = results["settings"], results["settings"].get("source") or {}
    real = src.get("kind", "pretrain") != "pretrain"
    shape = (f"{src.get('layers')} layers x {src.get('heads')} query heads, {src.get('kv_heads')} K/V heads per "
             f"layer, head_dim {src.get('head_dim')}")
    original = (f"`{s['base']}` ({src.get('kind')}), converted as it is: {shape}" if real else
                f"pretrained here on Gutenberg, {s['base_tokens']} tokens: {shape}, hidden {s['hidden_size']}")
    disk = results.get("disk_bytes")
    lines = [f"- card: {results['card']}", _time(results.get("seconds"), results.get("stage_seconds") or {}),
             f"- disk: {disk / 1e9:.2f} GB in the run folder" + ("" if s.get("keep_checkpoints") else
                                                                  " (finished runs keep their final model only)")
             if disk is not None else "- disk: not measured",
             f"- command: `{results['command']}`", f"- git commit: `{results['git_commit']}`",
             f"- original: {original}",
             f"- uptraining: {s['uptrain_tokens']} tokens per run, seq {s['seq_len']}, micro-batch "
             f"{s['micro_batch_size']}, peak lr {s.get('uptrain_lr', 6e-4):g}, shards {', '.join(s['train_shards'])}",
             f"- conversion init: `{s.get('init', 'mean')}` for the main runs (every row states its own)",
             f"- evaluation dtype: {results.get('eval_dtype', OLD_EVAL_DTYPE)}; zero-shot tasks: "
             f"{'limit ' + str(s['limit']) + ' per task' if s['limit'] else 'full sets'}; "
             f"perplexity windows of {s['seq_len']} tokens, Gutenberg validation's first "
             f"{_num(s.get('ppl_max_tokens'), 0)} tokens" + ("" if s.get("wikitext_words", True) else
                                                               "; WikiText-2 word perplexity not computed")]
    return lines


def _time(seconds: float | None, stages: dict[str, float]) -> str:
    """The run's time: the sum of its stages' recorded seconds over every invocation, and each stage's share."""
    if seconds is None:
        return "- time: not recorded"
    shares = ", ".join(f"{name} {value / 60:.1f}" for name, value in stages.items())
    return f"- time: {seconds / 60:.1f} min" + (f" ({shares} min, summed over the invocations)" if shares else "")


def _tables(results: dict) -> list[str]:
    rows, s = results["rows"], results["settings"]
    before = [r for r in rows if r["stage"] in ("original", "step 0")]
    after = [r for r in rows if r["stage"] in ("lm", "distill") and r["main"]]
    lines = []
    if before:
        lines += ["", "## The original and its conversions before training (step 0)", "",
                  tables.markdown_table([_cells(r) for r in before], COLUMNS)]
    lines += ["", f"## Uptrained, {s['uptrain_tokens']} tokens each (lm: next-token loss; distill: from the "
                  "original)", "", tables.markdown_table([_cells(r) for r in after], COLUMNS) if after else
              "No uptrained model was evaluated."]
    return lines


def _init_section(inits: dict | None) -> list[str]:
    if not inits:
        return []
    names = list(dict.fromkeys(i for t in inits.values() for i in t["inits"]))
    rows, notes = [], []
    for plan, t in inits.items():
        cells = []
        for init in names:
            c = t["inits"].get(init)
            cells.append(tables.MISSING if c is None else ", ".join(f"{p:.2f}" for p in c["ppl"]) +
                         f" (mean {c['mean']:.2f}; step 0 {_num(c.get('step0_ppl'))})")
        rows.append([plan, *cells, t["best"] or tables.MISSING])
        notes += [f"- {plan}: `{init}` skipped, {why}." for init, why in t.get("skipped", {}).items()]
    lines = ["", "## Conversion inits (Gutenberg val ppl after equal lm uptraining, one value per data order)", ""]
    if rows and names:
        lines.append(tables.markdown_table(rows, ["plan", *names, "best"]))
    return lines + ([""] + notes if notes else [])


def _findings_section(results: dict) -> list[str]:
    f = results.get("findings") or {}
    kv, il, col = f.get("kv_order", {}), f.get("in_layer", {}), f.get("collapse", {})
    lines = ["", "## The paper's findings on this model (uptrained lm runs, main init)", ""]
    if kv.get("verdict", NOT_MEASURED) == NOT_MEASURED:
        lines.append("- Accuracy falls as KV shrinks: not measured (needs two plans of different KV size with tasks).")
    else:
        pts = "; ".join(f"{p['plan']} {_num(p['kv_bytes_per_token'], 0)} B: {_pct(p['avg_paper4'])}% "
                        f"(ppl {_num(p['gutenberg_ppl'])})" for p in kv["points"])
        lines.append(f"- Accuracy falls as KV shrinks: **{kv['verdict']}**. In {kv['agree']} of {kv['pairs']} pairs "
                     f"of plans the larger cache is at least as accurate (perplexity: {kv['ppl_agree']} of "
                     f"{kv['ppl_pairs']}). {pts}.")
    if il.get("verdict", NOT_MEASURED) == NOT_MEASURED:
        lines.append("- At equal KV size in-layer >= cross-layer: not measured (needs two plans of one KV size).")
    else:
        pairs = "; ".join(f"{p['in_layer']} {_pct(p['in_layer_avg'])}% (ppl {_num(p['in_layer_ppl'])}) against "
                          f"{p['cross_layer']} {_pct(p['cross_layer_avg'])}% (ppl {_num(p['cross_layer_ppl'])}) at "
                          f"{_num(p['kv_bytes_per_token'], 0)} B/token" for p in il["pairs"])
        lines.append(f"- At equal KV size, in-layer sharing is at least as accurate as cross-layer: "
                     f"**{il['verdict']}**. {pairs}.")
    if col.get("verdict", NOT_MEASURED) == NOT_MEASURED:
        lines.append("- 1x1 collapses: not measured (needs the 1x1 plan and the original's own plan, with tasks).")
    else:
        kept = f"keeps {100 * col['margin_kept']:.0f}% of" if "margin_kept" in col else "is compared with"
        lines.append(f"- 1x1 collapses (keeps under half of the uptrained original's margin over chance, "
                     f"{100 * CHANCE_AVERAGE:.0f}%): **{col['verdict']}**. {col['plan']} scores "
                     f"{_pct(col['avg_paper4'])}% against {_pct(col['control_avg'])}% and {kept} the margin; "
                     f"perplexity {_num(col['ppl'])} against {_num(col['control_ppl'])}.")
    return lines


def _distillation_section(results: dict) -> list[str]:
    gap, s = results.get("distillation_gap") or {}, results["settings"]
    lines = ["", "## Distillation: the fraction of the lm run's gap that distill closes at equal tokens", "",
             f"`distill`: KL to the original's logits + {s.get('distill_hidden', 0.0):g} x the layer-wise "
             f"hidden-state distance to it. Fraction = (distill - lm) / (reference - lm); references: the control "
             f"(the original uptrained with lm for the same tokens) and the original before uptraining.", ""]
    rows = []
    for plan, metrics in gap.items():
        for metric, label in (("avg_paper4", "avg acc, paper's 4"), ("gutenberg_ppl", "Gutenberg ppl")):
            for ref, g in metrics[metric].items():
                if g is None:
                    rows.append([plan, label, ref, NOT_MEASURED, "", "", ""])
                    continue
                fmt = _pct if metric == "avg_paper4" else _num
                frac = "no gap (lm is not worse)" if g["fraction_closed"] is None else \
                    f"{100 * g['fraction_closed']:.1f}%"
                rows.append([plan, label, ref, frac, fmt(g["reference"]), fmt(g["lm"]), fmt(g["distill"])])
    if rows:
        lines.append(tables.markdown_table(rows, ["plan", "metric", "reference", "gap closed", "reference value",
                                                  "lm", "distill"]))
    else:
        lines.append(f"Distillation gap: {NOT_MEASURED} (no plan was distilled).")
    return lines


def _published_section(results: dict) -> list[str]:
    pub = results.get("published")
    if not pub or "comparison" not in pub:
        return []
    cells = [[c["score"], _num(c["this_run"]), _num(c["published"]), _num(c["difference_points"]),
              {True: "yes", False: "no", None: NOT_MEASURED}[c["within_tolerance"]]] for c in pub["comparison"]]
    return ["", f"## The original against {pub['model']}'s published scores", "",
            tables.markdown_table(cells, ["score", "this run (original, before uptraining)", "published",
                                          "difference (points)", f"within {pub['tolerance_points']:g} points"]), "",
            f"Published: {pub['source']}. This run's original is `{results['settings'].get('base')}` as converted "
            "(a GGUF file is dequantized, so a quantized one is not bit-identical to the bf16 release)."]


def _bench_section(bench: dict | None) -> list[str]:
    if not bench:
        return []
    meta = bench.get("meta", {})
    rows = []
    for plan, r in bench.get("summary", {}).items():
        at_batch = r.get("max_batch_decode_batch", r.get("max_batch"))
        tok_s = _num(r.get("max_batch_decode_tok_s"), 0) + (f" (at batch {at_batch:,})"
                                                            if at_batch != r.get("max_batch") else "")
        rows.append([plan, _num(r.get("kv_bytes_per_token"), 0), _num(r.get("gen_b1_step_ms"), 3),
                     _num(r.get("gen_b64_step_ms"), 3), _num(r.get("max_batch"), 0), tok_s])
    columns = ["config", "KV B/token", "decode ms/step b1", "b64",
               f"max batch @ ctx {meta.get('settings', {}).get('context', '?')}", "decode tokens/s at max batch"]
    lines = ["", f"## Inference (mlkv engine, {meta.get('device_name', '?')}, {meta.get('dtype', '?')}; weights: "
                 f"{meta.get('source', '?')})", "", tables.markdown_table(rows, columns)]
    if meta.get("errors"):
        # the first sentence of each (an allocator's OOM message runs to a paragraph; bench.json keeps it all)
        lines += ["", "Benchmark errors: " + "; ".join(re.split(r"(?<=[a-z0-9)])\. (?=[A-Z])", e)[0]
                                                     for e in meta["errors"])]
    skipped = [f"{r['plan']}: {', '.join(r['skipped'])}" for r in bench.get("plans") or [] if r.get("skipped")]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    for name in (bench.get("files") or {}):
        if name in ("throughput_vs_batch", "memory_vs_batch", "max_batch"):
            lines += ["", f"![{name.replace('_', ' ')}](bench/{name}.png)"]
    return lines


def render_report(results: dict) -> str:
    """``report.md`` from the content of ``results.json``."""
    s = results["settings"]
    lines = ["# MLKV reproduction" + (" (smoke run: numbers are meaningless)" if s["smoke"] else ""), ""]
    lines += _header(results) + _tables(results) + _init_section(results.get("init_comparison"))
    lines += _findings_section(results) + _distillation_section(results) + _published_section(results)
    lines += ["", "## Plots", "", "![Quality against KV size](plots/pareto.png)", "",
              "![Uptraining loss](plots/uptrain_loss.png)"]
    lines += _bench_section(results.get("bench"))
    return "\n".join(lines) + "\n"
