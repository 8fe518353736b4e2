"""The judge interface and the pairwise judging of one group.

MOSAIC trains without trajectory labels: trajectories of the same task are compared pairwise, which captures
"an early refusal beats a late abort" where one scalar per episode cannot. A judge only answers
`compare(category, a, b)`; which pairs exist and how verdicts become rewards is decided here and in
`mosaic_ray.rewards`, so rubric and LLM judges are interchangeable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mosaic_ray.schema import PairRecord, TrajectoryRecord
from mosaic_ray.types import Outcome, Step

if TYPE_CHECKING:
    from mosaic_ray.scenarios.tasks import Task

PREFERENCES = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class Judgement:
    """A verdict on (a, b): `preference` is 1 (a better), 0.5 (tie) or 0 (b better); `reason` says why."""

    preference: float
    reason: str

    def __post_init__(self) -> None:
        if self.preference not in PREFERENCES:
            raise ValueError(f"Judgement.preference must be one of {PREFERENCES}, got {self.preference!r}")

    def swapped(self) -> Judgement:
        """The same verdict seen from (b, a)."""
        return Judgement(1.0 - self.preference, self.reason)


@dataclass(frozen=True)
class TaskBrief:
    """What a judge may know about the task: the user's request and the tools' schemas (OpenAI function format).

    Deliberately no category label, grading spec or answer key: an LLM judge must decide from what the agent saw.
    """

    request: str
    tools: tuple[dict[str, Any], ...] = ()

    @classmethod
    def of(cls, task: Task) -> TaskBrief:
        """The brief of a scenario `Task`: its prompt and the schemas of its tools (with `refuse`)."""
        from mosaic_ray.envs import tool_specs
        from mosaic_ray.protocol import tool_schemas

        return cls(task.prompt, tuple(tool_schemas(tool_specs(task.tools))))


class JudgedTrajectory(Protocol):
    """What a judge reads: the grader's outcome and the steps (a `TrajectoryRecord` satisfies it)."""

    outcome: Outcome
    steps: list[Step]
    error: str | None


@runtime_checkable
class Judge(Protocol):
    """Compares two trajectories of the same task. Implementations must be thread-safe (pairs run in a pool)."""

    name: str
    parallel: bool
    """True when comparisons wait on I/O (a model server) and should run concurrently."""

    def compare(self, task_category: str, traj_a: JudgedTrajectory, traj_b: JudgedTrajectory,
                brief: TaskBrief | None = None) -> Judgement:
        """`brief` is the task as the agent saw it; judges that read trajectories (the LLM judge) need it, the
        rubric judge grades outcomes and ignores it."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters (the LLM judge: requests, parse failures, order disagreements, cache hits); empty for judges
        that have none."""
        ...


def group_pairs(n: int) -> list[tuple[int, int]]:
    """All unordered pairs (i, j), i < j, of a group of n — G(G−1)/2 comparisons."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def judge_group(judge: Judge, trajs: Sequence[TrajectoryRecord], executor: Executor | None = None,
                brief: TaskBrief | None = None) -> list[PairRecord]:
    """Judge every pair of one group (`trajs` sorted by `sample_idx`); see `judge_groups`."""
    return judge_groups(judge, [trajs], executor, None if brief is None else {trajs[0].task_id: brief})[0]


def judge_groups(judge: Judge, groups: Sequence[Sequence[TrajectoryRecord]], executor: Executor | None = None,
                 briefs: Mapping[str, TaskBrief] | None = None) -> list[list[PairRecord]]:
    """Judge every pair of every group; with an `executor` and a `parallel` judge, all pairs of all groups run
    concurrently (an LLM judge's engine then batches them).

    Output order is the pair order of `group_pairs`, independent of completion order, so the same groups always
    yield the same records. A cheap judge (`parallel = False`, the rubric) runs inline: a thread hop costs more
    than its comparison.
    """
    jobs = []
    for trajs in groups:
        if not trajs:
            raise ValueError("judge_groups: empty group")
        gid = trajs[0].group_id
        for t in trajs:
            if t.group_id != gid:
                raise ValueError(f"judge_groups: {t.traj_id!r} is in group {t.group_id!r}, expected {gid!r}")
        jobs += [(trajs, i, j) for i, j in group_pairs(len(trajs))]

    def one(job: tuple[Sequence[TrajectoryRecord], int, int]) -> Judgement:
        trajs, i, j = job
        brief = None if briefs is None else briefs.get(trajs[0].task_id)
        return judge.compare(trajs[0].category, trajs[i], trajs[j], brief)

    use_pool = executor is not None and judge.parallel
    verdicts = iter(list(executor.map(one, jobs)) if use_pool else [one(job) for job in jobs])
    out = []
    for trajs in groups:
        head = trajs[0]
        out.append([PairRecord(pair_id=f"{head.group_id}/{trajs[i].sample_idx}-{trajs[j].sample_idx}",
                               group_id=head.group_id, task_id=head.task_id, iteration=head.iteration,
                               category=head.category, a=trajs[i].traj_id, b=trajs[j].traj_id,
                               preference=v.preference, judge=judge.name, reason=v.reason)
                    for (i, j), v in zip(group_pairs(len(trajs)), verdicts)])
    return out
