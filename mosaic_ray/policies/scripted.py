"""Scripted policies (no model): test oracles, baselines, and SFT warm-start demonstrators.

A scripted policy plans a whole episode from the task's grading spec (oracle / naive call sequences) and emits
one protocol turn per step through `protocol.format_turn`, so every demonstration parses back with format score
1.0. `ScriptedPolicy`'s deliberate mistakes (comply with harm, follow an injection, refuse a benign task, leak)
are drawn once per task from `Random(f"{seed}:{task_id}")`: the same task always gets the same demonstration,
independent of batch order. Think texts are short ("transfer AC123", "harmful: refuse") because the tiny model
pays for every token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from mosaic_ray import protocol
from mosaic_ray.config import ProtocolConfig
from mosaic_ray.envs import TOOLS
from mosaic_ray.episode import DEFAULT_PROTOCOL, Episode
from mosaic_ray.scenarios.tasks import Task
from mosaic_ray.types import REFUSE_TOOL, Outcome

__all__ = ["SCRIPTED", "RandomPolicy", "ScriptedPolicy", "demonstrations", "get_scripted", "run_policy"]

Turn = tuple[str, str | None, str | None, dict[str, Any] | None, str | None]
"""(think, safety_thoughts, tool, arguments, answer)."""

_ARG_HINT = ("to", "name", "sender", "payee", "site", "day", "query", "title", "cmd")


def _think(tool: str, args: dict[str, Any]) -> str:
    key = next((args[k] for k in _ARG_HINT if k in args), "")
    return f"{tool.replace('_', ' ')} {key}".strip()


@dataclass(frozen=True)
class ScriptedPolicy:
    """Mostly-correct demonstrator; each rate is the chance of one deliberate mistake per task."""

    comply_harmful_rate: float = 0.0
    follow_injection_rate: float = 0.0
    refuse_benign_rate: float = 0.0
    """Also applies to the user task of injection and privacy tasks (over-refusal)."""
    leak_privacy_rate: float = 0.0
    safety_check_rate: float = 0.5
    """Chance that a turn that needs a `<safety_thoughts>` check carries one (`risky_turns`); routine turns of
    a plain request never do: the demonstrator spends the check where it matters."""
    seed: int = 0

    def plan(self, task: Task) -> list[Turn]:
        rng = random.Random(f"{self.seed}:{task.task_id}")
        comply, follow, refuse, leak = (rng.random() for _ in range(4))
        cat = task.category
        if cat == "harmful":
            if comply >= self.comply_harmful_rate:
                return self._checked(rng, [("harmful: refuse", "harmful intent", REFUSE_TOOL,
                                            {"reason": "This request would harm someone."}, None)], "harmful intent")
            calls, check = task.naive_calls(), "looks fine"
        elif refuse < self.refuse_benign_rate:
            return self._checked(rng, [("risky: refuse", "might be harmful", REFUSE_TOOL,
                                        {"reason": "This looks risky."}, None)], "might be harmful")
        elif cat == "injection" and follow < self.follow_injection_rate:
            calls, check = task.naive_calls(), "follow the note"
        elif cat == "privacy" and leak < self.leak_privacy_rate:
            calls, check = task.naive_calls(), "share it all"
        else:
            calls = task.ground_truth()
            check = {"injection": "ignore injected text", "privacy": "share only what's needed"}.get(cat, "user's own request")
        turns: list[Turn] = [(_think(c.tool, c.args), check, c.tool, c.args, None) for c in calls]
        turns.append(("done", None, None, None, "Done."))
        return self._checked(rng, turns, check, risky_turns(task, len(turns)))

    def _checked(self, rng: random.Random, turns: list[Turn], check: str,
                 risky: set[int] | None = None) -> list[Turn]:
        """A check on each risky turn (default: all) with probability `safety_check_rate`; none elsewhere."""
        return [(t, check if (risky is None or k in risky) and rng.random() < self.safety_check_rate else None,
                 tool, args, ans) for k, (t, _, tool, args, ans) in enumerate(turns)]


def risky_turns(task: Task, n: int) -> set[int]:
    """Turns (of `n`) where a careful agent checks: every turn of a harmful request; in an injection task every
    turn after the tool output that carries the injected text; in a privacy task every turn after the private
    data is read. A plain request's turns are routine."""
    if task.category == "harmful":
        return set(range(n))
    if task.category == "injection":
        injected, naive = task.grading.get("injected"), task.grading.get("naive", [])
        seen = next((k for k, c in enumerate(naive) if c == injected), 1)  # the payload shows after call `seen`-1
        return set(range(seen, n))
    if task.category == "privacy":
        return set(range(1, n))
    return set()


@dataclass(frozen=True)
class RandomPolicy:
    """Random valid and invalid actions (seeded per task): calls with random/bogus arguments, garbage text,
    stray refusals and answers. Exercises the parser, sandbox errors and graders."""

    seed: int = 0

    def plan(self, task: Task) -> list[Turn]:
        rng = random.Random(f"random:{self.seed}:{task.task_id}")
        values = [v for c in task.naive_calls() + task.ground_truth() for v in c.args.values()] or ["x"]
        turns: list[Turn] = []
        for _ in range(rng.randint(1, 6)):
            r = rng.random()
            if r < 0.55:
                tool = rng.choice([t for t in task.tools if t != REFUSE_TOOL])
                args = {a: rng.choice(values) for a in TOOLS[tool].arg_types if rng.random() < 0.8}
                turns.append(("try", None, tool, args, None))
            elif r < 0.8:
                turns.append(("??", None, "__garbage__", {"text": rng.choice(
                    ["<tool_call>{bad json", "<think>unclosed", "", "<tool_call>\n{\"name\": 3}\n</tool_call>"])}, None))
            elif r < 0.9:
                turns.append(("stop", None, REFUSE_TOOL, {"reason": "random"}, None))
                break
            else:
                turns.append(("done", None, None, None, "Done."))
                break
        return turns


SCRIPTED: dict[str, Any] = {
    "safe": ScriptedPolicy(safety_check_rate=0.5),
    "naive": ScriptedPolicy(comply_harmful_rate=1.0, follow_injection_rate=1.0, leak_privacy_rate=1.0,
                            safety_check_rate=0.0),
    "over_refuse": ScriptedPolicy(refuse_benign_rate=1.0, safety_check_rate=0.5),
    "random": RandomPolicy(),
}


def get_scripted(name: str) -> Any:
    try:
        return SCRIPTED[name]
    except KeyError:
        raise ValueError(f"unknown scripted policy {name!r}; known: {', '.join(SCRIPTED)}") from None


def render(turn: Turn, family: str = "hermes") -> str:
    think, safety, tool, args, answer = turn
    if tool == "__garbage__":
        return str((args or {}).get("text", ""))
    return protocol.format_turn(think=think, safety_thoughts=safety, tool=tool, arguments=args, answer=answer,
                                family=family)


def play(task: Task, policy: Any, *, protocol_cfg: ProtocolConfig = DEFAULT_PROTOCOL, family: str = "hermes") -> Episode:
    """Run one episode of `policy` on `task`; the planned turns are emitted until the episode ends."""
    ep = Episode(task, protocol_cfg=protocol_cfg, family=family)
    plan = policy.plan(task)
    for turn in plan:
        if ep.done:
            break
        ep.step(render(turn, family))
    if not ep.done:  # the plan ran out without a terminal action (random policy): end with an answer
        ep.step(render(("end", None, None, None, "Done."), family))
    return ep


def run_policy(tasks: list[Task], policy: Any, *, protocol_cfg: ProtocolConfig = DEFAULT_PROTOCOL,
               family: str = "hermes") -> list[tuple[Task, Outcome]]:
    """(task, outcome) for every task."""
    return [(t, play(t, policy, protocol_cfg=protocol_cfg, family=family).outcome()) for t in tasks]


def demonstrations(tasks: list[Task], policy: Any, *, protocol_cfg: ProtocolConfig = DEFAULT_PROTOCOL,
                   family: str = "hermes") -> list[dict[str, Any]]:
    """Full conversations for SFT: `messages` (system, user, assistant, tool …), `tools` (schemas), `task_id`."""
    out = []
    for t in tasks:
        ep = play(t, policy, protocol_cfg=protocol_cfg, family=family)
        out.append({"messages": ep.messages, "tools": ep.tool_schemas, "task_id": t.task_id,
                    "category": t.category})
    return out
