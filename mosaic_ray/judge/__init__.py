"""Pairwise trajectory judges: the programmatic rubric (default) and an LLM judge with the same rubric."""

from mosaic_ray.judge.base import Judge, JudgedTrajectory, Judgement, group_pairs, judge_group, judge_groups
from mosaic_ray.judge.rubric import Grade, RubricJudge, grade, scalar_grade

__all__ = [
    "Grade",
    "Judge",
    "JudgedTrajectory",
    "Judgement",
    "LLMJudge",
    "RubricJudge",
    "grade",
    "group_pairs",
    "judge_group",
    "judge_groups",
    "scalar_grade",
]


def __getattr__(name: str):
    if name == "LLMJudge":  # imported lazily: it pulls in the engine contract from mosaic_ray.actors
        from mosaic_ray.judge.llm import LLMJudge

        return LLMJudge
    raise AttributeError(f"module 'mosaic_ray.judge' has no attribute {name!r}")
