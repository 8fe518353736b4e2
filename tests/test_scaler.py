"""The rollout fleet's scaling policy (`mosaic_ray.actors.scaler.Scaler`) on hand-made snapshots: scale up for a
backlog the cluster fits, drain the longest-idle workers, start what the free resources allow, the wanted count
for Ray's autoscaler, and reconfiguration limits. No Ray cluster: the policy is plain Python."""

from __future__ import annotations

import pytest
from mosaic_ray.actors.scaler import Decision, FleetState, Scaler, WorkerLoad

from mosaic_ray.config import RolloutConfig


def w(i, healthy=True, in_flight=0, idle_since=0.0):
    return WorkerLoad(f"rollout-{i}", healthy, in_flight, idle_since)


def state(live, queued=0, in_flight=0, target=None, now=100.0, free=None, bundle=None):
    return FleetState(tuple(live), queued=queued, in_flight=in_flight,
                      target=len(live) if target is None else target, now=now, bundle=bundle or {"CPU": 1.0},
                      free=free)


def scaler(**kw):
    return Scaler(RolloutConfig(**{"min_workers": 1, "max_workers": 4, "scale_up_queue_per_worker": 2,
                                   "idle_scale_down_s": 10.0, **kw}), cap=8)


def test_scale_up_for_a_fitting_backlog_and_drain_the_longest_idle():
    s = scaler()
    assert s.autoscale(state([], queued=3, target=0)) == Decision(1)
    assert s.autoscale(state([w(0)], queued=3, free={"CPU": 1.0})) == Decision(2)
    assert s.autoscale(state([w(0)], queued=3, free={"CPU": 0.5})) == Decision(1)
    assert s.autoscale(state([w(0), w(1, healthy=False)], queued=30, free={"CPU": 9})) == Decision(2)
    assert s.autoscale(state([w(0, idle_since=50), w(1, idle_since=20), w(2, idle_since=95)])) == \
        Decision(2, drain=("rollout-1",))
    assert s.autoscale(state([w(0, idle_since=95)])) == Decision(1)


def test_start_what_fits_drain_the_busiest_last_and_the_wanted_count():
    s = scaler()
    assert s.reconcile(state([], target=3, free={"CPU": 2.0})) == Decision(2, start=2)
    assert s.reconcile(state([], target=3, free={"CPU": 0.0})) == Decision(1, start=1)
    assert s.reconcile(state([], target=3)) == Decision(3, start=3)
    assert s.reconcile(state([w(0, in_flight=3), w(1, in_flight=1), w(2, healthy=False)], target=1)) == \
        Decision(1, drain=("rollout-2", "rollout-1"))
    assert scaler(request_autoscaler=True).reconcile(state([w(0)], target=3, free={})) == Decision(3, start=2)
    assert s.wanted(state([w(0)], queued=20, in_flight=8)) == 4
    assert s.wanted(state([], queued=0)) == 1
    with pytest.raises(ValueError, match="rollout.group_size cannot change"):
        s.reconfigure(group_size=3)
    with pytest.raises(ValueError, match="min_workers=5, max_workers=4"):
        s.reconfigure(min_workers=5)
    assert s.reconfigure(max_workers=8).max_workers == 8 == s.rc.max_workers
