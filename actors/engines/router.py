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
  there; new ones (and its sessions) go elsewhere. An engine whose actor died is removed and the request is
  retried once on another engine (generation is stateless, so a retry is safe).
- **Picklable**: rollout workers receive the router by value; `__getstate__` keeps the handles and drops the
  counters, session map and statistics (each copy routes on what it sends itself).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from .base import Completion, Engine, GenerationRequest

__all__ = ["EngineRouter", "NoEngineError"]


class NoEngineError(RuntimeError):
    """The router has no engine to send a request to."""


def _engine_died(exc: BaseException) -> bool:
    """Whether `exc` says the engine actor is gone (as opposed to an error in the request itself)."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    return ray_exceptions is not None and isinstance(exc, ray_exceptions.RayActorError)


class EngineRouter:
    """Routes requests over engine actor handles (or in-process engines). See the module docstring."""

    def __init__(self, engines: Iterable[Any] = (), *, max_sessions: int = 100_000, retries: int = 1):
        self._engines: list[Any] = []
        self.max_sessions = max_sessions
        self.retries = retries
        self._reset_live_state()
        for engine in engines:
            self.add_engine(engine)

    def _reset_live_state(self) -> None:
        self._outstanding: dict[Any, int] = {e: 0 for e in self._engines}
        self._sessions: OrderedDict[str, Any] = OrderedDict()
        self._turn = 0
        self.stats = {"routed": 0, "retried": 0, "dead_engines_removed": 0}

    def __getstate__(self) -> dict:
        return {"engines": list(self._engines), "max_sessions": self.max_sessions, "retries": self.retries}

    def __setstate__(self, state: dict) -> None:
        self._engines = list(state["engines"])
        self.max_sessions = state["max_sessions"]
        self.retries = state["retries"]
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
        if session_id is not None:
            engine = self._sessions.get(session_id)
            if engine is not None and engine in self._outstanding:
                self._sessions.move_to_end(session_id)
                return engine
        n = len(self._engines)
        start = self._turn % n
        self._turn += 1
        order = self._engines[start:] + self._engines[:start]
        engine = min(order, key=self._outstanding.__getitem__)
        if session_id is not None:
            self._sessions[session_id] = engine
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return engine

    async def generate(self, request: GenerationRequest) -> Completion:
        """Send one request to an engine and await its completion."""
        for attempt in range(self.retries + 1):
            engine = self.pick(request.session_id)
            self._outstanding[engine] += 1
            self.stats["routed"] += 1
            try:
                return await self._call(engine, request)
            except Exception as exc:
                if not _engine_died(exc) or attempt == self.retries:
                    raise
                if self.remove_engine(engine):
                    self.stats["dead_engines_removed"] += 1
                self.stats["retried"] += 1
            finally:
                if engine in self._outstanding:
                    self._outstanding[engine] -= 1
        raise AssertionError("unreachable")  # the loop returns or raises

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Route each request on its own (they may land on different engines); results in request order."""
        import asyncio

        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    @staticmethod
    async def _call(engine: Any, request: GenerationRequest) -> Completion:
        if isinstance(engine, Engine):
            return (await engine.generate([request]))[0]
        return (await engine.generate.remote([request]))[0]
