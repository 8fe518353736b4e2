"""`RolloutFleet`: N rollout workers behind one driver-side object — streaming, fault tolerant, elastic.

Modelled on RLlib's `FaultTolerantActorManager`: every remote call comes back as a `CallResult(worker_id,
ok, value | error)`, never as an exception; a Ray error (the actor or its node died) marks the worker dead,
while an application error is the caller's to handle.

Data plane (the caller's thread, inside `deliver` / `stream` / `evaluate`):
    queue of `EpisodeSpec`s ─dispatch─► worker.stream_episodes(specs, sink) ─► the pair builder (`sink`)
                                                            └─ray.wait─► `EpisodeReceipt`s to the caller
Training (`deliver`) sends every record from its worker straight to the pair builder; the caller sees receipts
only. `stream` / `evaluate` return the records themselves (benchmarks, evaluation).

Calls carry several episodes: one Ray call per episode cost a lone worker about a third of its scripted-episode
rate on 2 cores (1.4–1.8 s of worker CPU for 400 episodes that take 0.9–1.1 s in process; 1.1–1.3 s in calls of
eight). Each call is a Ray streaming generator that yields its episodes as they end (those ending within
`YIELD_WINDOW_S` of each other share a yield), so the fleet counts a worker's episodes one by one and refills it as
soon as a whole call fits again: with `max_in_flight_per_worker` 0, calls of a quarter of `episodes_per_worker`
(fewer when the queue is short, so every worker gets a share) and up to two calls' worth beyond the concurrent
episodes waiting inside the worker, so a freed slot never waits for the driver. (When a call returned only with
its last episode, its finished episodes' slots stayed empty until its slowest one ended: the colocated engine's
decode batches ran 19 rows full instead of the in-process loop's 23. docs/throughput.md has the measurements.)

Exactly once: trajectory ids are deterministic (run/iteration/task/sample). When a worker dies, the episodes
it had in flight and not yielded go back to the front of the queue (same spec, same id, same per-turn seeds) and run on
another worker; a record whose id was already emitted is dropped. An episode whose worker dies more than
`max_episode_retries` times is emitted as a failed record (terminal `error`), so a poison task cannot stall
an iteration and its group stays complete.

Worker lifecycle (a daemon thread every `control_interval_s`, plus `scale_to`): admits started workers,
starts and retires them as the scaling policy (`Scaler`, `actors/scaler.py`) decides from a snapshot the fleet
takes under its lock. It never waits on an episode and the data plane never waits on it: starting an actor is
a non-blocking `.remote()`, a new worker joins dispatch when its `ready()` resolves, a retired worker first
drains its in-flight episodes, and a dead worker's slot is refilled (or given up) by the scaler's next step.

Colocated engines (`rollout.colocate_engine`): the workers are the run's engines (`ColocatedWorker`s), which the
caller starts, supervises (`EngineSupervisor`: weights, health, restarts) and stops, so the fleet neither starts,
resizes nor kills them. A colocated worker that dies restarts in place; its in-flight episodes are re-queued as
above, and it takes episodes again once its `ready()` resolves, after the supervisor reloaded its weights.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import ray

from mosaic_ray.config import MosaicConfig, RolloutConfig
from mosaic_ray.rollout import EpisodeReceipt, EpisodeSpec, episode_specs, failed_record
from mosaic_ray.scenarios.tasks import Task
from mosaic_ray.schema import TrajectoryRecord, to_arrow

from .engines.router import EngineNotServingError, EngineRouter
from .pair_builder import call_pair_builder
from .rollout_worker import SINK_ATTEMPTS, RolloutWorker
from .scaler import Decision, FleetState, Scaler, WorkerLoad

__all__ = ["CallResult", "FleetError", "RolloutFleet", "WorkerInfo"]

log = logging.getLogger(__name__)
STARVED_WARN_S = 60.0
"""Warn (once per stream) when no worker has been healthy for this long while episodes wait."""

START_FAILURES_FATAL = 3
"""Workers that die before ever becoming ready, in a row, after which the fleet gives up (bad model dir, …)."""
POLL_S = 0.2
"""Longest the data plane waits for a result before re-dispatching (new workers, requeued episodes)."""
CONTROL_CALL_TIMEOUT_S = 60.0
RESTART_POLL_S = 1.0
"""How often the fleet asks a restarting colocated worker whether it is ready."""


class FleetError(RuntimeError):
    """The fleet cannot make progress (no worker could be started); the message says why."""


@dataclass(frozen=True)
class CallResult:
    """One remote call's outcome: `value` when `ok`, else `error` (a message naming the exception)."""

    worker_id: str
    ok: bool
    value: Any = None
    error: str | None = None

    def get(self) -> Any:
        if not self.ok:
            raise FleetError(f"worker {self.worker_id}: {self.error}")
        return self.value


WorkerState = Literal["starting", "healthy", "draining"]


@dataclass
class WorkerInfo:
    """Driver-side book-keeping of one worker actor."""

    worker_id: str
    handle: Any
    ready_ref: Any
    """The worker's `ready()` call; None while a restarting colocated worker waits to be asked (`ready_after`)."""
    state: WorkerState = "starting"
    node_id: str | None = None
    in_flight: dict[Any, dict[str, EpisodeSpec]] = field(default_factory=dict)
    """The `ObjectRefGenerator` of a `stream_episodes` call → its episodes not yielded yet (by trajectory id)."""
    idle_since: float = field(default_factory=time.monotonic)
    ready_after: float = 0.0
    router_version: int = 0
    """Which `set_engines` call the worker's router reflects (a worker started before one gets it on ready)."""

    @property
    def episodes(self) -> int:
        """Episodes sent to this worker and not yielded back yet."""
        return sum(len(specs) for specs in self.in_flight.values())


def _is_application_error(exc: BaseException) -> bool:
    """An exception raised by the worker's code (the actor is alive), as opposed to the actor/node dying."""
    return isinstance(exc, ray.exceptions.RayTaskError) and not isinstance(exc, ray.exceptions.RayActorError)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]


def _take(gen: Any) -> tuple[list[Any], BaseException | None, bool]:
    """What a worker's stream (`stream_episodes`, ready per `ray.wait`) holds now, without blocking: (its items,
    flattened; the error it ended with; whether it ended)."""
    values: list[Any] = []
    while gen.next_ready():
        try:
            ref = next(gen)
        except StopIteration:   # `next_ready` can say so of the end of the stream
            return values, None, True
        try:
            values += ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a failure is a value (RLlib's CallResult)
            return values, exc, True
    return values, None, gen.is_finished()


def _send(sink: Any, records: list[TrajectoryRecord]) -> None:
    """`sink.add(records)`, tried again on the restarted pair builder (as `rollout_worker.deliver`)."""
    call_pair_builder(sink, "add", records, attempts=SINK_ATTEMPTS)


class RolloutFleet:
    """Rollout workers for one run. Exactly one policy source: `engine_handles` (engine actors), `router` (an
    `EngineRouter`), or `scripted` (a scripted policy name; `scripted_delay_s` simulates generation latency).

        fleet = RolloutFleet(cfg, model_dir=d, engine_handles=engines, run_id="run-1")
        for receipts in fleet.deliver(tasks, sink=pair_builder, group_size=4, iteration=k, policy_version=v):
            ...   # EpisodeReceipts, as episodes land in the pair builder
        for batch in fleet.stream(tasks, group_size=4, iteration=k):
            ...   # or the records themselves: pa.RecordBatch of TRAJECTORY_SCHEMA, as episodes finish
        fleet.shutdown()
    """

    def __init__(self, cfg: MosaicConfig, *, model_dir: str, engine_handles: Sequence[Any] | None = None,
                 router: EngineRouter | None = None, scripted: str | None = None, scripted_delay_s: float = 0.0,
                 run_id: str = "run", num_workers: int | None = None):
        sources = [engine_handles is not None, router is not None, scripted is not None]
        if sum(sources) != 1:
            raise ValueError("RolloutFleet: pass exactly one of engine_handles=, router= or scripted=")
        if not ray.is_initialized():
            raise FleetError("RolloutFleet: Ray is not initialised (ray.init first; the fleet never starts Ray)")
        self.cfg = cfg
        self.model_dir = str(model_dir)
        self.run_id = run_id
        self._colocated = cfg.rollout.colocate_engine
        """The workers are the engines (`ColocatedWorker`s, passed as `engine_handles`), started by the caller."""
        if self._colocated and engine_handles is None:
            raise ValueError("RolloutFleet: rollout.colocate_engine: pass the colocated workers as engine_handles= "
                             "(`start_rollout_engines`)")
        self._router = (None if self._colocated else
                        self._make_router(engine_handles) if engine_handles is not None else router)
        self._scripted = scripted
        self._router_version = 0
        self._scripted_delay_s = scripted_delay_s
        rc = cfg.rollout
        chunk = max(1, rc.episodes_per_worker // 4)
        self._cap = rc.max_in_flight_per_worker or rc.episodes_per_worker + 2 * chunk
        self._chunk = min(chunk, self._cap)
        self._scaler = Scaler(rc, cap=rc.max_in_flight_per_worker or rc.episodes_per_worker)
        self._lock = threading.RLock()
        self._workers: dict[str, WorkerInfo] = {}
        self._owner: dict[Any, str] = {}
        self._queue: deque[EpisodeSpec] = deque()
        self._wanted: set[str] = set()
        self._emitted: set[str] = set()
        self._failed: list[TrajectoryRecord] = []
        self._next_id = 0
        self._start_failures = 0
        self._fatal: str | None = None
        self.counters = {"workers_started": 0, "worker_deaths": 0, "retries": 0, "duplicates_dropped": 0,
                         "stale_dropped": 0, "failed_episodes": 0, "episodes": 0}
        self._options = self._worker_options()
        if self._colocated:
            if num_workers is not None:
                raise ValueError("RolloutFleet: with colocated engines the workers are engine_handles; "
                                 "num_workers does not apply")
            for handle in engine_handles:
                self._admit_colocated(handle)
            self._target = len(self._workers)
        else:
            initial = num_workers if num_workers is not None else max(self.rc.min_workers, 1)
            self._target = max(0, min(initial, self.rc.max_workers))
        self._reconcile(free=None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._control_loop, name="rollout-fleet-control", daemon=True)
        self._thread.start()

    @property
    def rc(self) -> RolloutConfig:
        """The live rollout config: `cfg.rollout` with any `reconfigure` changes (the scaler holds it)."""
        return self._scaler.rc

    def __reduce__(self):
        raise TypeError("RolloutFleet lives in the driver (threads, actor book-keeping); pass engine handles or "
                        "an EngineRouter to remote code instead")

    # ------------------------------------------------------------------------------------ data plane

    def deliver(self, tasks: Iterable[Task], *, sink: Any, group_size: int, iteration: int, policy_version: int = 0,
                temperature: float | None = None) -> Iterator[list[EpisodeReceipt]]:
        """Run `group_size` episodes of every task; each worker hands its records to `sink` (the pair builder
        actor: `sink.add(records)`) itself, and receipts are yielded as episodes land there. Exactly once as in
        `stream`; an episode given up on is sent to `sink` as its failure record."""
        specs = episode_specs(tasks, group_size=group_size, run_id=self.run_id, iteration=iteration,
                              policy_version=policy_version, temperature=temperature)
        for results in self._run(specs, sink):
            failed = [r for r in results if isinstance(r, TrajectoryRecord)]
            if failed:
                _send(sink, failed)
            yield [EpisodeReceipt.of(r) if isinstance(r, TrajectoryRecord) else r for r in results]

    def stream(self, tasks: Iterable[Task], *, group_size: int, iteration: int, policy_version: int = 0,
               temperature: float | None = None) -> Iterator[pa.RecordBatch]:
        """Run `group_size` episodes of every task; yield Arrow record batches as episodes finish.

        Every trajectory id `run_id/iteration/task_id/sample_idx` is yielded exactly once, including when
        workers die mid-run. Breaking out of the loop abandons the rest (their late results are dropped)."""
        specs = episode_specs(tasks, group_size=group_size, run_id=self.run_id, iteration=iteration,
                              policy_version=policy_version, temperature=temperature)
        for records in self._run(specs):
            yield from to_arrow(records).to_batches()

    def evaluate(self, tasks: Iterable[Task], *, temperature: float | None = 0.0, policy_version: int = 0,
                 tag: str = "eval") -> Iterator[TrajectoryRecord]:
        """One episode per task (greedy by default) under run id `{run_id}/eval-{tag}`, iteration -1; yields
        records as they finish (no Arrow round trip)."""
        specs = episode_specs(tasks, group_size=1, run_id=f"{self.run_id}/eval-{tag}", iteration=-1,
                              policy_version=policy_version, temperature=temperature)
        for records in self._run(specs):
            yield from records

    def run_specs(self, specs: Sequence[EpisodeSpec]) -> Iterator[list[TrajectoryRecord]]:
        """Lowest-level verb: run exactly these specs, yielding lists of records as they finish."""
        return self._run(list(specs))

    def _run(self, specs: list[EpisodeSpec], sink: Any = None) -> Iterator[list[Any]]:
        """Records as episodes finish; with `sink`, the workers' receipts (and failure records the fleet made)."""
        ids = [s.traj_id for s in specs]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"RolloutFleet: trajectory id {dup!r} submitted twice (duplicate task ids?)")
        with self._lock:
            if self._wanted:
                raise FleetError("RolloutFleet: another stream is still running; finish or close it first")
            self._queue.extend(specs)
            self._wanted = set(ids)
            self._emitted = set()
        starved_since, warned = time.monotonic(), False
        try:
            while True:
                with self._lock:
                    if not self._wanted:
                        return
                    if any(w.state == "healthy" for w in self._workers.values()):
                        starved_since = time.monotonic()
                    elif not warned and time.monotonic() - starved_since > STARVED_WARN_S:
                        warned = True  # e.g. engines + learners took every CPU the cluster has
                        log.warning("RolloutFleet: no rollout worker could start for %.0f s; a worker needs %s, "
                                    "the cluster has %s free", STARVED_WARN_S, self._bundle(),
                                    ray.available_resources())
                    if self._fatal:
                        raise FleetError(self._fatal)
                    if not self._workers and self._colocated:
                        raise FleetError("RolloutFleet: every colocated worker (engine) is dead for good")
                    if not self._workers and self._target == 0 and not self.rc.autoscale:
                        raise FleetError("RolloutFleet: no workers and autoscale is off; call scale_to(n > 0) or "
                                         "set rollout.autoscale")
                self._dispatch(sink)
                records = self._collect(POLL_S)
                if records:
                    self._dispatch(sink)  # refill the freed slots before the caller takes its time over these
                    yield records
        finally:
            with self._lock:
                self._queue.clear()
                self._wanted = set()

    def _dispatch(self, sink: Any = None) -> None:
        """Send queued episodes to healthy workers, least loaded first, in calls of `_chunk` episodes (fewer when
        the queue is short, so every worker gets its share), while a whole call fits under the in-flight cap."""
        with self._lock:
            workers = sorted((w for w in self._workers.values() if w.state == "healthy"), key=lambda w: w.episodes)
            if not workers or not self._queue:
                return
            share = -(-len(self._queue) // len(workers))
            for w in workers:
                while self._queue and self._cap - w.episodes >= (n := min(self._chunk, share, len(self._queue))):
                    specs = [self._queue.popleft() for _ in range(n)]
                    gen = w.handle.stream_episodes.remote(specs, sink)
                    w.in_flight[gen] = {spec.traj_id: spec for spec in specs}
                    self._owner[gen] = w.worker_id

    def _collect(self, timeout: float) -> list[Any]:
        """Wait up to `timeout` for finished episodes (or workers becoming ready); return new records (receipts
        when delivering) and failure records."""
        with self._lock:
            refs = list(self._owner) + [w.ready_ref for w in self._workers.values()
                                        if w.state == "starting" and w.ready_ref is not None]
        if not refs:
            time.sleep(min(timeout, 0.05))  # nothing to wait on: the control thread is (re)starting workers
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not ready:
            return []
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        self._admit_ready()
        with self._lock:
            streams = [(gen, self._workers.get(self._owner[gen])) for gen in ready if gen in self._owner]
        records = []
        for gen, worker in streams:
            values, error, ended = _take(gen)
            with self._lock:
                pending = worker.in_flight.get(gen, {}) if worker is not None else {}
                for rec in values:
                    pending.pop(rec.traj_id, None)
                    if self._accept(rec):
                        records.append(rec)
                if not ended:
                    continue
                self._owner.pop(gen, None)
                if worker is None or worker.in_flight.pop(gen, None) is None:
                    continue   # the worker was marked dead meanwhile: its episodes are queued again already
                if not worker.in_flight:
                    worker.idle_since = time.monotonic()
                why = _describe(error) if error is not None else "the call ended without them"
                for spec in reversed(pending.values()):  # back at the front of the queue in their order
                    self._requeue(spec, why, worker.worker_id)
                # a colocated worker that restarted between calls refuses episodes until its weights are back
                if error is not None and (not _is_application_error(error) or
                                          (self._colocated and isinstance(error, EngineNotServingError))):
                    self._mark_dead(worker, why)
        with self._lock:
            records += self._take_failed()
        return records

    def _accept(self, rec: TrajectoryRecord | EpisodeReceipt) -> bool:
        if rec.traj_id in self._emitted:
            self.counters["duplicates_dropped"] += 1
            return False
        if rec.traj_id not in self._wanted:
            self.counters["stale_dropped"] += 1
            return False
        self._wanted.discard(rec.traj_id)
        self._emitted.add(rec.traj_id)
        self.counters["episodes"] += 1
        return True

    def _requeue(self, spec: EpisodeSpec, why: str, worker_id: str) -> None:
        """Put an episode back at the front of the queue, or emit it failed after too many attempts."""
        if spec.traj_id not in self._wanted:
            return
        if spec.attempt >= self.rc.max_episode_retries:
            self._failed.append(failed_record(spec, f"gave up after {spec.attempt + 1} attempts; last: {why}",
                                              worker_id))
            self.counters["failed_episodes"] += 1
            return
        self.counters["retries"] += 1
        self._queue.appendleft(dataclasses.replace(spec, attempt=spec.attempt + 1))

    def _take_failed(self) -> list[TrajectoryRecord]:
        out = [r for r in self._failed if self._accept(r)]
        self._failed.clear()
        return out

    # ------------------------------------------------------------------------------- worker lifecycle

    @property
    def num_workers(self) -> int:
        """Workers that are ready and take episodes (starting and draining ones excluded)."""
        with self._lock:
            return sum(1 for w in self._workers.values() if w.state == "healthy")

    def worker_nodes(self) -> list[str]:
        """Node id of each healthy worker (one entry per worker)."""
        with self._lock:
            return [w.node_id for w in self._workers.values() if w.state == "healthy" and w.node_id]

    def workers(self) -> dict[str, dict[str, Any]]:
        """worker_id → {state, node_id, in_flight} for every live worker."""
        with self._lock:
            return {w.worker_id: {"state": w.state, "node_id": w.node_id, "in_flight": w.episodes}
                    for w in self._workers.values()}

    def worker_handles(self) -> dict[str, Any]:
        """worker_id → actor handle (for fan-out calls and fault-injection tests)."""
        with self._lock:
            return {w.worker_id: w.handle for w in self._workers.values()}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            states = [w.state for w in self._workers.values()]
            return {**self.counters, "healthy": states.count("healthy"), "starting": states.count("starting"),
                    "draining": states.count("draining"), "target": self._target, "queue": len(self._queue),
                    "in_flight": sum(w.episodes for w in self._workers.values())}

    def scale_to(self, n: int) -> None:
        """Resize to `n` workers (capped at max_workers) without waiting: new actors start in the background
        and join when ready; surplus workers stop taking episodes and exit once drained. With autoscale on,
        the policy may move the size again later."""
        if n < 0:
            raise ValueError(f"scale_to: n must be >= 0, got {n}")
        self._not_colocated("scale_to")
        with self._lock:
            self._target = min(n, self.rc.max_workers)
        self._reconcile(free=None)

    def reconfigure(self, **changes: Any) -> None:
        """Change the scaling policy of a live fleet (`min_workers`, `max_workers`, `autoscale`,
        `scale_up_queue_per_worker`, `idle_scale_down_s`, `request_autoscaler`); takes effect at the next
        control step. E.g. `reconfigure(max_workers=64)` lets a grown cluster take more workers."""
        self._not_colocated("reconfigure")
        with self._lock:
            rc = self._scaler.reconfigure(**changes)
            self._target = max(rc.min_workers, min(self._target, rc.max_workers))

    def wait_for_workers(self, n: int | None = None, timeout_s: float = 300.0) -> int:
        """Block until `n` (default: the current target) workers are healthy; returns the healthy count.

        For callers that want a warm fleet before timing something; `stream` never needs it (episodes start
        on whichever workers are ready). Raises FleetError on timeout or when workers cannot start."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._admit_ready()
            with self._lock:
                want = self._target if n is None else n
                healthy = sum(1 for w in self._workers.values() if w.state == "healthy")
                if self._fatal:
                    raise FleetError(self._fatal)
            if healthy >= want:
                return healthy
            if time.monotonic() > deadline:
                raise FleetError(f"wait_for_workers: {healthy} of {want} workers healthy after {timeout_s:.0f}s "
                                 f"({self.stats()})")
            time.sleep(0.1)

    def set_engines(self, engine_handles: Sequence[Any]) -> list[CallResult]:
        """Route new episodes over `engine_handles` (engines added or removed); running episodes finish on theirs."""
        self._not_colocated("set_engines")
        if self._router is None:
            raise ValueError("set_engines: this fleet runs a scripted policy, not engines")
        with self._lock:
            self._router = self._make_router(engine_handles)
            self._router_version += 1
            for w in self._workers.values():
                if w.state == "healthy":  # they get the fan-out below; starting ones get it when ready
                    w.router_version = self._router_version
        return self.foreach_worker("set_router", self._router)

    def _not_colocated(self, verb: str) -> None:
        if self._colocated:
            raise ValueError(f"RolloutFleet.{verb}: with rollout.colocate_engine the workers are the run's engines, "
                             f"a fixed set (engine.num_engines)")

    def _make_router(self, engine_handles: Sequence[Any]) -> EngineRouter:
        """A router with the engine config's request deadline: a request to a dead or hung engine is retried on
        the others (twice per engine, at least three times)."""
        return EngineRouter(engine_handles, request_deadline_s=self.cfg.engine.request_deadline_s,
                            retries=max(3, 2 * len(engine_handles)))

    def foreach_worker(self, method: str, *args: Any, timeout_s: float = CONTROL_CALL_TIMEOUT_S) -> list[CallResult]:
        """Call `method(*args)` on every healthy worker; one CallResult each (a dead worker is marked dead)."""
        with self._lock:
            workers = [w for w in self._workers.values() if w.state == "healthy"]
        refs = [getattr(w.handle, method).remote(*args) for w in workers]
        out = []
        for w, ref in zip(workers, refs):
            try:
                out.append(CallResult(w.worker_id, True, ray.get(ref, timeout=timeout_s)))
            except Exception as exc:  # noqa: BLE001 - a failure is a value
                out.append(CallResult(w.worker_id, False, error=_describe(exc)))
                if not _is_application_error(exc) and not isinstance(exc, ray.exceptions.GetTimeoutError):
                    with self._lock:
                        self._mark_dead(w, _describe(exc))
        return out

    def shutdown(self) -> None:
        """Stop the control thread and every worker (by handle); clear any autoscaler request."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
            self._owner.clear()
            self._queue.clear()
        if not self._colocated:  # colocated workers are the caller's engines: it stops them
            for w in workers:
                ray.kill(w.handle, no_restart=True)
        self._scaler.release()

    def __enter__(self) -> RolloutFleet:  # noqa: PYI034 - the fleet is not subclassed
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ----------------------------------------------------------------------------- control internals

    def _control_loop(self) -> None:
        while not self._stop.wait(self.rc.control_interval_s):
            try:
                self._control_step()
            except Exception:  # the control plane must outlive a failed GCS call (logged with its traceback)
                log.exception("rollout fleet control step failed")

    def _control_step(self) -> None:
        """Admit ready workers, let the scaler resize the fleet (autoscale, then reconcile), publish its size."""
        self._admit_ready()
        if not self._colocated:  # colocated workers are the caller's fixed set of engines
            free = ray.available_resources()
            if self.rc.autoscale:
                with self._lock:
                    state = self._state(free)
                    self._apply(self._scaler.autoscale(state))
                self._scaler.request(state)
            self._reconcile(free)
        with self._lock:
            self._scaler.publish(queued=len(self._queue),
                                 healthy=sum(1 for w in self._workers.values() if w.state == "healthy"))

    def _state(self, free: Mapping[str, float] | None) -> FleetState:
        """The scaler's snapshot of the fleet, with the cluster's `free` resources (caller holds the lock)."""
        live = tuple(WorkerLoad(w.worker_id, w.state == "healthy", w.episodes, w.idle_since)
                     for w in self._workers.values() if w.state in ("starting", "healthy"))
        return FleetState(live, queued=len(self._queue), in_flight=sum(w.episodes for w in self._workers.values()),
                          target=self._target, now=time.monotonic(), bundle=self._bundle(), free=free)

    def _apply(self, decision: Decision) -> None:
        """Drain and start workers as the scaler decided, and take its target (caller holds the lock)."""
        for wid in decision.drain:
            self._workers[wid].state = "draining"
        for _ in range(decision.start):
            self._start_worker()
        self._target = decision.target

    def _reconcile(self, free: Mapping[str, float] | None) -> None:
        """Start or retire workers towards the target (`Scaler.reconcile`; `free=None`: assume they fit), and
        stop the draining workers that have nothing left in flight."""
        if self._colocated:
            return
        with self._lock:
            self._apply(self._scaler.reconcile(self._state(free)))
            for w in [w for w in self._workers.values() if w.state == "draining" and not w.in_flight]:
                del self._workers[w.worker_id]
                ray.kill(w.handle, no_restart=True)

    def _bundle(self) -> dict[str, float]:
        """One worker's resources, from its actor options."""
        from mosaic_ray.actors.resources import as_bundle

        return as_bundle(self._options)

    def _worker_options(self) -> dict[str, Any]:
        from mosaic_ray.actors.resources import actor_options

        return actor_options("rollout", self.cfg)

    def _start_worker(self) -> None:
        wid = f"rollout-{self._next_id}"
        self._next_id += 1
        self._options = self._worker_options()  # the cluster may advertise the rollout node resource by now
        options = {**self._options, "max_concurrency": 2 * self.rc.episodes_per_worker + 16}
        handle = RolloutWorker.options(**options).remote(
            wid, self.cfg, self.model_dir, router=self._router if self._scripted is None else None,
            scripted=self._scripted, scripted_delay_s=self._scripted_delay_s)
        self._workers[wid] = WorkerInfo(wid, handle, handle.ready.remote(), router_version=self._router_version)
        self.counters["workers_started"] += 1

    def _admit_colocated(self, handle: Any, *, restarting: bool = False) -> None:
        """Book a colocated worker (caller holds the lock, or is `__init__`); it takes episodes once `ready()`
        resolves, which a restarted one does after the engine supervisor reloaded its weights. A `restarting`
        one is asked after `RESTART_POLL_S` (a call to an actor that is restarting fails at once)."""
        wid = f"rollout-{self._next_id}"
        self._next_id += 1
        if restarting:
            self._workers[wid] = WorkerInfo(wid, handle, None, ready_after=time.monotonic() + RESTART_POLL_S)
        else:
            self._workers[wid] = WorkerInfo(wid, handle, handle.ready.remote())
        self.counters["workers_started"] += 1

    def _admit_ready(self) -> None:
        """Move started workers whose `ready()` resolved into dispatch (or mark them dead)."""
        with self._lock:
            now = time.monotonic()
            for w in self._workers.values():  # a restarting colocated worker, asked again
                if w.state == "starting" and w.ready_ref is None and now >= w.ready_after:
                    w.ready_ref = w.handle.ready.remote()
            pending = {w.ready_ref: w for w in self._workers.values() if w.state == "starting" and w.ready_ref}
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in ready:
            w = pending[ref]
            try:
                info = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - any error from ready() means the worker never started
                with self._lock:
                    if self._colocated:
                        if isinstance(exc, ray.exceptions.ActorDiedError):  # its restarts are spent: go on without
                            self._mark_dead(w, _describe(exc), restarts=False)
                        else:  # still restarting: ask again later
                            w.ready_ref, w.ready_after = None, time.monotonic() + RESTART_POLL_S
                        continue
                    self._start_failures += 1
                    if self._start_failures >= START_FAILURES_FATAL:
                        self._fatal = (f"RolloutFleet: {self._start_failures} rollout workers in a row died while "
                                       f"starting; last error: {_describe(exc)}")
                    self._mark_dead(w, _describe(exc))
                continue
            with self._lock:
                if w.state == "starting" and w.worker_id in self._workers:
                    w.state, w.node_id, w.idle_since = "healthy", info["node_id"], time.monotonic()
                    if w.router_version < self._router_version:  # set_engines ran while it was starting
                        w.handle.set_router.remote(self._router)
                        w.router_version = self._router_version
                    self._start_failures = 0

    def _mark_dead(self, w: WorkerInfo, why: str, *, restarts: bool = True) -> None:
        """Forget a dead worker and re-queue what it had in flight (caller holds the lock). A colocated worker
        restarts in place (it is an engine): it is booked again, to take episodes once ready, unless `restarts`
        is False (its `ready()` failed: dead for good)."""
        if self._workers.pop(w.worker_id, None) is None:
            return
        log.warning("rollout worker %s died (%s); re-queueing its unfinished episodes", w.worker_id, why)
        self.counters["worker_deaths"] += 1
        for gen, pending in w.in_flight.items():
            self._owner.pop(gen, None)
            for spec in reversed(pending.values()):
                self._requeue(spec, why, w.worker_id)
        w.in_flight.clear()
        if not self._colocated:
            ray.kill(w.handle, no_restart=True)
        elif restarts:
            self._admit_colocated(w.handle, restarting=True)
        else:
            self._target = len(self._workers)
