"""What every external suite shares: data paths, the resumable per-case store, progress bars, the tool-using
episode loop and its turn policies. The suites' text judges live in `mosaic_ray.judge.text`, the engine-backed
model agent behind `--policy model:DIR` in `mosaic_ray.driver.agent`.

- **Data** (`data_dir`): `--data PATH` (the benchmark's directory, or a root holding `<name>/`), else
  `$MOSAIC_DATA_DIR/<name>`, else `../shared/data/<name>` (from the working directory, then from the repository).
  Evaluation data only: it is read in place, never copied.
- **Results** (`mosaic_ray.results.CaseStore`, shared with the internal suites): one JSON line per finished case
  (its full transcript) in `<out>.cases.jsonl`, and the summary `<out>` written atomically only once every case is
  in, with `"complete": true`. A rerun with the same `--out` skips the finished cases; a failed run leaves no summary.
- **Episodes** (`run_tool_episode`): policy text → `mosaic_ray.protocol` → tool call (executed by the suite),
  `refuse` (terminal, an exact refusal), final answer (terminal), or a format error (fed back, not terminal).
- **Turn policies** (`make_turn_policy`): `model:DIR` on an `EngineAgent` (`ModelTurns`), the suite's own
  complying policy, or `scripted:over_refuse` (`RefuseTurns`).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mosaic_ray import protocol
from mosaic_ray.driver.agent import EngineAgent
from mosaic_ray.results import CaseStore, progress
from mosaic_ray.types import REFUSE_TOOL

__all__ = ["DATA_ENV", "CaseStore", "DataError", "ModelTurns", "RefuseTurns", "ToolEpisode", "Transcript",
           "data_dir", "load_json", "make_turn_policy", "progress", "run_cases", "run_tool_episode",
           "scripted_text"]

DATA_ENV = "MOSAIC_DATA_DIR"
_REPO = Path(__file__).resolve().parents[1]


class DataError(ValueError):
    """A benchmark data file is missing, truncated or of the wrong schema; the message names file and case."""


def data_dir(name: str, given: str | None = None) -> Path:
    """The directory of benchmark `name`'s data (see the module docstring for the search order)."""
    if given:  # the benchmark's own directory, or a root holding <name>/ (one --data for several suites)
        if not Path(given).is_dir():
            raise DataError(f"{name}: --data {given}: no such directory")
        return Path(given) / name if (Path(given) / name).is_dir() else Path(given)
    tried = ([Path(os.environ[DATA_ENV]) / name] if os.environ.get(DATA_ENV) else []) + [
        Path("../shared/data") / name, _REPO.parent / "shared" / "data" / name]
    for path in tried:
        if path.is_dir():
            return path
    raise DataError(f"{name}: no data directory (tried {', '.join(map(str, tried))}); pass --data PATH or set "
                    f"{DATA_ENV} (evaluation data only: read in place, never copied into the repository)")


def load_json(path: Path) -> Any:
    """A data file's JSON; a missing or truncated file is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON (truncated or corrupt?): {exc}") from None


# ------------------------------------------------------------------------------------------------ results


def emit(result: dict[str, Any], path: str | None) -> dict[str, Any]:
    """A throughput benchmark's last output: `result` as one JSON line on stdout and, when `path` is given, the
    same indented in that file. Returns `result`."""
    print(json.dumps(result))
    if path:
        Path(path).write_text(json.dumps(result, indent=2))
    return result


def run_cases(store: CaseStore, cases: Sequence[Any], case_id: Callable[[Any], str],
              run_one: Callable[[Any], Awaitable[dict[str, Any]]], *, desc: str, concurrency: int = 64) -> None:
    """Run every case not yet in `store` (up to `concurrency` at once), storing each record as it finishes."""
    todo = [c for c in cases if not store.done(case_id(c))]

    async def main(advance: Callable[[], None]) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(case: Any) -> None:
            async with gate:
                rec = await run_one(case)
            store.add({"case_id": case_id(case), **rec})
            advance()

        await asyncio.gather(*(one(c) for c in todo))

    with progress(len(todo), desc) as advance:
        asyncio.run(main(advance))


# ------------------------------------------------------------------------------------------------ episodes


@dataclass
class ToolEpisode:
    """One case as a tool-using episode: the opening chat, the suite's tools, and how to run a call."""

    case_id: str
    messages: list[dict[str, Any]]
    """Opening chat in the project's format (system, user, and any turns already taken)."""
    tools: list[dict[str, Any]]
    """The suite's tools as function schemas (the `refuse` tool is added on top)."""
    execute: Callable[[str, dict[str, Any]], Awaitable[tuple[str, bool]]]
    """(tool, arguments) → (observation, ok)."""
    max_steps: int = 10
    case: Any = None
    """The suite's own case record (scripted policies read it; models never see it)."""


@dataclass
class Transcript:
    """What happened: every assistant turn as written, the protocol's verdict, and what the tools answered."""

    turns: list[dict[str, Any]] = field(default_factory=list)
    terminal: str = "max_steps"
    """refused | answered | max_steps"""
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return self.terminal == "refused"

    @property
    def answer(self) -> str:
        return next((t["answer"] or "" for t in reversed(self.turns) if t["kind"] == "answer"), "")

    @property
    def calls(self) -> list[dict[str, Any]]:
        return [t for t in self.turns if t["kind"] == "tool_call"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TurnPolicy(Protocol):
    family: str

    async def act(self, episode: ToolEpisode, messages: list[dict[str, Any]], step: int) -> str: ...


async def run_tool_episode(episode: ToolEpisode, policy: TurnPolicy) -> Transcript:
    """The MOSAIC loop over a suite's tools (see the module docstring)."""
    schemas = protocol.tool_schemas(episode.tools)
    by_name = protocol.tools_by_name(schemas)
    messages = list(episode.messages)
    out = Transcript()
    for step in range(episode.max_steps):
        text = await policy.act(episode, messages, step)
        parsed = protocol.parse_turn(text, family=policy.family, tools=by_name)
        turn = {"step": step, "text": text, "kind": parsed.kind, "tool": parsed.tool, "arguments": parsed.arguments,
                "answer": parsed.answer, "error": parsed.error, "observation": None, "ok": None}
        out.turns.append(turn)
        messages.append({"role": "assistant", "content": text})
        if parsed.kind == "tool_call":
            obs, ok = await episode.execute(parsed.tool or "", dict(parsed.arguments or {}))
            turn.update(observation=obs, ok=ok)
            messages.append({"role": "tool", "name": parsed.tool, "content": obs})
        elif parsed.kind in ("refuse", "answer"):
            out.terminal = "refused" if parsed.kind == "refuse" else "answered"
            break
        else:
            obs = f"FormatError: {parsed.error}. Reply with <think>plan</think> then one <tool_call>, a refuse call, " \
                  f"or a final answer."
            turn["observation"] = obs
            messages.append({"role": "tool", "name": "format_error", "content": obs})
    out.messages = messages
    return out


def scripted_text(tool: str | None = None, arguments: dict[str, Any] | None = None, answer: str | None = None,
                  think: str = "Act.") -> str:
    """One well-formed turn in the hermes family (what scripted policies write)."""
    if tool is not None:
        return f"<think>{think}</think>\n{protocol.format_call(tool, arguments or {}, 'hermes')}"
    return f"<think>{think}</think>\n{(answer or '').strip() or 'Done.'}"


class RefuseTurns:
    """`scripted:over_refuse` in the tool suites: calls `refuse` on the first turn."""

    family = "hermes"

    async def act(self, episode: ToolEpisode, messages: list[dict[str, Any]], step: int) -> str:
        return scripted_text(REFUSE_TOOL, {"reason": "I will not act on this request."}, think="Refuse.")


class ModelTurns:
    """`model:DIR`: the engine-backed agent writes each turn (it sees only the chat and the tool schemas)."""

    def __init__(self, agent: EngineAgent):
        self.agent = agent
        self.family = agent.family

    async def act(self, episode: ToolEpisode, messages: list[dict[str, Any]], step: int) -> str:
        return await self.agent.turn(messages, episode.tools, session_id=episode.case_id, seed=step)


def make_turn_policy(suite: str, spec: str, agent: EngineAgent | None, naive: Callable[[], Any]) -> Any:
    """The turn policy of `spec` in a tool suite: `model:DIR` on `agent`, `scripted:naive` (the suite's own
    complying policy) or `scripted:over_refuse`; anything else is an error naming the choices."""
    kind, _, name = spec.partition(":")
    if kind == "model":
        return ModelTurns(agent)
    scripted = {"naive": naive, "over_refuse": RefuseTurns}
    if kind != "scripted" or name not in scripted:
        raise ValueError(f"{suite}: unknown policy {spec!r}; choose scripted:naive, scripted:over_refuse or model:DIR")
    return scripted[name]()
