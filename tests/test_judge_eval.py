"""`mosaic-ray judge-eval`: held-out pairs from the test split, the rubric judge against itself (agreement 100 %),
a position-biased judge caught by the measures, and the tiny model as an LLM judge through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mosaic_ray.judge import RubricJudge
from mosaic_ray.judge.evaluate import evaluate_judge, held_out_pairs
from mosaic_ray.judge.llm import LLMJudge
from mosaic_ray.scenarios import load_tasks

PAIRS = held_out_pairs(24)


def test_pairs_are_held_out_balanced_and_of_different_behaviour():
    assert len(PAIRS) == 24
    assert {c: sum(p.category == c for p in PAIRS) for c in ("harmful", "benign", "injection", "privacy")} == \
        dict.fromkeys(("harmful", "benign", "injection", "privacy"), 6)
    test_ids = {t.task_id for t in load_tasks("test")}
    assert all(p.task_id in test_ids for p in PAIRS)
    assert all(p.a.policy != p.b.policy and p.a.steps != p.b.steps for p in PAIRS)
    assert all(p.brief.request and p.brief.tools for p in PAIRS)


def test_the_rubric_agrees_with_itself_in_both_orders():
    report = evaluate_judge(RubricJudge(), PAIRS)
    o = report["overall"]
    assert o["pairs"] == 24 and o["agreement"] == 1.0 and o["position_consistency"] == 1.0
    assert o["parse_failure_rate"] is None and 0 <= o["tie_rate"] < 0.5


class FirstAlways:
    """A FAKE judge backend (no model) with pure position bias: it always answers "the one shown first"."""

    model = "first-always"

    async def chat(self, conversations, max_tokens):
        return ["Verdict: A"] * len(conversations)


def test_a_position_biased_judge_is_measured_as_such():
    judge = LLMJudge(FirstAlways())
    o = evaluate_judge(judge, PAIRS)["overall"]
    judge.close()
    ties_of_rubric = sum(p.reference == 0.5 for p in PAIRS) / len(PAIRS)
    assert o["position_consistency"] == 0.0 and o["tie_rate"] == 1.0 and o["parse_failure_rate"] == 0.0
    assert o["agreement"] == round(ties_of_rubric, 4) and o["agreement_decisive"] == 0.0


def test_judge_eval_cli_with_the_tiny_llm_judge(tmp_path):
    out = tmp_path / "je.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "mosaic_ray.cli", "judge-eval", "--judge", "llm", "--pairs", "8",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "judge-eval: llm:builtin:tiny-base vs the rubric" in r.stdout
    report = json.loads(out.read_text())
    o = report["overall"]
    assert o["pairs"] == 8 and o["pairs_per_s"] > 0
    stats = report["judge_stats"]
    assert stats["compares"] == 8 and stats["asked"] == 16 + stats["retries"]
    assert o["parse_failure_rate"] == round(stats["parse_failures"] / 16, 4)
    for key in ("agreement", "position_consistency", "tie_rate"):
        assert 0.0 <= o[key] <= 1.0
