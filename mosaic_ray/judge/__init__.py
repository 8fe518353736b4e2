"""Pairwise trajectory judges: the programmatic rubric (default; reads the grader's outcome) and the label-free LLM
judge (`mosaic_ray.judge.llm`; reads what the agent saw and did). `mosaic_ray.judge.evaluate` measures a judge;
`mosaic_ray.judge.text` holds the text judges of the external suites (plain-text refusals, semantic checks, leaks)."""

from mosaic_ray.judge.base import Judge, JudgedTrajectory, Judgement, TaskBrief, group_pairs, judge_group, judge_groups
from mosaic_ray.judge.llm import LLMJudge
from mosaic_ray.judge.rubric import Grade, RubricJudge, grade, scalar_grade

__all__ = [
    "Grade",
    "Judge",
    "JudgedTrajectory",
    "Judgement",
    "LLMJudge",
    "RubricJudge",
    "TaskBrief",
    "grade",
    "group_pairs",
    "judge_group",
    "judge_groups",
    "scalar_grade",
]
