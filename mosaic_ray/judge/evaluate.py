"""Measuring a judge before spending a cluster on it (`mosaic-ray judge-eval`: `mosaic_ray.driver.judge_eval`).

Held-out pairs: on the test split's tasks (never trained on), the scripted policies `safe`, `naive`,
`over_refuse` and `random` each play one episode; two different trajectories of the same task make a pair. The
rubric judge (which reads the grader's outcome, i.e. the answer key) gives the reference verdict; the judge under
test gives its own. Reported, overall and per category:

- agreement: share of pairs where the judge's preference equals the rubric's (1, 0.5 or 0); and on the pairs the
  rubric does not tie (`agreement_decisive`);
- position consistency: share of pairs whose verdict does not depend on which trajectory is shown first (an LLM
  judge asks both orders of every pair, and both must parse and agree; the rubric judge is asked again with the
  pair swapped);
- tie rate, parse-failure rate (LLM verdicts without a verdict after the retry, per order asked), pairs/s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mosaic_ray.judge.base import Judge, TaskBrief
from mosaic_ray.judge.rubric import RubricJudge
from mosaic_ray.types import CATEGORIES, Outcome, Step

PAIR_POLICIES = ("safe", "naive", "over_refuse", "random")

__all__ = ["HeldOutPair", "evaluate_judge", "held_out_pairs"]


@dataclass
class Attempt:
    """One scripted episode, as a judge reads it."""

    outcome: Outcome
    steps: list[Step]
    policy: str
    error: str | None = None


@dataclass
class HeldOutPair:
    task_id: str
    category: str
    brief: TaskBrief
    a: Attempt
    b: Attempt
    reference: float = field(default=0.5)
    """The rubric judge's preference of a over b."""


def held_out_pairs(n: int, *, seed: int = 0) -> list[HeldOutPair]:
    """`n` pairs from the test split, round-robin over categories, each of two behaviourally different attempts."""
    from mosaic_ray.evaluation import spread_over_categories
    from mosaic_ray.policies.scripted import get_scripted, play
    from mosaic_ray.scenarios import load_tasks

    rubric = RubricJudge()
    out: list[HeldOutPair] = []
    tasks = spread_over_categories(load_tasks("test", seed=seed), 10 * n)
    for task in tasks:
        attempts = []
        for name in PAIR_POLICIES:
            ep = play(task, get_scripted(name))
            attempts.append(Attempt(ep.outcome(), ep.steps, name))
        seen: set[str] = set()
        distinct = []
        for att in attempts:  # two policies can play the same episode (e.g. safe = naive on a benign task)
            key = repr([(s.action_kind, s.tool, s.arguments_json, s.answer) for s in att.steps])
            if key not in seen:
                seen.add(key)
                distinct.append(att)
        brief = TaskBrief.of(task)
        for i in range(len(distinct)):
            for j in range(i + 1, len(distinct)):
                a, b = distinct[i], distinct[j]
                out.append(HeldOutPair(task.task_id, task.category, brief, a, b,
                                       rubric.compare(task.category, a, b).preference))
        if all(sum(p.category == c for p in out) * len(CATEGORIES) >= n for c in CATEGORIES):
            break
    return _balanced(out, n)


def _balanced(pairs: list[HeldOutPair], n: int) -> list[HeldOutPair]:
    by_cat = {c: [p for p in pairs if p.category == c] for c in CATEGORIES}
    out: list[HeldOutPair] = []
    i = 0
    while len(out) < min(n, len(pairs)):
        for c in CATEGORIES:
            if i < len(by_cat[c]) and len(out) < n:
                out.append(by_cat[c][i])
        i += 1
    return out


def _rate(k: float, n: int) -> float | None:
    return None if n == 0 else round(k / n, 4)


def evaluate_judge(judge: Judge, pairs: list[HeldOutPair],
                   on_pair: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run `judge` over `pairs` (one at a time, both orders for an LLM judge) and measure it against the rubric."""
    t0 = time.perf_counter()
    rows = []
    for k, p in enumerate(pairs):
        before = judge.stats()
        pref = judge.compare(p.category, p.a, p.b, p.brief).preference
        after = judge.stats()
        if "position_inconsistent" in after:  # the judge asked both orders itself: both parsed and agreed
            failures = after["parse_failures"] - before.get("parse_failures", 0)
            consistent = failures == 0 and after["position_inconsistent"] == before.get("position_inconsistent", 0)
        else:
            consistent = judge.compare(p.category, p.b, p.a, p.brief).preference == 1.0 - pref
            failures = 0
        rows.append({"category": p.category, "preference": pref, "reference": p.reference,
                     "consistent": consistent, "parse_failures": failures})
        if on_pair is not None:
            on_pair(k + 1)
    elapsed = time.perf_counter() - t0

    parses = "position_inconsistent" in judge.stats()  # an LLM judge; the rubric parses nothing

    def block(rs: list[dict[str, Any]]) -> dict[str, Any]:
        decisive = [r for r in rs if r["reference"] != 0.5]
        return {"pairs": len(rs),
                "agreement": _rate(sum(r["preference"] == r["reference"] for r in rs), len(rs)),
                "agreement_decisive": _rate(sum(r["preference"] == r["reference"] for r in decisive), len(decisive)),
                "position_consistency": _rate(sum(r["consistent"] for r in rs), len(rs)),
                "tie_rate": _rate(sum(r["preference"] == 0.5 for r in rs), len(rs)),
                "parse_failure_rate": _rate(sum(r["parse_failures"] for r in rs), 2 * len(rs)) if parses else None}

    overall = block(rows)
    overall["pairs_per_s"] = round(len(rows) / max(elapsed, 1e-9), 3)
    return {"judge": judge.name, "overall": overall,
            "by_category": {c: block([r for r in rows if r["category"] == c]) for c in CATEGORIES
                            if any(r["category"] == c for r in rows)},
            "judge_stats": dict(judge.stats())}
