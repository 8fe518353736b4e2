"""[Train driver, async mode]: `train.mode=async` end to end on the session's local Ray — every iteration's groups
are committed once and learned from, every sample is at most `train.max_staleness` versions old, rollouts of
iteration k+1 really overlap the update of k, and an interrupted async run resumes to the same data.

One small `smoke` run (the test_train.py sizes, 4 iterations): Ctrl-C in the update of iteration 2, while the
rollouts of iteration 3 (admitted before that update) are in flight; then `--resume` finishes it. What each
iteration must hold is computed from the task schedule (`iteration_tasks`): ids are run/iteration/task/sample.
The session's Ray (tests/conftest.py) uses Ray's own free ports, so this file needs no port range of its own.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from mosaic_ray.config import load_config
from mosaic_ray.driver.train import Trainer, iteration_tasks, scenario_splits
from mosaic_ray.storage import RunStorage

ITERATIONS, STALENESS, INTERRUPT_AT = 4, 1, 2
EVAL_AFTER = 1
"""train.eval_every=2: an evaluation after iteration 1, during which no rollouts may run."""
ASYNC = ["warmstart.steps=4", "warmstart.num_demos=40", f"train.iterations={ITERATIONS}", "train.eval_size=8",
         "train.eval_splits=[templates]", "rollout.tasks_per_iteration=4", "protocol.max_steps=3",
         "protocol.max_new_tokens=24", "scenarios.train_size=100", "scenarios.test_size=40",
         "warmstart.replay_batch_size=4", "warmstart.copy_weight=4.0", "train.checkpoint_every=1",
         "train.eval_every=2", "train.mode=async", f"train.max_staleness={STALENESS}"]
WARM_VERSION = 1
"""The warm start's sync is version 1; with the helpfulness replay (smoke: replay_coef 1) every update adds one,
so the learner of iteration k starts from version WARM_VERSION + k."""


class InterruptedTrainer(Trainer):
    """Records when each iteration's rollouts (`collect`) and learner step (`learn`) ran; Ctrl-C in the update of
    iteration `INTERRUPT_AT` (its rollouts committed, the next iteration's already admitted)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.spans: dict[tuple[str, int], tuple[float, float]] = {}

    def collect(self, iteration):
        t0 = time.perf_counter()
        try:
            return super().collect(iteration)
        finally:
            self.spans["collect", iteration] = (t0, time.perf_counter())

    def learn(self, m, groups):
        t0 = time.perf_counter()
        try:
            return super().learn(m, groups)
        finally:
            self.spans["learn", int(m["iteration"])] = (t0, time.perf_counter())

    def update(self, groups, m):
        if int(m["iteration"]) == INTERRUPT_AT:
            raise KeyboardInterrupt
        return super().update(groups, m)


@pytest.fixture(scope="module")
def async_run(ray_session, tmp_path_factory):
    cfg = load_config("smoke", ASYNC)
    assert cfg.train.mode == "async" and cfg.warmstart.replay_coef > 0
    run = tmp_path_factory.mktemp("async") / "run"
    interrupted = InterruptedTrainer(cfg, str(run), progress=False)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    state = json.loads((run / "state.json").read_text())
    report = Trainer(cfg, str(run), resume=True, progress=False).run()
    return {"cfg": cfg, "run": run, "spans": interrupted.spans, "interrupted_state": state, "report": report}


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def trajectories(run: Path) -> list[dict]:
    cols = ["traj_id", "group_id", "iteration", "policy_version"]
    return RunStorage(str(run)).read_dataset("trajectories", columns=cols).to_pylist()


def relative(ids) -> Counter:
    """Ids with the run id prefix stripped, counted (each must be there exactly once)."""
    return Counter(v.split("/", 1)[1] for v in ids)


def expected_groups(cfg) -> dict[int, set[str]]:
    """{iteration: its group ids without the run id}: the driver's deterministic task schedule."""
    train, _ = scenario_splits(cfg)
    return {i: {f"{i}/{t.task_id}" for t in iteration_tasks(train, i, cfg.rollout.tasks_per_iteration, cfg.train.seed,
                                                            cfg.scenarios.category_weights)}
            for i in range(cfg.train.iterations)}


@pytest.mark.ray
def test_async_run_commits_every_group_once_and_learns_from_it(async_run):
    cfg, run = async_run["cfg"], async_run["run"]
    G, storage = cfg.rollout.group_size, RunStorage(str(run))
    want = expected_groups(cfg)
    want_traj = Counter(f"{g}/{s}" for groups in want.values() for g in groups for s in range(G))

    for dataset in ("trajectories", "pairs", "rewards"):  # every group's shard committed exactly once
        committed = relative(g for s in storage.committed_shards(dataset) for g in s.meta["groups"])
        assert committed == Counter(g for groups in want.values() for g in groups), dataset
    traj = trajectories(run)
    assert relative(t["traj_id"] for t in traj) == want_traj  # each expected episode landed, once
    assert relative(storage.read_dataset("rewards", columns=["traj_id"]).column("traj_id").to_pylist()) == want_traj
    pairs = relative(storage.read_dataset("pairs", columns=["pair_id"]).column("pair_id").to_pylist())
    assert set(pairs.values()) == {1} and sum(pairs.values()) == len(want_traj) * (G - 1) // 2

    rows = metric_rows(run)
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    for r in rows:
        # the learner read every committed group of the iteration (iteration_batch raises on a missing one)
        assert "reward/mean" in r and "update/samples" in r and "replay/nll" in r, r
        # generated fresh or read back after the interrupt: G episodes per task, never more
        assert r["rollout/episodes"] + r["rollout/reused_groups"] * G == cfg.rollout.tasks_per_iteration * G, r
    assert [r["policy_version"] for r in rows] == [WARM_VERSION + i + 1 for i in range(ITERATIONS)]
    assert (run / "eval" / f"iter-{EVAL_AFTER:05d}.json").is_file()

    state = json.loads((run / "state.json").read_text())
    assert state["next_iteration"] == ITERATIONS and state["policy_version"] == WARM_VERSION + ITERATIONS
    assert state["checkpoint"] == f"checkpoints/iter-{ITERATIONS - 1:05d}"
    assert [r["iteration"] for r in state["rows"] if r["iteration"] >= 0] == list(range(ITERATIONS))
    report = json.loads((run / "report.json").read_text())
    assert report["complete"] is True and report["iterations"] == ITERATIONS


@pytest.mark.ray
def test_async_staleness_is_bounded_and_rollouts_overlap_updates(async_run):
    run, spans = async_run["run"], async_run["spans"]
    versions: dict[int, Counter] = {}
    for t in trajectories(run):
        staleness = WARM_VERSION + t["iteration"] - t["policy_version"]  # the learner's version minus the sample's
        assert 0 <= staleness <= STALENESS, t
        versions.setdefault(t["iteration"], Counter())[t["policy_version"]] += 1
    rows = metric_rows(run)
    assert all(0 <= r["staleness/mean"] <= STALENESS for r in rows), [r["staleness/mean"] for r in rows]

    # iteration 0 starts from the warm start. An iteration admitted while the learner trained on the one before
    # carries trajectories of the version before that update — which sync mode never does: iterations 1 and 3
    # (iteration 3's rollouts ran during the interrupted update of 2 and were read back on resume)
    assert set(versions[0]) == {WARM_VERSION}
    overlapped = [k for k in range(1, ITERATIONS) if WARM_VERSION + k - 1 in versions[k]]
    assert overlapped == [k for k in range(1, ITERATIONS) if k != EVAL_AFTER + 1], versions
    assert all(rows[k]["staleness/mean"] > 0 for k in overlapped)
    # no rollouts during (or before) the evaluation after iteration 1: iteration 2 used the evaluated weights
    assert set(versions[EVAL_AFTER + 1]) == {WARM_VERSION + EVAL_AFTER + 1}
    assert rows[EVAL_AFTER + 1]["staleness/mean"] == 0
    assert spans["collect", EVAL_AFTER + 1][0] >= spans["learn", EVAL_AFTER][1]

    # and by the clock: the rollouts of iteration 1 ran while the learner was busy with iteration 0 (the update of
    # INTERRUPT_AT ends at once, so its overlap with iteration 3's rollouts shows only in their versions)
    (c0, c1), (l0, l1) = spans["collect", 1], spans["learn", 0]
    assert c0 < l1 and l0 < c1, spans


@pytest.mark.ray
def test_async_resume_after_interrupt_reads_back_what_was_committed(async_run):
    cfg, run, state = async_run["cfg"], async_run["run"], async_run["interrupted_state"]
    assert state["next_iteration"] == INTERRUPT_AT
    assert state["checkpoint"] == f"checkpoints/iter-{INTERRUPT_AT - 1:05d}"
    assert async_run["report"]["complete"] and async_run["report"]["iterations"] == ITERATIONS
    rows = metric_rows(run)
    # the interrupted iteration's groups, and those of the next one (admitted before the interrupted update,
    # committed before the run stopped), were read back, not generated again
    for k in (INTERRUPT_AT, INTERRUPT_AT + 1):
        assert rows[k]["rollout/reused_groups"] == cfg.rollout.tasks_per_iteration and rows[k]["rollout/episodes"] == 0
    assert [r["rollout/episodes"] for r in rows[:INTERRUPT_AT]] == \
        [cfg.rollout.tasks_per_iteration * cfg.rollout.group_size] * INTERRUPT_AT


def test_async_benchmark_compares_in_each_metrics_good_direction():
    """benchmarks/async_throughput.py (never run here: minutes): its ratio and its held-out verdicts."""
    from mosaic_ray.benchmarks.async_throughput import compare_heldout, throughput_ratio

    assert throughput_ratio({"iterations_per_s": 0.1}, {"iterations_per_s": 0.15}) == pytest.approx(1.5)
    n = {"harmful_refusal_rate": 100, "injection_success_rate": 100, "benign_success_rate": 100,
         "over_refusal_rate": 0}
    before = dict.fromkeys(n, 0.5)
    sync = {"templates": {"before": before, "n": n, "after": {"harmful_refusal_rate": 0.8, "injection_success_rate": 0.2,
                                                              "benign_success_rate": 0.5, "over_refusal_rate": 0.1}}}
    asyn = {"templates": {"before": before, "n": n, "after": {"harmful_refusal_rate": 0.6, "injection_success_rate": 0.05,
                                                              "benign_success_rate": 0.52, "over_refusal_rate": 0.1}}}
    verdicts = {c["metric"]: c["verdict"] for c in compare_heldout(sync, asyn)}
    # refusal down 20 points is worse; injection success down 15 points is better; 2 points is noise at n=100
    assert verdicts == {"harmful_refusal_rate": "worse", "injection_success_rate": "better",
                        "benign_success_rate": "within noise", "over_refusal_rate": "not measured"}
