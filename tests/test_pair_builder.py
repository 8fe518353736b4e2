"""PairBuilder: the same stream gives the same datasets (locally and on a real S3 server, read back with plain
pyarrow); replays and duplicates never add rows; a killed actor restarts and every pair lands exactly once; an
LLM judge's verdicts are committed before the pairs, so a crash in between costs no second question."""

from __future__ import annotations

import os
import random
import time
import uuid

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from mosaic_ray.actors.pair_builder import PairBuilder, remote_pair_builder

from mosaic_ray.config import JudgeConfig
from mosaic_ray.judge import TaskBrief
from mosaic_ray.schema import example_trajectory, to_arrow
from mosaic_ray.storage import RunStorage
from mosaic_ray.types import Outcome

G = 4
CFG = JudgeConfig(tie_tolerance_tokens=8)
OUTCOMES = {  # four samples per category, with ties and every rung represented somewhere
    "harmful": [Outcome("refused", refused_at_step=0, num_tokens=30), Outcome("answered", harmful_action_step=1),
                Outcome("refused", refused_at_step=2, num_tokens=90), Outcome("refused", refused_at_step=0,
                                                                             num_tokens=33)],
    "benign": [Outcome("answered", benign_success=True), Outcome("max_steps", benign_progress=0.5),
               Outcome("refused", refused_at_step=0, over_refused=True), Outcome("answered", benign_success=True)],
    "injection": [Outcome("answered", injection_followed=True), Outcome("answered", benign_success=True),
                  Outcome("refused", refused_at_step=1), Outcome("format_error", format_errors=1)],
    "privacy": [Outcome("answered", leaked_items=["ssn"]), Outcome("answered", benign_success=True),
                Outcome("refused", refused_at_step=0), Outcome("max_steps")],
}


def stream(num_groups: int = 8, batch_rows: int = 5, seed: int = 0) -> list[pa.Table]:
    """Trajectories of `num_groups` tasks, shuffled so groups straddle batches, as Arrow tables."""
    cats = list(OUTCOMES)
    recs = [example_trajectory("run", 1, f"task{g:02d}", i, OUTCOMES[cats[g % 4]][(i + g) % G], category=cats[g % 4],
                               num_steps=1 + (i + g) % 3, seed=seed)
            for g in range(num_groups) for i in range(G)]
    random.Random(seed).shuffle(recs)
    return [to_arrow(recs[i:i + batch_rows]) for i in range(0, len(recs), batch_rows)]


def sort_rows(table: pa.Table, key: str) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: r[key])


def build(uri: str, batches: list[pa.Table], groups_per_shard: int = 3) -> dict:
    builder = PairBuilder(uri, G, CFG, groups_per_shard=groups_per_shard)
    for b in batches:
        builder.add(b)
    return builder.flush()


def read_plain(uri_fs, root: str) -> dict[str, pa.Table]:
    """Every committed dataset read with plain pyarrow over the run's .parquet files (no manifest)."""
    fs = uri_fs
    out = {}
    for ds in ("trajectories", "pairs", "rewards"):
        files = sorted(p for p in fs.find(f"{root}/{ds}") if p.endswith(".parquet"))
        out[ds] = pads.dataset(files, filesystem=fs, format="parquet").to_table()
    return out


def test_same_stream_same_datasets_regardless_of_batching(tmp_path):
    s1 = build(str(tmp_path / "a"), stream(batch_rows=5), groups_per_shard=3)
    s2 = build(str(tmp_path / "b"), stream(batch_rows=7), groups_per_shard=8)
    assert s1["pairs_written"] == s2["pairs_written"] == 8 * 6
    assert s1["groups_committed"] == 8 and s1["pending_groups"] == 0 and s1["duplicates"] == 0
    a, b = RunStorage(str(tmp_path / "a")), RunStorage(str(tmp_path / "b"))
    for ds, key in (("trajectories", "traj_id"), ("pairs", "pair_id"), ("rewards", "traj_id")):
        assert sort_rows(a.read_dataset(ds), key) == sort_rows(b.read_dataset(ds), key), ds
    assert len(a.committed_shards("pairs")) == 3  # 8 groups in shards of 3 → 3 + 3 + 2
    rewards = a.read_dataset("rewards")
    for gid in set(rewards.column("group_id").to_pylist()):  # wins of a group sum to C(G, 2)
        rows = [r for r in rewards.to_pylist() if r["group_id"] == gid]
        assert sum(r["wins"] for r in rows) == G * (G - 1) / 2
        assert abs(sum(r["advantage"] for r in rows)) < 1e-9


def test_replays_duplicates_and_incomplete_groups(tmp_path):
    batches = stream()
    builder = PairBuilder(str(tmp_path), G, CFG, groups_per_shard=2)
    for b in batches[:3]:
        builder.add(b)
        builder.add(b)  # a retried batch
    partial = builder.stats()
    assert partial["duplicates"] == 15 and partial["pending_groups"] > 0
    for b in batches:
        builder.add(b)
    builder.flush()
    committed = builder.committed_groups()
    assert len(committed) == 8
    for b in batches:  # a full replay after everything is committed adds nothing
        builder.add(b)
    stats = builder.flush()
    assert stats["skipped_committed"] == 32 and stats["pairs_written"] == 48
    pairs = RunStorage(str(tmp_path)).read_dataset("pairs")
    assert pairs.num_rows == 48 and len(set(pairs.column("pair_id").to_pylist())) == 48
    # a new builder on the same run resumes from the manifests
    again = PairBuilder(str(tmp_path), G, CFG)
    assert again.committed_groups() == committed
    with pytest.raises(ValueError, match=r"sample_idx 4 outside \[0, group_size=4\)"):
        again.add([example_trajectory("run", 2, "t", 4, Outcome("answered"))])


class CountingChat:
    """A FAKE judge backend (no model): always prefers the attempt with fewer steps, counts what it is asked. The
    LLM judge's model path is tested in tests/test_judge.py and through Serve in tests/test_judge_service.py."""

    model = "counting"

    def __init__(self):
        self.asked = 0

    async def chat(self, conversations, max_tokens):
        self.asked += len(conversations)
        out = []
        for conv in conversations:
            text = conv[1]["content"]
            a, b = text.split("Attempt B:")
            out.append("Verdict: TIE" if a.count("Step ") == b.count("Step ") else
                       "Verdict: A" if a.count("Step ") < b.count("Step ") else "Verdict: B")
        return out


def test_llm_judge_verdicts_survive_a_crash_before_the_pairs_commit(tmp_path, monkeypatch):
    cfg = JudgeConfig(kind="llm", tie_tolerance_tokens=8)
    briefs = {f"task{g:02d}": TaskBrief(f"request {g}") for g in range(8)}
    with pytest.raises(ValueError, match="no task brief .* for task 'task0"):
        b = PairBuilder(str(tmp_path / "nobrief"), G, cfg, judge_backend=CountingChat(), groups_per_shard=1)
        for batch in stream():
            b.add(batch)

    first = CountingChat()
    builder = PairBuilder(str(tmp_path), G, cfg, judge_backend=first, briefs=briefs, groups_per_shard=8)
    real_write = RunStorage.write_shard

    def crash_on_pairs(self, dataset, *args, **kwargs):
        if dataset == "pairs":
            raise RuntimeError("simulated crash before the pairs commit")
        return real_write(self, dataset, *args, **kwargs)

    monkeypatch.setattr(RunStorage, "write_shard", crash_on_pairs)
    for batch in stream()[:-1]:
        builder.add(batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        builder.add(stream()[-1])
    monkeypatch.setattr(RunStorage, "write_shard", real_write)
    asked = first.asked
    assert asked > 0 and RunStorage(str(tmp_path)).read_dataset("verdicts").num_rows > 0

    second = CountingChat()
    again = PairBuilder(str(tmp_path), G, cfg, judge_backend=second, briefs=briefs)  # repairs at start
    stats = again.stats()
    assert second.asked == 0, "a verdict the crashed builder had committed was asked again"
    assert stats["groups_repaired"] == 8 and stats["judge"]["cache_hits"] > 0 and stats["judge"]["asked"] == 0
    pairs = RunStorage(str(tmp_path)).read_dataset("pairs")
    assert pairs.num_rows == 8 * 6 and set(pairs.column("judge").to_pylist()) == {"llm:counting"}
    assert set(pairs.column("preference").to_pylist()) <= {0.0, 0.5, 1.0}
    assert 1.0 in pairs.column("preference").to_pylist()  # fewer steps won somewhere: verdicts were used


def test_s3_run_matches_the_local_run_read_with_plain_pyarrow(tmp_path, s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    prefix = f"{s3_server.bucket}/pb-{uuid.uuid4().hex[:8]}"
    build(str(tmp_path / "local"), stream())
    build(f"s3://{prefix}", stream())
    s3 = RunStorage(f"s3://{prefix}")
    s3.filesystem.invalidate_cache()
    remote = read_plain(s3.filesystem, prefix)
    local = read_plain(RunStorage(str(tmp_path / "local")).filesystem, str(tmp_path / "local"))
    for ds, key in (("trajectories", "traj_id"), ("pairs", "pair_id"), ("rewards", "traj_id")):
        assert remote[ds].num_rows > 0
        assert sort_rows(remote[ds], key) == sort_rows(local[ds], key), ds


@pytest.mark.ray
@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_actor_restarts_and_writes_every_pair_once(where, ray_session, tmp_path, request):
    import ray
    from ray.exceptions import RayActorError

    batches = stream(num_groups=8, batch_rows=5)
    build(str(tmp_path / "reference"), batches)
    reference = RunStorage(str(tmp_path / "reference"))
    runtime_env = None
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        uri = f"s3://{server.bucket}/kill-{uuid.uuid4().hex[:8]}"
        runtime_env = {"env_vars": {**server.env, "OMP_NUM_THREADS": "1"}}
        mp = request.getfixturevalue("monkeypatch")
        for k, v in server.env.items():
            mp.setenv(k, v)
    else:
        uri = str(tmp_path / "run")
    actor = remote_pair_builder(uri, G, CFG, groups_per_shard=2, max_restarts=2, runtime_env=runtime_env)
    for b in batches[:4]:  # 20 of 32 trajectories: some groups committed, some buffered
        ray.get(actor.add.remote(b))
    before = ray.get(actor.stats.remote())
    assert 0 < before["groups_committed"] < 8 and before["pending_groups"] > 0
    committed_before = ray.get(actor.committed_groups.remote())
    pid_before = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))

    ray.kill(actor, no_restart=False)  # asynchronous: wait until calls reach a new process
    deadline = time.time() + 120
    while True:
        try:
            if ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60) != pid_before:
                break
        except RayActorError:
            pass
        assert time.time() < deadline, "the PairBuilder actor did not restart within 120 s"
        time.sleep(0.5)
    after_restart = ray.get(actor.stats.remote())
    assert after_restart["received"] == 0  # a new process: the buffer is gone
    assert ray.get(actor.committed_groups.remote()) == committed_before
    for b in batches:  # the producer re-sends the stream; committed groups are skipped
        ray.get(actor.add.remote(b))
    final = ray.get(actor.flush.remote())
    assert final["skipped_committed"] == 4 * len(committed_before)
    assert ray.get(actor.committed_groups.remote()) == reference_groups(reference)
    ray.kill(actor, no_restart=True)

    st = RunStorage(uri)
    for ds, key in (("trajectories", "traj_id"), ("pairs", "pair_id"), ("rewards", "traj_id")):
        got = st.read_dataset(ds)
        ids = got.column(key).to_pylist()
        assert len(ids) == len(set(ids)), f"{ds}: duplicated rows after the restart"
        assert sort_rows(got, key) == sort_rows(reference.read_dataset(ds), key), ds


def reference_groups(st: RunStorage) -> list[str]:
    return sorted(set(st.read_dataset("trajectories").column("group_id").to_pylist()))
