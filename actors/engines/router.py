"""Spread generation requests over N engines: least outstanding requests, sticky per session.

An engine is either a Ray actor handle of `EngineActor` (called as `handle.generate.remote([request])`) or an
in-process `Engine` (awaited directly; the `num_engines=0` path for tests and notebooks). The router is
plain Python: it holds no Ray state beyond the handles themselves.

- **Least outstanding requests**: each request goes to the engine with the fewest requests this router has
  in flight on it (ties rotate), which keeps batches even without asking the engines.
- **Sticky sessions**: a request with `session_id` goes where that session went before, while that engine is
  still in the router, so an episode's growing prompt can reuse the engine's prefix cache. The session map is
  an LRU capped at `max_sessions`; `end_session` frees an entry early.
- **Elastic**: `add_engine` / `remove_engine` while serving. Requests already sent to a removed engine finish
  there; new ones (and its sessions) go elsewhere.
- **Deadlines and retries**: a request that fails because its engine is gone, restarting, not serving yet
  (`EngineNotServingError`: restarted, waiting for the current weights) or silent past `request_deadline_s`
  (a hung engine) is retried on another engine (generation is stateless, so a retry is safe), up to `retries`
  times. The failed engine cools down (`cooldown_s`, doubling per consecutive failure up to 60 s) instead of
  leaving the router: engine actors restart in place (same handle), so it comes back. When every engine is
  cooling down, the request waits for the first to come back.
- **Picklable**: rollout workers receive the router by value; `__getstate__` keeps the handles and drops the
  counters, session map and statistics (each copy routes on what it sends itself).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from .base import Completion, Engine, GenerationRequest

__all__ = ["EngineDeadlineError", "EngineNotServingError", "EngineRouter", "NoEngineError"]

MAX_COOLDOWN_S = 60.0


class NoEngineError(RuntimeError):
    """The router has no engine to send a request to."""


class EngineNotServingError(RuntimeError):
    """The engine is up but does not serve yet (restarted, waiting for the current weights); try another."""


class EngineDeadlineError(TimeoutError):
    """No engine answered a request within its deadline, on any attempt."""


def _retryable(exc: BaseException) -> bool:
    """Whether `exc` is the engine's failure (gone, restarting, not serving, past its deadline), as opposed to an
    error in the request itself."""
    if isinstance(exc, (EngineNotServingError, asyncio.TimeoutError)):
        return True
    ray_exceptions = sys.modules.get("ray.exceptions")
    return ray_exceptions is not None and isinstance(exc, ray_exceptions.RayActorError)


class EngineRouter:
    """Routes requests over engine actor handles (or in-process engines). See the module docstring."""

    def __init__(self, engines: Iterable[Any] = (), *, max_sessions: int = 100_000, retries: int = 3,
                 request_deadline_s: float = 0.0, cooldown_s: float = 2.0):
        self._engines: list[Any] = []
        self.max_sessions = max_sessions
        self.retries = retries
        self.request_deadline_s = request_deadline_s
        """Seconds one attempt may take (0 = none)."""
        self.cooldown_s = cooldown_s
        self._reset_live_state()
        for engine in engines:
            self.add_engine(engine)

    def _reset_live_state(self) -> None:
        self._outstanding: dict[Any, int] = {e: 0 for e in self._engines}
        self._sessions: OrderedDict[str, Any] = OrderedDict()
        self._cool_until: dict[Any, float] = {}
        self._failures: dict[Any, int] = {}
        self._turn = 0
        self.stats = {"routed": 0, "retried": 0, "deadline_expired": 0, "engine_failures": 0}

    def __getstate__(self) -> dict:
        return {"engines": list(self._engines), "max_sessions": self.max_sessions, "retries": self.retries,
                "request_deadline_s": self.request_deadline_s, "cooldown_s": self.cooldown_s}

    def __setstate__(self, state: dict) -> None:
        self._engines = list(state["engines"])
        self.max_sessions = state["max_sessions"]
        self.retries = state["retries"]
        self.request_deadline_s = state["request_deadline_s"]
        self.cooldown_s = state["cooldown_s"]
        self._reset_live_state()

    # --------------------------------------------------------------------------------- membership

    @property
    def engines(self) -> list[Any]:
        return list(self._engines)

    def add_engine(self, engine: Any) -> None:
        if engine in self._outstanding:
            return
        self._engines.append(engine)
        self._outstanding[engine] = 0

    def remove_engine(self, engine: Any) -> bool:
        """Stop routing to `engine`; its in-flight requests still finish. Returns whether it was present."""
        if engine not in self._outstanding:
            return False
        self._engines.remove(engine)
        del self._outstanding[engine]
        self._cool_until.pop(engine, None)
        self._failures.pop(engine, None)
        for sid in [sid for sid, e in self._sessions.items() if e == engine]:
            del self._sessions[sid]
        return True

    def end_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def outstanding(self) -> list[int]:
        """Requests in flight per engine, in `engines` order."""
        return [self._outstanding[e] for e in self._engines]

    # ------------------------------------------------------------------------------------ routing

    def pick(self, session_id: str | None = None) -> Any:
        """The engine the next request of `session_id` goes to (recording the session's choice)."""
        if not self._engines:
            raise NoEngineError("EngineRouter: no engines (add_engine first, or every engine was removed)")
        now = time.monotonic()
        if session_id is not None:
            engine = self._sessions.get(session_id)
            if engine is not None and engine in self._outstanding and self._cool_until.get(engine, 0.0) <= now:
                self._sessions.move_to_end(session_id)
                return engine
        n = len(self._engines)
        start = self._turn % n
        self._turn += 1
        order = self._engines[start:] + self._engines[:start]
        serving = [e for e in order if self._cool_until.get(e, 0.0) <= now] or order
        engine = min(serving, key=lambda e: (self._cool_until.get(e, 0.0), self._outstanding[e]))
        if session_id is not None:
            self._sessions[session_id] = engine
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return engine

    async def generate(self, request: GenerationRequest) -> Completion:
        """Send one request to an engine and await its completion (retried elsewhere; see the module doc)."""
        for attempt in range(self.retries + 1):
            await self._wait_for_a_serving_engine()
            engine = self.pick(request.session_id)
            self._outstanding[engine] += 1
            self.stats["routed"] += 1
            try:
                out = await self._call(engine, request, self.request_deadline_s)
            except Exception as exc:
                if not _retryable(exc):
                    raise
                self._cool_down(engine, request.session_id)
                if isinstance(exc, asyncio.TimeoutError):
                    self.stats["deadline_expired"] += 1
                    if attempt == self.retries:
                        raise EngineDeadlineError(f"EngineRouter: request {request.request_id!r}: no engine answered "
                                                  f"within {self.request_deadline_s}s on {attempt + 1} attempts") from None
                if attempt == self.retries:
                    raise
                self.stats["retried"] += 1
            else:
                self._failures.pop(engine, None)
                return out
            finally:
                if engine in self._outstanding:
                    self._outstanding[engine] -= 1
        raise AssertionError("unreachable")  # the loop returns or raises

    def _cool_down(self, engine: Any, session_id: str | None) -> None:
        """Route around a failed engine for a while (it may be restarting); its sessions move on."""
        self.stats["engine_failures"] += 1
        failures = self._failures.get(engine, 0)
        self._failures[engine] = failures + 1
        self._cool_until[engine] = time.monotonic() + min(self.cooldown_s * 2 ** failures, MAX_COOLDOWN_S)
        if session_id is not None and self._sessions.get(session_id) is engine:
            del self._sessions[session_id]

    async def _wait_for_a_serving_engine(self) -> None:
        now = time.monotonic()
        until = min((self._cool_until.get(e, 0.0) for e in self._engines), default=0.0)
        if until > now:
            await asyncio.sleep(until - now)

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Route each request on its own (they may land on different engines); results in request order."""
        import asyncio

        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    @staticmethod
    async def _call(engine: Any, request: GenerationRequest, deadline_s: float) -> Completion:
        call = engine.generate([request]) if isinstance(engine, Engine) else engine.generate.remote([request])
        if deadline_s > 0:
            return (await asyncio.wait_for(call, deadline_s))[0]
        return (await call)[0]
