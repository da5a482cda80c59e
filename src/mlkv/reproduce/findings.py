"""What the numbers say: the MLKV paper's three findings and the distillation gap, computed from the report rows.

Every statement is a rule applied to the uptrained models (main init, ``lm``), stated with the rule in the report:

- ``kv_order``: accuracy falls as KV shrinks. Over every pair of plans with different KV bytes/token, the larger
  cache scores at least as well (average accuracy over the paper's four tasks; Gutenberg perplexity beside it).
  Holds when every pair agrees, holds mostly at two thirds or more, else does not hold.
- ``in_layer``: at equal KV size, in-layer sharing (more producer layers, fewer K/V heads each) is at least as good
  as cross-layer sharing (fewer producers, more heads each).
- ``collapse``: the 1x1 plan collapses when it keeps less than half of the uptrained original's margin over chance
  on the paper's four tasks (chance: 25% on ARC-Easy and SciQ, 4 choices; 50% on PIQA, 2; 0% on LAMBADA).
- ``distillation_gap``: the fraction of the gap between a plan's ``lm`` run and a reference (the uptrained original,
  the control; and the original before uptraining) that the ``distill`` run closes, at equal tokens, in average
  accuracy and in Gutenberg perplexity: ``(distill - lm) / (reference - lm)``.

A finding whose runs are missing is "not measured".
"""

from __future__ import annotations

from itertools import combinations

from mlkv.reproduce.config import Settings, source_of
from mlkv.reproduce.runs import run_name

__all__ = ["CHANCE", "CHANCE_AVERAGE", "paper_findings", "distillation_gap", "NOT_MEASURED"]

#: Accuracy of guessing on the paper's four tasks: ARC-Easy and SciQ have 4 choices, PIQA 2, LAMBADA is open.
CHANCE = {"arc_easy": 0.25, "lambada_openai": 0.0, "piqa": 0.5, "sciq": 0.25}
CHANCE_AVERAGE = sum(CHANCE.values()) / len(CHANCE)
NOT_MEASURED = "not measured"


def _lm_rows(s: Settings, by_run: dict[str, dict]) -> dict[str, dict]:
    """``{plan: row}`` of the main ``lm`` runs that were evaluated."""
    rows = {p: by_run.get(run_name(p, "lm", s.init, 0, s.init)) for p in s.plans}
    return {p: r for p, r in rows.items() if r is not None}


def _verdict(agree: int, total: int) -> str:
    if total == 0:
        return NOT_MEASURED
    return "holds" if agree == total else "holds mostly" if agree >= 2 * total / 3 else "does not hold"


def kv_order(rows: dict[str, dict]) -> dict:
    """Pairs of plans with different KV sizes in which the larger cache is at least as accurate."""
    points = sorted(((r["kv_bytes_per_token"], r["avg_paper4"], r["gutenberg_ppl"], p) for p, r in rows.items()),
                    reverse=True)
    acc = [(kv, a, plan) for kv, a, _, plan in points if a is not None]
    pairs = [(x, y) for x, y in combinations(acc, 2) if x[0] != y[0]]  # x has the larger cache (sorted)
    ppl = [(kv, q) for kv, _, q, _ in points if q is not None]
    ppl_pairs = [(x, y) for x, y in combinations(ppl, 2) if x[0] != y[0]]
    return {"verdict": _verdict(sum(x[1] >= y[1] for x, y in pairs), len(pairs)),
            "pairs": len(pairs), "agree": sum(x[1] >= y[1] for x, y in pairs),
            "ppl_pairs": len(ppl_pairs), "ppl_agree": sum(x[1] <= y[1] for x, y in ppl_pairs),
            "points": [{"plan": plan, "kv_bytes_per_token": kv, "avg_paper4": a, "gutenberg_ppl": q}
                       for kv, a, q, plan in points]}


def in_layer(rows: dict[str, dict]) -> dict:
    """At each KV size with two or more plans: the plan with the most producers (in-layer) against the one with
    the fewest (cross-layer)."""
    by_size: dict[int, list[tuple[str, dict]]] = {}
    for plan, row in rows.items():
        by_size.setdefault(row["kv_bytes_per_token"], []).append((plan, row))
    pairs = []
    for size, group in sorted(by_size.items(), reverse=True):
        if len(group) < 2:
            continue
        group.sort(key=lambda item: item[1]["producers"])
        (cross, c), (inner, i) = group[0], group[-1]
        if c["producers"] == i["producers"]:
            continue
        holds = None if None in (i["avg_paper4"], c["avg_paper4"]) else i["avg_paper4"] >= c["avg_paper4"]
        pairs.append({"kv_bytes_per_token": size, "in_layer": inner, "cross_layer": cross,
                      "in_layer_avg": i["avg_paper4"], "cross_layer_avg": c["avg_paper4"],
                      "in_layer_ppl": i["gutenberg_ppl"], "cross_layer_ppl": c["gutenberg_ppl"], "holds": holds})
    judged = [p["holds"] for p in pairs if p["holds"] is not None]
    n, k = len(judged), sum(judged)
    verdict = NOT_MEASURED if n == 0 else "holds" if k == n else "does not hold" if k == 0 else "mixed"
    return {"verdict": verdict, "pairs": pairs}


def collapse(rows: dict[str, dict], control: dict | None) -> dict:
    """Whether the 1x1 plan keeps half of the uptrained original's margin over chance."""
    one = next((r for r in rows.values() if r["producers"] == 1 and r["kv_heads"] == 1), None)
    if one is None or control is None or None in (one["avg_paper4"], control["avg_paper4"]):
        return {"verdict": NOT_MEASURED}
    margin, kept = control["avg_paper4"] - CHANCE_AVERAGE, one["avg_paper4"] - CHANCE_AVERAGE
    result = {"plan": one["config"], "avg_paper4": one["avg_paper4"], "control_avg": control["avg_paper4"],
              "chance": CHANCE_AVERAGE, "ppl": one["gutenberg_ppl"], "control_ppl": control["gutenberg_ppl"]}
    if margin <= 0.02:  # the original itself is at chance: nothing to lose
        return {**result, "verdict": "not measurable (the uptrained original is at chance)"}
    result["margin_kept"] = kept / margin
    return {**result, "verdict": "holds (1x1 collapses)" if kept < margin / 2 else "does not hold"}


def paper_findings(s: Settings, by_run: dict[str, dict]) -> dict:
    rows = _lm_rows(s, by_run)
    control = rows.get(source_of(s).identity)
    return {"kv_order": kv_order(rows), "in_layer": in_layer(rows), "collapse": collapse(rows, control)}


def _fraction(ref: float | None, lm: float | None, kd: float | None, higher_better: bool) -> dict | None:
    if None in (ref, lm, kd):
        return None
    gap = ref > lm if higher_better else ref < lm  # a gap exists only when the reference is the better one
    return {"reference": ref, "lm": lm, "distill": kd, "fraction_closed": (kd - lm) / (ref - lm) if gap else None}


def distillation_gap(s: Settings, by_run: dict[str, dict]) -> dict:
    """``{plan: {metric: {reference: fraction}}}`` for every distilled plan (metrics ``avg_paper4``,
    ``gutenberg_ppl``; references ``control`` = the uptrained original, ``original`` = before uptraining)."""
    identity = source_of(s).identity
    refs = {"control": by_run.get(run_name(identity, "lm", s.init, 0, s.init)), "original": by_run.get("base")}
    out = {}
    for plan in s.distill_plans:
        lm = by_run.get(run_name(plan, "lm", s.init, 0, s.init)) or {}
        kd = by_run.get(run_name(plan, "distill", s.init, 0, s.init)) or {}
        out[plan] = {metric: {name: _fraction((ref or {}).get(metric), lm.get(metric), kd.get(metric),
                                              metric == "avg_paper4") for name, ref in refs.items()}
                     for metric in ("avg_paper4", "gutenberg_ppl")}
    return out
