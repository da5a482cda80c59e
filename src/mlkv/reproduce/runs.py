"""The models a reproduction makes and evaluates, named.

- uptraining runs (``planned_runs``): every plan with ``lm`` (the original's own plan too: the control), the
  ``distill_plans`` with ``distill``, and the conversion-init comparison (``lm`` from other inits, other data
  orders);
- step-0 evaluations (``step0_runs``): every conversion before any training (the original's own plan is the
  original itself, evaluated as ``base``);
- ``task_runs``: which of them also get the zero-shot tasks (the init comparison is judged on perplexity).

Names: ``<plan>-<objective>[-<init>][-s<seed>]`` and ``<plan>-step0[-<init>]``, the init written only when it is
not the run's main one (``--init``). An init that computes the same function as one already in the run for a plan
is skipped (``comparison_inits``): ``mean`` and ``pairwise`` agree whenever no producer serves more than two layers,
and every weight-only init agrees where no layer is shared.
"""

from __future__ import annotations

import re

from mlkv.model.convert import DEFAULT_INIT, INITS
from mlkv.reproduce.config import Settings, source_of
from mlkv.reproduce.source import max_served

__all__ = ["run_name", "step0_name", "plan_of", "init_of", "planned_runs", "step0_runs", "task_runs",
           "comparison_inits", "conversions", "WEIGHT_ONLY_INITS"]

#: Inits computed from the weights alone (``lsq`` also reads calibration text).
WEIGHT_ONLY_INITS = ("mean", "pairwise", "first")
_SUFFIX = re.compile(r"-(lm|distill|step0)(?:-(" + "|".join(INITS) + r"))?(?:-s\d+)?$")


def run_name(plan: str, objective: str = "lm", init: str = DEFAULT_INIT, seed: int = 0,
             main_init: str = DEFAULT_INIT) -> str:
    return f"{plan}-{objective}" + ("" if init == main_init else f"-{init}") + (f"-s{seed}" if seed else "")


def step0_name(plan: str, init: str, main_init: str) -> str:
    return f"{plan}-step0" + ("" if init == main_init else f"-{init}")


def plan_of(run: str, original: str = "MHA-144") -> str:
    """``MLKV-6-distill`` -> ``MLKV-6``; ``6x1-lm-lsq-s1`` -> ``6x1``; ``base`` -> ``original``."""
    return original if run == "base" else _SUFFIX.sub("", run)


def init_of(run: str, main_init: str) -> str | None:
    """The conversion init a run started from (None for ``base``, the original itself)."""
    if run == "base":
        return None
    match = _SUFFIX.search(run)
    return match[2] if match and match[2] else main_init


def comparison_inits(s: Settings, plan: str) -> tuple[list[str], dict[str, str]]:
    """``(inits to compare with the main one, {skipped init: why})`` for ``plan``: an init is skipped when it is the
    same function as the main init or one kept before it."""
    shape = source_of(s).plan(plan)
    served = max_served(shape)

    def same(a: str, b: str) -> bool:
        if a in WEIGHT_ONLY_INITS and b in WEIGHT_ONLY_INITS:
            return served == 1 or (served == 2 and {a, b} == {"mean", "pairwise"})
        return False

    kept, skipped = [], {}
    for init in s.init_comparison:
        twin = next((other for other in [s.init, *kept] if same(init, other)), None)
        if twin is None:
            kept.append(init)
        else:
            why = "no layer is shared" if served == 1 else "no producer serves more than two layers"
            skipped[init] = f"the same function as {twin} on {plan} ({why})"
    return kept, skipped


def _run(s: Settings, plan: str, objective: str, init: str, seed: int = 0) -> dict:
    return dict(name=run_name(plan, objective, init, seed, s.init), plan=plan, objective=objective, init=init,
                seed=seed, main=init == s.init and seed == 0)


def planned_runs(s: Settings) -> list[dict]:
    """Every uptraining run: ``name``, ``plan``, ``objective``, ``init``, ``seed`` (data order) and ``main`` (the
    main init at data order 0: the runs of the paper-style table)."""
    runs = [_run(s, p, "lm", s.init) for p in s.plans]
    runs += [_run(s, p, "distill", s.init) for p in s.distill_plans]
    for seed in range(s.init_seeds):
        for plan in s.init_plans:
            inits = [s.init, *comparison_inits(s, plan)[0]]
            runs += [_run(s, plan, "lm", init, seed) for init in inits if (init, seed) != (s.init, 0)]
    return runs


def conversions(s: Settings) -> list[tuple[str, str]]:
    """Every ``(plan, init)`` converted from the original, main init first in the order of ``--plans`` (the
    original's own plan is not converted: it is the original)."""
    identity = source_of(s).identity
    pairs = dict.fromkeys((r["plan"], r["init"]) for r in planned_runs(s))  # in the order of --plans
    return [p for p in pairs if p[0] != identity]


def step0_runs(s: Settings) -> dict[str, tuple[str, str]]:
    """``{name: (plan, init)}`` of the conversions evaluated before training (none with ``--step0 off``)."""
    if s.step0 == "off":
        return {}
    return {step0_name(plan, init, s.init): (plan, init) for plan, init in conversions(s)}


def task_runs(s: Settings) -> set[str]:
    """The models that get zero-shot tasks: the original, the main runs, and with ``--step0 tasks`` the main-init
    conversions at step 0. The init comparison's extra runs get perplexities only."""
    names = {"base"} | {r["name"] for r in planned_runs(s) if r["main"]}
    if s.step0 == "tasks":
        names |= {name for name, (plan, init) in step0_runs(s).items() if init == s.init}
    return names
