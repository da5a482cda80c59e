"""The benchmark's outputs: the per-plan summary, ``inference.json``, ``inference.csv``, PNG plots (memory vs batch,
throughput vs batch, max batch per plan) and the table printed at the end."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from mlkv.files import atomic_write
from mlkv.inference.bench.memory import GB
from mlkv.tables import fmt, text_table

__all__ = ["summary", "CSV_FIELDS", "csv_rows", "write_outputs", "write_plots", "print_report", "throughput_styles",
           "THROUGHPUT_LINES"]


# ---- summary --------------------------------------------------------------------------------------------------------
def _round(x, n: int = 4):
    return None if x is None else float(f"{x:.{n}g}")


def _generate_summary(s: dict, rows: list[dict]) -> None:
    for row in rows:
        b = row["batch"]
        s[f"gen_b{b}_step_ms"] = _round(row.get("engine", {}).get("step_ms"))
        if "step_speedup_vs_hf_static" in row:
            s[f"gen_b{b}_speedup_vs_hf_static"] = _round(row["step_speedup_vs_hf_static"])
        if "step_speedup_vs_hf_static_compiled" in row:
            s[f"gen_b{b}_speedup_vs_hf_static_compiled"] = _round(row["step_speedup_vs_hf_static_compiled"])
        if "engine_compiled" in row:
            s[f"gen_b{b}_compiled_step_ms"] = _round(row["engine_compiled"].get("step_ms"))
            if "compiled_step_speedup_vs_hf_static" in row:
                s[f"gen_b{b}_compiled_speedup_vs_hf_static"] = _round(row["compiled_step_speedup_vs_hf_static"])


def _step_summary(s: dict, rows: list[dict]) -> None:
    for row in rows:
        b = row["batch"]
        s[f"step_b{b}_ctx{row['context']}_ms"] = _round(row.get("engine", {}).get("step_ms"))
        s[f"step_b{b}_bound_ratio"] = _round(row.get("engine", {}).get("bound_ratio"))
        if "step_speedup_vs_hf_static" in row:
            s[f"step_b{b}_speedup_vs_hf_static"] = _round(row["step_speedup_vs_hf_static"])
        if "engine_compiled" in row:
            s[f"step_b{b}_ctx{row['context']}_compiled_ms"] = _round(row["engine_compiled"]["step_ms"])
            s[f"step_b{b}_compiled_bound_ratio"] = _round(row["engine_compiled"]["bound_ratio"])
            for k in ("engine", "hf_static"):
                if f"compiled_step_speedup_vs_{k}" in row:
                    s[f"step_b{b}_compiled_speedup_vs_{k}"] = _round(row[f"compiled_step_speedup_vs_{k}"])


def summary(results: list[dict]) -> dict:
    """``{plan: {metric: value}}``: the headline numbers of each plan (4 significant digits)."""
    out = {}
    for r in results:
        s = {"kv_bytes_per_token": r["kv_bytes_per_token"],
             "kv_bytes_per_token_allocated": r["cache"]["kv_bytes_per_token_allocated"]}
        _generate_summary(s, r["generate"])
        _step_summary(s, r["step"])
        if "max_batch" in r:
            s["max_batch"] = r["max_batch"]["max_batch"]
        if "max_batch_decode" in r:
            s["max_batch_decode_tok_s"] = _round(r["max_batch_decode"]["decode_tok_s"])
            s["max_batch_decode_batch"] = r["max_batch_decode"]["batch"]  # below max_batch after an OOM back-off
        if "max_context" in r:
            s["max_context"] = r["max_context"]["max_context"]
        out[r["plan"]] = s
    return out


# ---- files ----------------------------------------------------------------------------------------------------------
CSV_FIELDS = ["plan", "run", "impl", "batch", "prompt_len", "new_tokens", "context", "step_ms", "decode_tok_s",
              "prefill_tok_s", "e2e_tok_s", "peak_gb", "hbm_bound_ms", "bound_ratio", "bandwidth_fraction",
              "step_speedup_vs_hf_static", "kv_bytes_per_token", "kv_bytes_per_token_allocated", "max_batch",
              "max_batch_decode_tok_s", "max_context"]


def csv_rows(report: dict) -> list[dict]:
    """One row per plan, run (generate or step), batch and implementation measured."""
    rows = []
    for r in report["plans"]:
        base = {"plan": r["plan"], "kv_bytes_per_token": r["kv_bytes_per_token"],
                "kv_bytes_per_token_allocated": r["cache"]["kv_bytes_per_token_allocated"],
                "max_batch": r.get("max_batch", {}).get("max_batch"),
                "max_batch_decode_tok_s": r.get("max_batch_decode", {}).get("decode_tok_s"),
                "max_context": r.get("max_context", {}).get("max_context")}
        for run in ("generate", "step"):
            for row in r[run]:
                for impl in ("engine", "engine_compiled", "hf_dynamic", "hf_static", "hf_static_compiled"):
                    if impl not in row:
                        continue
                    m = row[impl]
                    rows.append({**base, "run": run, "impl": impl, "batch": row["batch"],
                                 "prompt_len": row["prompt_len"], "new_tokens": row["new_tokens"],
                                 "context": row.get("context", row["prompt_len"] + row["new_tokens"]),
                                 "step_ms": m.get("step_ms"), "decode_tok_s": m.get("decode_tok_s"),
                                 "prefill_tok_s": m.get("prefill_tok_s"), "e2e_tok_s": m.get("e2e_tok_s"),
                                 "peak_gb": m["peak_bytes"] / GB if m.get("peak_bytes") is not None else None,
                                 "hbm_bound_ms": row.get("hbm_bound_ms"), "bound_ratio": m.get("bound_ratio"),
                                 "bandwidth_fraction": m.get("bandwidth_fraction"),
                                 "step_speedup_vs_hf_static": row.get("step_speedup_vs_hf_static")
                                 if impl == "engine" else row.get("compiled_step_speedup_vs_hf_static")
                                 if impl == "engine_compiled" else None})
    return rows


def write_outputs(report: dict, out_dir: Path) -> dict:
    """``inference.json``, ``inference.csv`` and the plots in ``out_dir``; returns ``{name: path}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out_dir / "inference.json"), "csv": str(out_dir / "inference.csv")}
    atomic_write(files["json"], json.dumps(report, indent=1, default=str))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in csv_rows(report):
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write(files["csv"], text.getvalue())
    files.update(write_plots(report, out_dir))
    return files


def write_plots(report: dict, out_dir: Path) -> dict:
    """Memory vs batch, throughput vs batch and (after a search) max batch per plan, as PNGs; none without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return {}
    meta, plans = report["meta"], report["plans"]
    title = f"{meta['device_name']}, {meta['dtype']}"
    cmap = plt.get_cmap("viridis")
    col = {r["plan"]: cmap(i / max(1, len(plans) - 1)) for i, r in enumerate(plans)}
    files = {"memory_vs_batch": _plot_memory(plt, plans, col, meta, title, out_dir),
             "throughput_vs_batch": _plot_throughput(plt, plans, col, meta, title, out_dir)}
    with_batch = [r for r in plans if "max_batch" in r]
    if with_batch:
        files["max_batch"] = _plot_max_batch(plt, with_batch, col, meta, title, out_dir)
    return files


def _plot_memory(plt, plans, col, meta, title, out_dir: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in plans:
        pts = []
        for row in r["step"]:
            e = row.get("engine")
            if e is None:
                continue
            peak = e.get("peak_bytes")  # cpu: no allocator statistics, plot weights + cache
            pts.append((row["batch"], (peak if peak is not None else r["weight_bytes"] + e["cache_bytes"]) / GB))
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", color=col[r["plan"]], label=r["plan"])
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="peak memory (GB)",
           title=f"Engine peak memory at context {meta['settings']['step_context']}\n{title}")
    _plain_ticks(ax, _batches(plans, "step"))
    ax.legend(fontsize=8, ncol=2)
    return _save(plt, fig, out_dir / "memory_vs_batch.png")


#: The implementations a throughput plot can draw: row key, line style, marker, legend text.
THROUGHPUT_LINES = [("engine", "-", "o", "mlkv engine"),
                    ("engine_compiled", ":", "s", "mlkv engine, torch.compile'd step"),
                    ("hf_static", "--", "x", "transformers generate(), static cache")]


def throughput_styles(plans: list[dict]) -> list[tuple[str, str, str]]:
    """``(line style, marker, legend text)`` of each implementation some plan's step rows measured: the throughput
    plot's style legend, which names no line that is not drawn."""
    return [(ls, marker, text) for key, ls, marker, text in THROUGHPUT_LINES
            if any(key in row for r in plans for row in r["step"])]


def _plot_throughput(plt, plans, col, meta, title, out_dir: Path) -> str:
    """Decode tokens/s against batch: one color per plan, one line style per implementation; the legend names
    the plans (colors) and only the implementations drawn (styles)."""
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in plans:
        for key, ls, marker, _ in THROUGHPUT_LINES:
            pts = sorted((row["batch"], row[key]["decode_tok_s"]) for row in r["step"] if key in row)
            if pts:
                ax.plot(*zip(*pts), marker=marker, ls=ls, color=col[r["plan"]], alpha=0.6 if key == "hf_static"
                        else 1.0)
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s",
           title=f"Decode throughput at context {meta['settings']['step_context']}\n{title}")
    _plain_ticks(ax, _batches(plans, "step"))
    plan_handles = [Line2D([], [], color=col[r["plan"]], lw=3, label=r["plan"]) for r in plans]
    style_handles = [Line2D([], [], color="black", ls=ls, marker=marker, label=text)
                     for ls, marker, text in throughput_styles(plans)]
    first = ax.legend(handles=plan_handles, title="plan (color)", fontsize=8, loc="upper left",
                      bbox_to_anchor=(1.01, 1.0))
    ax.add_artist(first)
    ax.legend(handles=style_handles, title="implementation (line)", fontsize=8, loc="lower left",
              bbox_to_anchor=(1.01, 0.0), handlelength=4)  # long enough to show the dashes
    return _save(plt, fig, out_dir / "throughput_vs_batch.png")


def _plot_max_batch(plt, with_batch, col, meta, title, out_dir: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [r["plan"] for r in with_batch]
    values = [r["max_batch"]["max_batch"] for r in with_batch]
    ax.bar(names, values, color=[col[n] for n in names])
    for i, v in enumerate(values):
        ax.text(i, v, str(v), ha="center", va="bottom", fontsize=7)
    ax.set(yscale="log", ylabel="max batch",
           title=f"max batch at context {with_batch[0]['max_batch']['context']}, budget "
                 f"{meta['budget_bytes'] / GB:.3g} GB ({meta['fit_method'].split(' (')[0]})\n{title}")
    ax.tick_params(axis="x", rotation=45)
    _plain_ticks(ax)
    return _save(plt, fig, out_dir / "max_batch.png")


def _plain_ticks(ax, batches: list[int] | None = None) -> None:
    """Log axes labelled in plain numbers (64, 2,000, 0.5), not 6.4 x 10^1; ``batches``: the x ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:.3g}")
    if batches:
        ax.set_xticks(batches)
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
    if ax.get_yscale() == "log":
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())


def _save(plt, fig, path: Path) -> str:
    fig.savefig(path, dpi=120, bbox_inches="tight")  # titles and outside legends kept whole
    plt.close(fig)
    return str(path)


# ---- the printed table ----------------------------------------------------------------------------------------------
def _batches(plans: list[dict], run: str, impl: str | None = None) -> list[int]:
    """The batches of ``run`` rows in any plan (with ``impl`` measured, if given)."""
    return sorted({row["batch"] for r in plans for row in r[run] if impl is None or impl in row})


def _header(gen_b, step_b, compiled, step_compiled, hf_cmp) -> list[str]:
    header = ["plan", "KV B/tok", "alloc B/tok"]
    for b in gen_b:
        header += [f"gen b{b} ms", "x hf-st"] + (["x hf-stc"] if b in hf_cmp else []) + (
            [f"cmp b{b} ms", "x hf-st"] + (["x hf-stc"] if b in hf_cmp else []) if b in compiled else [])
    for b in step_b:
        header += [f"ctx b{b} ms", "x bound", "x hf-st"] + ([f"ctx-cmp b{b} ms", "x bound"] if b in step_compiled
                                                            else [])
    return header + ["max batch", "tok/s@max", "max ctx"]


def _cells(r: dict, gen_b, step_b, compiled, step_compiled, hf_cmp) -> list[str]:
    cells = [r["plan"], fmt(r["kv_bytes_per_token"]), fmt(r["cache"]["kv_bytes_per_token_allocated"], ",.6g")]
    gen = {row["batch"]: row for row in r["generate"]}
    for b in gen_b:
        row = gen.get(b, {})
        cells += [fmt(row.get("engine", {}).get("step_ms"), ".3g"), fmt(row.get("step_speedup_vs_hf_static"), ".2f")]
        if b in hf_cmp:
            cells += [fmt(row.get("step_speedup_vs_hf_static_compiled"), ".2f")]
        if b in compiled:
            cells += [fmt(row.get("engine_compiled", {}).get("step_ms"), ".3g"),
                      fmt(row.get("compiled_step_speedup_vs_hf_static"), ".2f")]
            if b in hf_cmp:
                cells += [fmt(row.get("compiled_step_speedup_vs_hf_static_compiled"), ".2f")]
    step = {row["batch"]: row for row in r["step"]}
    for b in step_b:
        row = step.get(b, {})
        e = row.get("engine", {})
        cells += [fmt(e.get("step_ms"), ".3g"), fmt(e.get("bound_ratio"), ".2f"),
                  fmt(row.get("step_speedup_vs_hf_static"), ".2f")]
        if b in step_compiled:
            c = row.get("engine_compiled", {})
            cells += [fmt(c.get("step_ms"), ".3g"), fmt(c.get("bound_ratio"), ".2f")]
    return cells + [fmt(r.get("max_batch", {}).get("max_batch")),
                    fmt(r.get("max_batch_decode", {}).get("decode_tok_s"), ".4g"),
                    fmt(r.get("max_context", {}).get("max_context"))]


def print_report(report: dict) -> None:
    """The run's device and notes, one table row per plan, a legend, then skipped runs and errors."""
    meta, plans = report["meta"], report["plans"]
    bw = meta["bandwidth"]["bytes_per_s"] / 1e12
    print(f"\n{meta['device_name']} ({meta['device']}), {meta['dtype']}, {meta['source']}; copy bandwidth "
          f"{bw:.3g} TB/s; {meta['weights_note']}; {meta['hf_static_note']}")
    batches = (_batches(plans, "generate"), _batches(plans, "step"), _batches(plans, "generate", "engine_compiled"),
               _batches(plans, "step", "engine_compiled"), _batches(plans, "generate", "hf_static_compiled"))
    print(text_table([_cells(r, *batches) for r in plans], _header(*batches)))
    s = meta["settings"]
    print(f"gen: prompt {s['prompt_len']} + {s['new_tokens']} new tokens, ms per decode step (cmp: torch.compile'd "
          f"engine); ctx: decode steps at context {s['step_context']}; x bound: step time / HBM bound "
          f"(weights + KV in use at the measured copy bandwidth); x hf-st: transformers static-cache step time / "
          f"engine's (x hf-stc: its compiled path); ctx-cmp: the torch.compile'd engine's decode steps; tok/s@max: "
          f"decode tokens/s at the max batch, full context; max batch at context {s['context']}, max ctx at batch "
          f"{s['context_batch']} ({meta['fit_method']}, budget {meta['budget_bytes'] / GB:.3g} GB)")
    for r in plans:
        if r["skipped"]:
            print(f"{r['plan']}: skipped {', '.join(r['skipped'])}")
    for e in meta.get("errors", []):
        print(f"ERROR {e}")
