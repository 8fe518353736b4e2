"""PairBuilder: turns the trajectory stream into the run's `trajectories/`, `pairs/` and `rewards/` datasets.

Trajectories arrive in any order and batching (Arrow record batches / tables, or records). A group is complete
when all G samples of its `group_id` are in; complete groups are judged pairwise (pairs run on a thread pool),
rewarded (`mosaic_ray.rewards`) and written as one shard per dataset per `groups_per_shard` groups, committed
through the storage manifest (`mosaic_ray.storage`).

Fault tolerance — the actor is started with `max_restarts`; on (re)start it:
1. `recover()`s every dataset: takes the next writer epoch (a zombie predecessor's commits now fail with
   `StaleWriterError`) and deletes temp / uncommitted files (a half-written shard is never visible);
2. reads the manifests: a group committed in a dataset is never written to it again;
3. repairs groups whose trajectories were committed but whose pairs or rewards were not (a crash between the
   commits): they are judged from the STORED trajectories, so the group is complete without a rerun.
Pairs and rewards are always computed from the trajectories (and pairs) the datasets hold once committed,
never from a regenerated copy: regeneration is not bit-reproducible (vLLM, GPU, async), so rewards computed
from new samples would be attached to the stored ones.
Groups buffered in memory at the crash are lost; the producer re-sends what `committed_groups()` lacks (or the
whole stream — committed groups and duplicate trajectories are skipped), so every pair lands exactly once.
Shard names hash the group ids they hold, so a rewrite of the same groups is a no-op at the storage layer too.

The class is plain Python (tests drive it in-process); `remote_pair_builder` wraps it as a Ray actor.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from mosaic_ray.config import JudgeConfig
from mosaic_ray.judge import Judge, RubricJudge, TaskBrief, judge_groups
from mosaic_ray.judge.llm import ChatBackend, HTTPChat, LLMJudge, VerdictCache
from mosaic_ray.rewards import group_rewards
from mosaic_ray.schema import PairRecord, RewardRecord, TrajectoryRecord, VerdictRecord, from_arrow, to_arrow
from mosaic_ray.storage import RunStorage

DATASET_ORDER = ("trajectories", "pairs", "rewards")
"""Write order per flush; a group counts as committed once it is in all three."""

__all__ = ["DATASET_ORDER", "PairBuilder", "PairBuilderStats", "remote_pair_builder", "shard_name"]


@dataclass
class PairBuilderStats:
    """Counters since this process started (they restart at zero after an actor restart)."""

    received: int = 0
    """Trajectory rows passed to `add`."""
    duplicates: int = 0
    """Rows whose traj_id was already buffered (a retried batch)."""
    skipped_committed: int = 0
    """Rows of groups already committed (a replay after a restart)."""
    groups_committed: int = 0
    """Groups this process wrote to every dataset (each group is committed once across restarts)."""
    groups_repaired: int = 0
    """Groups whose pairs / rewards this process completed from their stored trajectories at start."""
    trajectories_written: int = 0
    pairs_written: int = 0
    rewards_written: int = 0
    shards_written: int = 0
    pending_groups: int = 0
    """Groups still waiting for samples."""
    ready_groups: int = 0
    """Complete groups waiting for the next shard."""
    judge_s: float = 0.0
    write_s: float = 0.0
    pairs_per_s: float = 0.0
    """pairs_written / (judge_s + write_s)."""
    judge: dict[str, Any] | None = None
    """The judge's own counters (LLM judge: compares, requests, parse failures, position inconsistencies, ties,
    cache hits, latency)."""


def shard_name(group_ids: Sequence[str], iteration: int) -> str:
    """Deterministic shard name of a set of groups: iteration (for ordering by eye) + hash of the sorted ids."""
    digest = hashlib.sha1("\n".join(sorted(group_ids)).encode()).hexdigest()[:20]
    return f"it{iteration:06d}-{digest}"


class PairBuilder:
    """Completes groups of `group_size` samples, judges and rewards them, and commits the three datasets."""

    def __init__(self, storage_uri: str, group_size: int, judge_cfg: JudgeConfig | None = None, *,
                 judge: Judge | None = None, judge_backend: ChatBackend | None = None,
                 briefs: Mapping[str, TaskBrief] | None = None, groups_per_shard: int = 8,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        """`judge_cfg.kind: llm` judges with an `LLMJudge` over `judge_backend` (the driver passes a `ServeChat`
        to its `mosaic-judge` app), or over `judge.endpoint` when no backend is given; it needs `briefs` (task id
        → the request and tools the agent saw). `judge=` injects a ready judge (tests)."""
        if group_size < 2:
            raise ValueError(f"PairBuilder: group_size must be >= 2 (pairs need two trajectories), got {group_size}")
        if groups_per_shard < 1:
            raise ValueError(f"PairBuilder: groups_per_shard must be >= 1, got {groups_per_shard}")
        self.cfg = judge_cfg or JudgeConfig()
        self.group_size = group_size
        self.groups_per_shard = groups_per_shard
        self.storage = RunStorage(storage_uri, storage_options)
        self.briefs = dict(briefs or {})
        self.judge = judge if judge is not None else self._build_judge(judge_backend)
        self._pool = (ThreadPoolExecutor(max_workers=self.cfg.num_workers, thread_name_prefix="judge")
                      if self.judge.parallel else None)
        self._stats = PairBuilderStats()
        self._buffer: dict[str, dict[int, TrajectoryRecord]] = {}
        self._ready: list[str] = []
        self._committed: dict[str, set[str]] = {}
        for ds in DATASET_ORDER:
            self.storage.recover(ds)
            self._committed[ds] = {g for s in self.storage.committed_shards(ds) for g in s.meta.get("groups", [])}
        self._repair()

    # ----------------------------------------------------------------------------------------------- verbs

    def add(self, batch: pa.Table | pa.RecordBatch | Sequence[TrajectoryRecord]) -> None:
        """Buffer trajectories; write a shard whenever `groups_per_shard` groups are complete."""
        records = list(batch) if isinstance(batch, (list, tuple)) else from_arrow(batch, TrajectoryRecord)
        done = set(self.committed_groups())
        for rec in records:
            self._stats.received += 1
            if rec.group_id in done:
                self._stats.skipped_committed += 1
                continue
            if not 0 <= rec.sample_idx < self.group_size:
                raise ValueError(f"trajectory {rec.traj_id!r}: sample_idx {rec.sample_idx} outside "
                                 f"[0, group_size={self.group_size})")
            group = self._buffer.setdefault(rec.group_id, {})
            if rec.sample_idx in group:
                self._stats.duplicates += 1
                continue
            group[rec.sample_idx] = rec
            if len(group) == self.group_size:
                self._ready.append(rec.group_id)
        while len(self._ready) >= self.groups_per_shard:
            self._write(self._ready[: self.groups_per_shard])

    def flush(self) -> dict[str, Any]:
        """Write every complete group now (incomplete groups stay buffered); returns `stats()`."""
        while self._ready:
            self._write(self._ready[: self.groups_per_shard])
        return self.stats()

    def _build_judge(self, backend: ChatBackend | None) -> Judge:
        if self.cfg.kind == "rubric":
            return RubricJudge(self.cfg.tie_tolerance_tokens)
        if backend is None:
            if self.cfg.endpoint is None:
                raise ValueError("judge.kind: llm needs a judge backend: the run's mosaic-judge Serve app, or "
                                 "judge.endpoint (an OpenAI-compatible server)")
            backend = HTTPChat.from_config(self.cfg)
        self.storage.recover("verdicts")
        cache = VerdictCache(self.storage.read_dataset("verdicts").to_pylist()
                             if self.storage.committed_shards("verdicts") else ())
        return LLMJudge(backend, max_new_tokens=self.cfg.max_new_tokens, cache=cache)

    def stats(self) -> dict[str, Any]:
        s = self._stats
        s.pending_groups = len(self._buffer) - len(self._ready)
        s.ready_groups = len(self._ready)
        busy = s.judge_s + s.write_s
        s.pairs_per_s = s.pairs_written / busy if busy > 0 else 0.0
        s.judge = self.judge.stats()
        return asdict(s)

    def committed_groups(self) -> list[str]:
        """Group ids committed in all three datasets (sorted)."""
        return sorted(set.intersection(*(self._committed[ds] for ds in DATASET_ORDER)))

    # -------------------------------------------------------------------------------------------- internals

    def _repair(self) -> None:
        """Complete the groups a crash left with trajectories but without pairs or rewards (from storage)."""
        partial = sorted(self._committed["trajectories"] - set(self.committed_groups()))
        if not partial:
            return
        stored = self._stored("trajectories", partial, TrajectoryRecord)
        by_iteration: dict[int, list[str]] = {}
        for g in partial:
            by_iteration.setdefault(stored[g][0].iteration, []).append(g)
        for chunk in by_iteration.values():
            for i in range(0, len(chunk), self.groups_per_shard):
                self._commit({g: stored[g] for g in chunk[i:i + self.groups_per_shard]})
        self._stats.groups_repaired += len(partial)

    def _stored(self, dataset: str, group_ids: Sequence[str], cls: type) -> dict[str, list]:
        """Committed records of `group_ids` in `dataset` (trajectories in sample order), by group id."""
        want = set(group_ids)
        if not want:
            return {}
        table = self.storage.read_dataset(dataset, shards=lambda s: not want.isdisjoint(s.meta.get("groups", ())))
        out: dict[str, list] = {}
        for rec in from_arrow(table, cls):
            if rec.group_id in want:
                out.setdefault(rec.group_id, []).append(rec)
        if cls is TrajectoryRecord:
            for recs in out.values():
                recs.sort(key=lambda r: r.sample_idx)
        missing = want - set(out)
        if missing:
            raise RuntimeError(f"{self.storage.url(dataset)}: manifest lists group {min(missing)!r} but its "
                               f"shards hold no rows of it")
        return out

    def _judge(self, groups: list[list[TrajectoryRecord]]) -> list[list[PairRecord]]:
        """Judge the groups; an LLM judge gets each task's brief, and its new verdicts are committed to the
        `verdicts` dataset before any pair is (so a crash after judging costs no second question)."""
        if not isinstance(self.judge, LLMJudge):
            return judge_groups(self.judge, groups, self._pool)
        missing = sorted({g[0].task_id for g in groups} - set(self.briefs))
        if missing:
            raise ValueError(f"pair builder: no task brief (request and tools) for task {missing[0]!r}; the LLM "
                             f"judge cannot compare its trajectories ({len(missing)} task(s) without one)")
        if groups:
            self.judge.iteration = min(g[0].iteration for g in groups)
        out = judge_groups(self.judge, groups, self._pool, self.briefs)
        rows = self.judge.cache.drain()
        if rows:
            name = shard_name([r["key"] for r in rows], self.judge.iteration)
            self.storage.write_shard("verdicts", name, to_arrow([VerdictRecord(**r) for r in rows], VerdictRecord),
                                     meta={"verdicts": len(rows)})
        return out

    def _write(self, group_ids: list[str]) -> None:
        groups = {g: [self._buffer[g][i] for i in sorted(self._buffer[g])] for g in sorted(group_ids)}
        self._commit(groups)
        for g in groups:
            del self._buffer[g]
            self._ready.remove(g)

    def _commit(self, groups: dict[str, list[TrajectoryRecord]]) -> None:
        """Judge, reward and write `groups` to every dataset that lacks them. What a dataset already holds wins:
        stored trajectories replace the given ones, stored pairs are not judged again."""
        t0 = time.perf_counter()
        done = self._committed
        groups = {**groups, **self._stored("trajectories", [g for g in groups if g in done["trajectories"]],
                                           TrajectoryRecord)}
        pairs: dict[str, list[PairRecord]] = self._stored("pairs", [g for g in groups if g in done["pairs"]],
                                                          PairRecord)
        to_judge = [g for g in groups if g not in pairs]
        pairs.update(zip(to_judge, self._judge([groups[g] for g in to_judge])))
        rewards: dict[str, list[RewardRecord]] = {g: group_rewards(trajs, pairs[g], self.cfg)
                                                  for g, trajs in groups.items()}
        t1 = time.perf_counter()
        rows_by_ds = {"trajectories": groups, "pairs": pairs, "rewards": rewards}
        cls_by_ds = {"trajectories": TrajectoryRecord, "pairs": PairRecord, "rewards": RewardRecord}
        for ds in DATASET_ORDER:
            todo = [g for g in groups if g not in self._committed[ds]]
            if not todo:
                continue
            rows = [r for g in todo for r in rows_by_ds[ds][g]]
            iteration = min(groups[g][0].iteration for g in todo)
            _, written = self.storage.write_shard(ds, shard_name(todo, iteration), to_arrow(rows, cls_by_ds[ds]),
                                                  meta={"groups": todo})
            self._committed[ds].update(todo)
            if written:
                self._stats.shards_written += 1
                setattr(self._stats, f"{ds}_written", getattr(self._stats, f"{ds}_written") + len(rows))
        self._stats.groups_committed += len(groups)
        self._stats.judge_s += t1 - t0
        self._stats.write_s += time.perf_counter() - t1


def remote_pair_builder(storage_uri: str, group_size: int, judge_cfg: JudgeConfig | None = None, *,
                        max_restarts: int = 3, num_cpus: float = 0.5,
                        runtime_env: Mapping[str, Any] | None = None, **kwargs: Any):
    """Start `PairBuilder` as a Ray actor that restarts (and resumes from the manifests) after a crash.

    `max_task_retries` stays 0: a call in flight at the crash raises `RayActorError` to the producer, which
    then re-sends what `committed_groups()` lacks — replaying only the failed call would lose buffered groups.
    S3 credentials come from the node's own environment or instance role (s3fs/botocore's chain), never from
    `runtime_env`: Ray logs a runtime env and shows it in the dashboard.
    """
    import ray

    cls = ray.remote(PairBuilder)
    options: dict[str, Any] = {"max_restarts": max_restarts, "max_task_retries": 0, "num_cpus": num_cpus}
    if runtime_env:
        options["runtime_env"] = dict(runtime_env)
    return cls.options(**options).remote(storage_uri, group_size, judge_cfg, **kwargs)


def retry_delay_s(attempt: int) -> float:
    """Seconds before a call lost to the pair builder's crash is sent again (its restart takes about a second)."""
    return 1.0 + attempt


def call_pair_builder(handle: Any, method: str, *args: Any, attempts: int,
                      on_lost: Callable[[int, BaseException], None] | None = None) -> Any:
    """`handle.method(*args)`, sent again to the restarted actor when its process dies during the call
    (`RayActorError`; `max_task_retries` is 0, see `remote_pair_builder`), at most `attempts` times in all.
    `on_lost(attempt, exc)` hears of each lost call; the last one's error is raised."""
    import ray
    from ray.exceptions import RayActorError

    for attempt in range(attempts):
        try:
            return ray.get(getattr(handle, method).remote(*args))
        except RayActorError as exc:
            if on_lost is not None:
                on_lost(attempt, exc)
            if attempt + 1 == attempts:
                raise
            time.sleep(retry_delay_s(attempt))
    raise ValueError(f"call_pair_builder: attempts must be >= 1, got {attempts}")


async def acall_pair_builder(handle: Any, method: str, *args: Any, attempts: int) -> Any:
    """`call_pair_builder` for an actor's event loop: awaited, and the wait between attempts yields."""
    import asyncio

    from ray.exceptions import RayActorError

    for attempt in range(attempts):
        try:
            return await getattr(handle, method).remote(*args)
        except RayActorError:
            if attempt + 1 == attempts:
                raise
            await asyncio.sleep(retry_delay_s(attempt))
    raise ValueError(f"acall_pair_builder: attempts must be >= 1, got {attempts}")
