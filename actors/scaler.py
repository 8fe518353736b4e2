"""`Scaler`: the rollout fleet's scaling policy — how many workers it should have, which to retire, and what
to ask Ray's autoscaler for.

The fleet (`actors/fleet.py`) owns the workers; every control step (a daemon thread every
`control_interval_s`, plus `scale_to`) it takes a `FleetState` snapshot under its lock, asks the scaler for a
`Decision` and applies it under the same lock. The scaler never touches an actor and keeps no worker state, so
its decisions are plain functions of the snapshot and `rollout.*` (no Ray cluster needed to test them). Policy
(`rollout.autoscale`, `Scaler.autoscale`):

- up by one when the queue is longer than `scale_up_queue_per_worker` × healthy workers, no worker is still
  starting and the cluster's free resources fit one more worker — so a node that joins mid-run gets workers
  without a restart (Ray places the new actor where the free resources are);
- down by one when the queue is empty and a worker has been idle for `idle_scale_down_s` (never below
  `min_workers`): the longest idle one drains.

Sizing (`Scaler.reconcile`, with or without autoscale): workers missing from the target start while the
cluster fits them (or the fleet is below `min_workers`, or `request_autoscaler` lets the cluster grow for
them); what cannot start is capacity that went away with its node, so the target shrinks instead of queueing
actors that cannot start. A dead worker is replaced this way. Surplus workers drain: starting ones first,
then the least loaded, then the longest idle.

With `request_autoscaler`, the wanted worker count (queued and in-flight episodes over the per-worker cap,
between `min_workers` and `max_workers`) is sent to `ray.autoscaler.sdk.request_resources`, so a real cluster
adds nodes for the backlog (the rollout node-type resource comes from the worker's actor options).

The scaler also publishes the fleet's Prometheus gauges (queue depth, healthy workers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mosaic_ray.config import RolloutConfig

__all__ = ["RECONFIGURABLE", "Decision", "FleetState", "Scaler", "WorkerLoad"]

RECONFIGURABLE = frozenset({"min_workers", "max_workers", "autoscale", "scale_up_queue_per_worker",
                            "idle_scale_down_s", "request_autoscaler"})
"""The `rollout.*` fields `Scaler.reconfigure` (and `RolloutFleet.reconfigure`) may change on a live fleet."""


@dataclass(frozen=True)
class WorkerLoad:
    """One live worker as the scaler sees it."""

    worker_id: str
    healthy: bool
    """Ready and taking episodes (False: its actor is still starting)."""
    in_flight: int
    idle_since: float
    """`time.monotonic()` when it last had no episode in flight."""


@dataclass(frozen=True)
class FleetState:
    """A snapshot of the fleet, taken under its lock, that the scaler decides from."""

    live: tuple[WorkerLoad, ...]
    """Starting and healthy workers, in start order (draining ones are on their way out and not counted)."""
    queued: int
    """Episodes waiting for a worker."""
    in_flight: int
    """Episodes sent to workers and not yet back."""
    target: int
    """The worker count the fleet is heading for."""
    now: float
    """`time.monotonic()` when the snapshot was taken."""
    bundle: Mapping[str, float] = field(default_factory=dict)
    """One worker's resources (`resources.as_bundle` of its actor options)."""
    free: Mapping[str, float] | None = None
    """The cluster's free resources (`ray.available_resources()`); None: assume any number of workers fits
    (`scale_to` and the fleet's first workers)."""

    def fits(self, k: int) -> bool:
        """Whether the free resources fit `k` more workers."""
        if self.free is None:
            return True
        return all(self.free.get(name, 0.0) + 1e-9 >= k * amount for name, amount in self.bundle.items())


@dataclass(frozen=True)
class Decision:
    """What the fleet applies: the new target, how many workers to start, and which workers to drain."""

    target: int
    start: int = 0
    drain: tuple[str, ...] = ()


class Scaler:
    """The fleet's scaling policy over `rc` (the live rollout config: `reconfigure` replaces it) and the
    autoscaler request. The fleet calls it under its lock, except `request` and `release` (SDK calls).

        decision = scaler.autoscale(state)   # rollout.autoscale: grow for a backlog, drain an idle worker
        decision = scaler.reconcile(state)   # start / drain towards state.target as resources allow
        scaler.request(state)                # request_autoscaler: ask Ray's autoscaler for the wanted workers
    """

    def __init__(self, rc: RolloutConfig, *, cap: int) -> None:
        self.rc = rc
        self.cap = cap
        """Episodes the fleet keeps in flight on one worker."""
        self.requested: int | None = None
        """Workers last asked of the autoscaler (None: never asked)."""
        self._gauges = _make_gauges()

    def autoscale(self, state: FleetState) -> Decision:
        """The target after one autoscale step (see the module docstring): at least one worker for a backlog
        on an empty fleet, one more for a long backlog the cluster fits, one fewer (the longest idle drains)
        when the queue is empty, else unchanged."""
        rc = self.rc
        healthy = [w for w in state.live if w.healthy]
        starting = len(state.live) - len(healthy)
        if state.queued and not state.live:
            return Decision(max(state.target, 1))
        if (state.queued > rc.scale_up_queue_per_worker * max(len(healthy), 1)
                and len(state.live) < rc.max_workers and not starting and state.fits(1)):
            return Decision(len(state.live) + 1)
        if not state.queued and len(state.live) > rc.min_workers:
            idle = [w for w in healthy if not w.in_flight and state.now - w.idle_since >= rc.idle_scale_down_s]
            if idle:
                return Decision(len(state.live) - 1, drain=(min(idle, key=lambda w: w.idle_since).worker_id,))
        return Decision(state.target)

    def reconcile(self, state: FleetState) -> Decision:
        """Workers to start or drain so the live count meets `state.target`: missing ones start while the
        cluster fits them (always up to `min_workers`; any number with `request_autoscaler`) and the target
        shrinks to what could start; surplus ones drain, starting ones first, then the least loaded, then the
        longest idle."""
        live = len(state.live)
        missing = state.target - live
        if missing > 0:
            k = max(self.rc.min_workers - live, 0)  # below the floor: start regardless of resources
            while k < missing and (self.rc.request_autoscaler or state.fits(k + 1)):
                k += 1
            return Decision(live + k, start=k)
        if missing < 0:
            order = sorted(state.live, key=lambda w: (w.healthy, w.in_flight, w.idle_since))
            return Decision(state.target, drain=tuple(w.worker_id for w in order[:-missing]))
        return Decision(state.target)

    def wanted(self, state: FleetState) -> int:
        """Workers the queued and in-flight episodes call for, between `min_workers` and `max_workers`."""
        return min(self.rc.max_workers, max(self.rc.min_workers,
                                            math.ceil((state.queued + state.in_flight) / max(self.cap, 1))))

    def request(self, state: FleetState) -> None:
        """With `request_autoscaler`, ask Ray's autoscaler for `wanted(state)` workers' bundles when that
        number changed since the last request."""
        wanted = self.wanted(state)
        if self.rc.request_autoscaler and wanted != self.requested:
            self._request_resources(wanted, state.bundle)

    def release(self) -> None:
        """Withdraw the autoscaler request, if one is standing (the fleet is shutting down)."""
        if self.requested:
            self._request_resources(0, {})

    def _request_resources(self, n: int, bundle: Mapping[str, float]) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[dict(bundle)] * n)
        self.requested = n

    def reconfigure(self, **changes: Any) -> RolloutConfig:
        """Replace `rc` with `changes` applied (only the `RECONFIGURABLE` fields); returns the new config.
        Raises ValueError naming the first field that cannot change, or the min/max workers that do not fit."""
        unknown = sorted(set(changes) - RECONFIGURABLE)
        if unknown:
            raise ValueError(f"reconfigure: rollout.{unknown[0]} cannot change on a live fleet "
                             f"(allowed: {', '.join(sorted(RECONFIGURABLE))})")
        rc = dataclasses.replace(self.rc, **changes)
        if not 0 <= rc.min_workers <= rc.max_workers or rc.max_workers < 1:
            raise ValueError(f"reconfigure: need 0 <= rollout.min_workers <= rollout.max_workers and "
                             f"max_workers >= 1, got min_workers={rc.min_workers}, max_workers={rc.max_workers}")
        self.rc = rc
        return rc

    def publish(self, *, queued: int, healthy: int) -> None:
        """Set the Prometheus gauges: episodes queued, healthy workers."""
        self._gauges["queue"].set(queued)
        self._gauges["workers"].set(healthy)


def _make_gauges() -> dict[str, Any]:
    from ray.util.metrics import Gauge

    return {"queue": Gauge("mosaic_rollout_queue_depth", "Episodes queued in the rollout fleet."),
            "workers": Gauge("mosaic_rollout_active_workers", "Healthy rollout workers.")}
