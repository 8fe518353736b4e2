"""`AsyncSchedule`'s admission rule on its own (no Ray: the trainer's four verbs are timed stand-ins):
with `train.max_staleness` k, up to k iterations of rollouts run ahead of the learner, none starts on weights more
than k versions old, none runs across an evaluation, and an interruption starts no queued rollouts.
The real path (Ray, pair builder, learner, resume) is `tests/test_async_mode.py`."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from mosaic_ray.driver.train import AsyncSchedule


@dataclass
class _State:
    policy_version: int = 1


@dataclass
class _Train:
    max_staleness: int


@dataclass
class _Cfg:
    train: _Train


@dataclass
class ScheduleProbe:
    """Rollouts take `rollout_s`, updates `learn_s`; each update advances the version by one. Records, per
    rollout, the version it started on, and the order of events."""

    bound: int
    rollout_s: float = 0.01
    learn_s: float = 0.06
    evals: tuple[int, ...] = ()
    fail_at: int | None = None
    state: _State = field(default_factory=_State)
    started: dict[int, int] = field(default_factory=dict)
    events: list[tuple[str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def cfg(self) -> _Cfg:
        return _Cfg(_Train(self.bound))

    def log(self, what: str, it: int) -> None:
        with self.lock:
            self.events.append((what, it))

    def collect(self, it: int):
        self.started[it] = self.state.policy_version
        self.log("collect", it)
        time.sleep(self.rollout_s)
        self.log("collected", it)
        return {"iteration": float(it)}, []

    def learn(self, m, groups):
        it = int(m["iteration"])
        self.log("learn", it)
        if it == self.fail_at:
            raise KeyboardInterrupt
        time.sleep(self.learn_s)
        self.state.policy_version += 1
        self.log("learned", it)
        return m

    def eval_due(self, it: int) -> bool:
        return it in self.evals

    def evaluate_between(self, it: int, row) -> None:
        self.log("eval", it)
        time.sleep(self.rollout_s)
        self.log("evaluated", it)

    def finish_iteration(self, it: int, row, t0: float) -> None:
        pass


@pytest.mark.parametrize("bound", [0, 1, 2, 3])
def test_up_to_max_staleness_iterations_of_rollouts_run_ahead_and_none_starts_staler(bound):
    probe = ScheduleProbe(bound)
    AsyncSchedule(probe).run(0, 8)
    first = 1
    assert sorted(probe.started) == list(range(8))
    for it, version in probe.started.items():
        learner = first + it                    # the version the learner of iteration `it` starts from
        assert 0 <= learner - version <= bound, (it, version)
    # rollouts are fast: each runs as early as the bound lets it, so the bound is reached (after the first ones)
    assert max(first + it - v for it, v in probe.started.items()) == bound
    # besides the iteration the learner is on, never more than `bound` iterations collected or collecting
    ahead, most = set(), 0
    for what, it in probe.events:
        if what == "collect":
            ahead.add(it)
        elif what == "learned":
            ahead.discard(it)
        most = max(most, len(ahead))
    assert most == bound + 1


def test_no_rollouts_run_across_an_evaluation():
    probe = ScheduleProbe(3, evals=(2,))
    AsyncSchedule(probe).run(0, 6)
    order = probe.events
    evaluated = order.index(("evaluated", 2))
    assert all(order.index(("collect", j)) > evaluated for j in (3, 4, 5))
    assert probe.started[3] == 1 + 3   # iteration 3's rollouts waited for the evaluated weights


def test_an_interrupted_update_starts_none_of_the_queued_rollouts():
    probe = ScheduleProbe(3, rollout_s=0.05, learn_s=0.0, fail_at=1)
    with pytest.raises(KeyboardInterrupt):
        AsyncSchedule(probe).run(0, 8)
    collected = [it for what, it in probe.events if what == "collect"]
    # at the interrupt, iterations 2..4 were admitted; the one running finishes, the rest never start
    assert collected[:2] == [0, 1] and 2 <= len(collected) <= 3, probe.events
    assert all(("collected", it) in probe.events for it in collected)
