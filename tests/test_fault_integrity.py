"""[Fault tolerance] Data integrity without Ray: rewards always belong to the stored trajectories (a crash between
a group's commits), a stale writer's commit fails loudly instead of overwriting, and local shards and manifests
are fsynced before they count."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest
from mosaic_ray.actors.pair_builder import DATASET_ORDER, PairBuilder

from mosaic_ray.config import JudgeConfig
from mosaic_ray.judge import RubricJudge, judge_groups
from mosaic_ray.rewards import group_rewards
from mosaic_ray.schema import TrajectoryRecord, example_trajectory, from_arrow, to_arrow
from mosaic_ray.storage import RunStorage
from mosaic_ray.types import Outcome

G = 4
CFG = JudgeConfig(tie_tolerance_tokens=8)
HARMFUL = [Outcome("refused", refused_at_step=0, num_tokens=30), Outcome("answered", harmful_action_step=1),
           Outcome("refused", refused_at_step=2, num_tokens=90), Outcome("answered", harmful_action_step=0)]


def samples(num_groups: int, *, regenerated: bool = False) -> list[TrajectoryRecord]:
    """G harmful samples per task; `regenerated` = the same ids with different outcomes (sampling is not
    bit-reproducible on vLLM / GPU / async engines)."""
    return [example_trajectory("run", 1, f"task{g}", i, HARMFUL[G - 1 - i if regenerated else i], category="harmful",
                               num_steps=1 + i % 3, seed=1 if regenerated else 0)
            for g in range(num_groups) for i in range(G)]


class Crash(BaseException):
    """Stands in for the process dying (not an Exception: nothing catches it)."""


def crash_before(builder: PairBuilder, dataset: str) -> None:
    real = builder.storage.write_shard

    def write_shard(ds, *args, **kwargs):
        if ds == dataset:
            raise Crash(f"killed before committing {ds}")
        return real(ds, *args, **kwargs)
    builder.storage.write_shard = write_shard


@pytest.mark.parametrize("crash_at", ["pairs", "rewards"])
def test_rewards_belong_to_the_stored_trajectories_after_a_crash_between_commits(tmp_path, crash_at):
    uri = str(tmp_path / "run")
    first = PairBuilder(uri, G, CFG, groups_per_shard=1)
    crash_before(first, crash_at)
    with pytest.raises(Crash):
        first.add(samples(2))  # trajectories (and maybe pairs) of group 0 are committed, the rest is not
    restarted = PairBuilder(uri, G, CFG, groups_per_shard=1)
    restarted.add(samples(2, regenerated=True))  # the producer re-sends the groups it does not see committed
    restarted.flush()
    st = RunStorage(uri)
    traj = from_arrow(st.read_dataset("trajectories"))
    assert sorted(restarted.committed_groups()) == sorted({t.group_id for t in traj}) and len(traj) == 2 * G
    by_group: dict[str, list[TrajectoryRecord]] = {}
    for t in sorted(traj, key=lambda t: t.sample_idx):
        by_group.setdefault(t.group_id, []).append(t)
    expected = {}
    for trajs in by_group.values():
        pairs = judge_groups(RubricJudge(CFG.tie_tolerance_tokens), [trajs])[0]
        expected.update({r.traj_id: r for r in group_rewards(trajs, pairs, CFG)})
    rewards = st.read_dataset("rewards").to_pylist()
    assert len(rewards) == len(expected) == 2 * G
    for row in rewards:  # every reward is the one the stored trajectories earn
        assert row["advantage"] == pytest.approx(expected[row["traj_id"]].advantage), row["traj_id"]
        assert row["wins"] == pytest.approx(expected[row["traj_id"]].wins), row["traj_id"]
    pair_ids = st.read_dataset("pairs").column("pair_id").to_pylist()
    assert len(pair_ids) == len(set(pair_ids)) == 2 * G * (G - 1) // 2


def test_restart_completes_a_half_committed_group_without_a_rerun(tmp_path):
    uri = str(tmp_path / "run")
    first = PairBuilder(uri, G, CFG, groups_per_shard=1)
    crash_before(first, "pairs")
    with pytest.raises(Crash):
        first.add(samples(1))
    restarted = PairBuilder(uri, G, CFG, groups_per_shard=1)
    assert restarted.committed_groups() == ["run/1/task0"]  # nothing to regenerate
    assert restarted.stats()["groups_repaired"] == 1
    st = RunStorage(uri)
    assert [len(st.committed_shards(ds)) for ds in DATASET_ORDER] == [1, 1, 1]


def _table(n: int) -> pa.Table:
    return pa.table({"x": list(range(n))})


def test_a_stale_writer_fails_loudly_and_cannot_overwrite(tmp_path):
    from mosaic_ray.storage import StaleWriterError  # new with fencing

    uri = str(tmp_path / "run")
    zombie = RunStorage(uri)
    zombie.write_shard("pairs", "a", _table(1))
    successor = RunStorage(uri)  # a restarted actor, or `--resume` while the old job still runs
    successor.recover("pairs")
    successor.write_shard("pairs", "b", _table(2))
    with pytest.raises(StaleWriterError, match=r"epoch 1.*epoch 2"):
        zombie.write_shard("pairs", "c", _table(3))
    assert [s.name for s in RunStorage(uri).committed_shards("pairs")] == ["a", "b"]
    assert successor.recover("pairs") == [str(tmp_path / "run" / "pairs" / "c.parquet")]  # its orphan shard
    with pytest.raises(StaleWriterError):  # the zombie stays fenced out
        zombie.write_shard("pairs", "d", _table(1))


def test_a_zombie_pair_builder_cannot_commit_after_a_restart(tmp_path):
    from mosaic_ray.storage import StaleWriterError

    uri = str(tmp_path / "run")
    zombie = PairBuilder(uri, G, CFG, groups_per_shard=1)
    zombie.add(samples(1))
    PairBuilder(uri, G, CFG, groups_per_shard=1)  # the restarted actor (the old process never died)
    with pytest.raises(StaleWriterError):
        zombie.add(samples(2)[G:])
    assert RunStorage(uri).read_dataset("trajectories").num_rows == G


def test_local_shards_and_manifests_are_fsynced_before_they_count(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", f"{src} -> {dst}"))
        return real_replace(src, dst)

    st = RunStorage(str(tmp_path / "run"))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    st.write_shard("rewards", "s1", to_arrow(samples(1)))
    renames = [e for e in events if e[0] == "rename"]
    shard_rename = next(i for i, e in enumerate(events) if e[0] == "rename" and e[1].endswith("/s1.parquet"))
    manifest_rename = next(i for i, e in enumerate(events) if e[0] == "rename" and e[1].endswith("/_manifest.json"))
    shard_tmp = events[shard_rename][1].split(" -> ")[0]
    manifest_tmp = events[manifest_rename][1].split(" -> ")[0]
    assert ("fsync", shard_tmp) in events[:shard_rename]  # the shard's bytes are on disk before its name
    assert ("fsync", manifest_tmp) in events[shard_rename:manifest_rename]  # then the manifest's bytes
    assert ("fsync", str(tmp_path / "run" / "rewards")) in events[manifest_rename:]  # and the new name
    assert shard_rename < manifest_rename and renames
