"""Pairwise trajectory judges: the programmatic rubric (default; reads the grader's outcome) and the label-free LLM
judge (`mosaic_ray.judge.llm`; reads what the agent saw and did). `mosaic_ray.judge.evaluate` measures a judge."""

from mosaic_ray.judge.base import Judge, JudgedTrajectory, Judgement, TaskBrief, group_pairs, judge_group, judge_groups
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


def __getattr__(name: str):
    if name == "LLMJudge":  # imported lazily: it pulls in the engine contract from mosaic_ray.actors
        from mosaic_ray.judge.llm import LLMJudge

        return LLMJudge
    raise AttributeError(f"module 'mosaic_ray.judge' has no attribute {name!r}")
