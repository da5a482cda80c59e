"""The reproduction's plots (matplotlib, the ``plot`` extra, imported when a plot is drawn).

- ``pareto.png``: quality against KV cache bytes/token, two panels: average accuracy over the paper's four tasks and
  Gutenberg perplexity; step-0 conversions, ``lm`` and ``distill`` runs as three marker styles, the original as a
  dashed line.
- ``uptrain_loss.png``: one panel per loss kind, because their scales differ by an order of magnitude: the ``lm``
  runs' cross-entropy, the ``distill`` runs' objective (KL + weight x hidden-state distance), and, where runs
  logged it, the validation perplexity during training (the recovery). Every curve has its own color, line style
  and marker.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_pareto", "plot_uptrain_loss", "loss_curves", "STYLES"]

#: (linestyle, marker) pairs cycled with the colors, so that curves stay apart in gray print and where they overlap.
STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("-", "v"), ("--", "P"), ("-.", "X"), (":", "*")]
SERIES = [("step 0", "x", "tab:gray"), ("lm", "o", "tab:blue"), ("distill", "s", "tab:orange")]


def _pyplot():
    from mlkv.errors import require_extra

    matplotlib = require_extra("matplotlib", "mlkv reproduce's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_pareto(rows: list[dict], path: Path) -> Path:
    """Average accuracy and Gutenberg perplexity against KV bytes/token for the main runs (init comparison left
    out), the original as a dashed line in both panels."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5))
    fig.subplots_adjust(wspace=0.28)
    original = next((r for r in rows if r["stage"] == "original"), None)
    offsets = {"step 0": (5, -11), "lm": (5, 4), "distill": (-5, 6)}  # labels of one plan's points kept apart
    for ax, key, label in ((axes[0], "avg_paper4", "average accuracy, paper's 4 tasks (%)"),
                           (axes[1], "gutenberg_ppl", "Gutenberg validation perplexity")):
        scale = 100 if key == "avg_paper4" else 1
        sizes = []
        for stage, marker, color in SERIES:
            pts = [(r["kv_bytes_per_token"], r[key] * scale, r["config"]) for r in rows
                   if r["stage"] == stage and r["main"] and r[key] is not None]
            if pts:
                sizes += [p[0] for p in pts]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, s=40, label=stage,
                           zorder=4 if stage == "step 0" else 3)  # the cross stays visible over a circle
                for x, y, name in pts:
                    ax.annotate(name, (x, y), fontsize=7, xytext=offsets[stage], textcoords="offset points",
                                ha="right" if stage == "distill" else "left")
        if original is not None and original[key] is not None:
            ax.axhline(original[key] * scale, ls="--", color="black", lw=1, label="original, not uptrained")
        ax.set(xlabel="KV cache bytes / token (fp16)", ylabel=label)
        if sizes:
            _kv_axis(ax, sizes)
            if key == "gutenberg_ppl":
                _plain_log(ax)
        else:
            ax.text(0.5, 0.5, "not evaluated", transform=ax.transAxes, ha="center", va="center")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Quality against KV cache size (main init; the init comparison is in the report's table)")
    return _save(plt, fig, path)


def _kv_axis(ax, sizes: list[float]) -> None:
    """A log x axis with a tick at each KV size drawn, in plain numbers, and room for the labels."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ticks = sorted(set(sizes))
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelrotation=45 if len(ticks) > 4 else 0, labelsize=8)
    ax.margins(x=0.15)


def _plain_log(ax) -> None:
    """A log y axis labelled in plain numbers (20, 50, 100, not 2 x 10^1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _records(folder: Path) -> list[dict]:
    log = folder / "metrics.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def loss_curves(train_dirs: dict[str, Path]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{kind: {run: [(tokens, value)]}}``: ``lm`` (cross-entropy of the lm runs), ``distill`` (the distill
    runs' objective) and ``val_ppl`` (validation perplexity of every run that logged it)."""
    curves: dict[str, dict[str, list]] = {"lm": {}, "distill": {}, "val_ppl": {}}
    for name, folder in train_dirs.items():
        records = _records(folder)
        losses = [r for r in records if "loss" in r and "step" in r and "tokens" in r]
        if not losses:
            continue
        per_step = losses[-1]["tokens"] / losses[-1]["step"]  # tokens per optimizer step
        kind = "distill" if "kl" in losses[0] else "lm"
        curves[kind][name] = [(r["tokens"], r["loss"]) for r in losses]
        val = [(r["step"] * per_step, r["val_ppl"]) for r in records if "val_ppl" in r]
        if len(val) > 1:
            curves["val_ppl"][name] = val
    return curves


PANELS = {"lm": ("lm runs: cross-entropy", "training loss (nats/token)"),
          "distill": ("distill runs: KL + weight x hidden distance", "training objective"),
          "val_ppl": ("validation perplexity during training", "Gutenberg val perplexity")}


def plot_uptrain_loss(train_dirs: dict[str, Path], path: Path) -> Path:
    """One panel per loss kind (and the validation perplexity, where logged), curves against tokens."""
    plt = _pyplot()
    curves = {k: v for k, v in loss_curves(train_dirs).items() if v}
    kinds = list(curves) or ["lm"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.4 * len(kinds), 5.2), squeeze=False)
    fig.subplots_adjust(wspace=0.32)
    colors = plt.get_cmap("tab10").colors
    # one color, line style and marker per run, the same in every panel
    look = {name: (colors[i % len(colors)], *STYLES[i % len(STYLES)]) for i, name in enumerate(train_dirs)}
    most = max((p[0] for c in curves.values() for pts in c.values() for p in pts), default=1)
    unit, per = next((u, n) for u, n in (("millions", 1e6), ("thousands", 1e3), ("", 1)) if most >= n or n == 1)
    for ax, kind in zip(axes[0], kinds):
        for name, pts in curves.get(kind, {}).items():
            color, ls, marker = look[name]
            ax.plot([p[0] / per for p in pts], [p[1] for p in pts], ls=ls, marker=marker, color=color,
                    markevery=max(1, len(pts) // 6), markersize=5, lw=1.4, label=name)
        title, ylabel = PANELS[kind]
        ax.set(title=title, xlabel=f"tokens ({unit})" if unit else "tokens", ylabel=ylabel)
        values = [p[1] for pts in curves.get(kind, {}).values() for p in pts if p[1] > 0]
        if kind == "val_ppl" or (values and max(values) > 100 * min(values)):  # e.g. a distill run's first steps
            _plain_log(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False,
                      handlelength=3.5)
        else:
            ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center")
    fig.suptitle("Uptraining: each panel its own loss (their scales differ)")
    return _save(plt, fig, path)
