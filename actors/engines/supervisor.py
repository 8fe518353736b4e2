"""`EngineSupervisor`: keeps every engine actor serving the current policy — health checks, hung engines killed,
restarted engines reloaded — so one dead or hung engine never stalls or breaks training.

Driver-side, one per run. Engine actors restart in place (`engine.max_restarts`, same handle; see
`mosaic_ray.actors.engines.actor`). The supervisor:

- pings every engine (`health`) every `engine.health_interval_s`; an engine that has not answered for
  `engine.hung_after_s` (alive but hung: a stopped process, a deadlocked call) is killed, and Ray restarts it;
- loads the current weights into an engine that came back from a restart (it refuses requests until then) or
  that missed an update, through the same push the driver's weight sync uses. Each reload runs in its own thread
  (one per engine at a time): a reload waits for the push lock, and the push it waits for may itself be stuck on
  a hung engine that only the health loop can kill, so the health loop never waits for a reload;
- runs every weight push (`push`) under one lock, so a sync and a reload never interleave, and retries a push
  whose engine died mid-way on the engines still alive (the dead one is reloaded when it is back).

Requests themselves are protected by the routers' deadlines (`engine.request_deadline_s`): a request to a hung
engine is retried on another one long before the supervisor kills it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray

from mosaic_ray.config import EngineConfig

__all__ = ["EngineSupervisor"]

log = logging.getLogger(__name__)
PUSH_ATTEMPTS = 3
"""Tries of one weight push when engines die during it."""

PushFn = Callable[[list[Any], int], dict[str, float]]
"""`push(engines, version) -> metrics`: the driver's weight sync (`mosaic_ray.driver.weight_sync`)."""


class EngineSupervisor:
    """Health checks, hung-engine kills and reloads for `engines`; see the module docstring.

        sup = EngineSupervisor(engines, cfg.engine, weight_sync.push)
        with sup.weights_changing():      # no reload may load weights the engines are not told about yet
            learner.update(...)
            sup.push(version)             # every engine, retried around engines that die during it
        sup.stop()
    """

    def __init__(self, engines: Sequence[Any], cfg: EngineConfig, push_fn: PushFn, *, version: int = 0):
        self.engines = list(engines)
        self.cfg = cfg
        self._push_fn = push_fn
        self.version = version
        """The policy version every engine should serve."""
        self._lock = threading.RLock()
        now = time.monotonic()
        self._last_ok = dict.fromkeys(range(len(self.engines)), now)
        self._restarts = {i: _actor_state(e)[1] for i, e in enumerate(self.engines)}
        """Restarts seen so far per engine (those before this supervisor are not counted)."""
        self._reloads: dict[int, threading.Thread] = {}
        """The reload in progress per engine index (at most one each)."""
        self.counters = {"engine_restarts": 0, "engine_reloads": 0, "hung_engines_killed": 0, "push_retries": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine-supervisor", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------- weights

    @contextlib.contextmanager
    def weights_changing(self) -> Iterator[None]:
        """Hold reloads while the learner's weights run ahead of `version` (between an update and its push)."""
        with self._lock:
            yield

    def push(self, version: int) -> dict[str, float]:
        """Load the learner's weights into every engine as `version`; engines that die during the push are left
        out of the retry (the supervisor reloads them once they are back). Raises when no engine takes it."""
        from ray.exceptions import RayActorError

        with self._lock:
            engines, last = list(self.engines), None
            for attempt in range(PUSH_ATTEMPTS):
                try:
                    out = self._push_fn(engines, version)
                except RayActorError as exc:
                    last = exc
                    self.counters["push_retries"] += 1
                    log.warning("weight push of version %d: an engine died (%s); retrying on the live ones",
                                version, str(exc).splitlines()[0][:200])
                    engines = self._answering(engines)
                    if not engines:
                        time.sleep(1.0 + attempt)
                        engines = self._answering(list(self.engines))
                    continue
                self.version = version
                return out
            raise RuntimeError(f"weight push of version {version} failed {PUSH_ATTEMPTS} times: {last}") from last

    @staticmethod
    def _answering(engines: list[Any], timeout_s: float = 5.0) -> list[Any]:
        """The engines among `engines` that answer a health check within `timeout_s`."""
        refs = [e.health.remote() for e in engines]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = []
        for e, ref in zip(engines, refs):
            if ref in ready:
                with contextlib.suppress(Exception):  # dead or restarting: left out
                    ray.get(ref)
                    out.append(e)
        return out

    # ---------------------------------------------------------------------------------- health loop

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.health_interval_s):
            try:
                self.check()
            except Exception:  # the supervisor must outlive a failed GCS call (logged with its traceback)
                log.exception("engine health check failed")

    def check(self) -> None:
        """One health pass over every engine (the loop runs it every `health_interval_s`)."""
        from ray.exceptions import RayActorError

        refs = [e.health.remote() for e in self.engines]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.health_interval_s)
        now = time.monotonic()
        for i, (engine, ref) in enumerate(zip(self.engines, refs)):
            state, restarts = _actor_state(engine)
            if restarts > self._restarts.get(i, 0):
                self.counters["engine_restarts"] += restarts - self._restarts.get(i, 0)
                log.warning("engine %d restarted (%d restarts so far)", i, restarts)
            self._restarts[i] = restarts
            if state != "ALIVE":  # starting or restarting (silence is expected), or dead for good
                self._last_ok[i] = now
                continue
            if ref not in ready:
                if now - self._last_ok[i] > self.cfg.hung_after_s:  # alive to Ray, silent to us: hung
                    log.warning("engine %d has not answered for %.0f s: killing it (Ray restarts it)", i,
                                now - self._last_ok[i])
                    ray.kill(engine, no_restart=False)
                    self.counters["hung_engines_killed"] += 1
                    self._last_ok[i] = now
                continue
            try:
                health = ray.get(ref)
            except RayActorError:
                continue
            self._last_ok[i] = now
            if (not health["serving"] or health["version"] < self.version) and not self._reloading(i):
                self._reloads[i] = threading.Thread(target=self._reload_logged, args=(i, engine), daemon=True,
                                                    name=f"engine-reload-{i}")
                self._reloads[i].start()

    def _reloading(self, i: int) -> bool:
        thread = self._reloads.get(i)
        return thread is not None and thread.is_alive()

    def _reload_logged(self, i: int, engine: Any) -> None:
        try:
            self._reload(i, engine)
        except Exception as exc:  # noqa: BLE001 - the next health pass sees the engine still behind and tries again
            log.warning("reload of engine %d failed (%s: %s); retried at the next health pass", i,
                        type(exc).__name__, str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "")

    def _reload(self, i: int, engine: Any) -> None:
        with self._lock:  # waits for a push or an update in progress; it may have reloaded the engine already
            health = ray.get(engine.health.remote(), timeout=self.cfg.hung_after_s)
            if health["serving"] and health["version"] >= self.version:
                return
            if self.version == 0:
                ray.get(engine.serve_base_weights.remote())
            else:
                self._push_fn([engine], self.version)
            self.counters["engine_reloads"] += 1
            log.info("engine %d reloaded with version %d", i, self.version)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.cfg.health_interval_s + 10)
        for thread in list(self._reloads.values()):
            thread.join(timeout=self.cfg.hung_after_s + 10)


def _actor_state(handle: Any) -> tuple[str, int]:
    """(state, restarts) of an actor from the GCS actor table: `ALIVE`, `PENDING_CREATION`, `RESTARTING`, `DEAD`.

    Ray's private state accessor: the public `ray.util.state` needs the dashboard, which clusters may not run.
    It tells a restarting engine (silent while it loads) from a hung one (ALIVE and silent)."""
    from ray._private import state

    info = state.actors(actor_id=handle._actor_id.hex())
    return str(info.get("State", "ALIVE")), int(info.get("NumRestarts", 0))
