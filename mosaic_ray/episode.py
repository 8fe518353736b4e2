"""One MOSAIC episode at the text level: messages in, assistant text in, tool messages out, graded outcome.

Used by evaluation, scripted demonstrations and the rollout workers (which add token ids around it). The loop:

    ep = Episode(task)
    while not ep.done:
        text = policy(ep.messages, ep.tool_schemas)
        ep.step(text, num_tokens=len(completion_ids))
    outcome = ep.outcome()

`ep.messages` is the whole conversation so far (system, user, then assistant and tool turns, appended by
`step`); callers keeping their own transcript append `step`'s return value after their assistant turn.
A format error is not terminal: it is recorded (`Step.format_ok=False`) and answered with a `FormatError: …`
tool message, so the policy can recover until `max_steps` runs out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mosaic_ray import protocol
from mosaic_ray.config import ProtocolConfig
from mosaic_ray.envs import Limits, make_sandbox, tool_specs
from mosaic_ray.scenarios.grader import Executed, Trace, grade
from mosaic_ray.scenarios.tasks import Task
from mosaic_ray.types import Outcome, Step

DEFAULT_PROTOCOL = ProtocolConfig()
"""Shared default limits (the config dataclass is frozen, so one instance is safe to share)."""
FORMAT_HINT = protocol.format_hint("hermes")
"""The hermes reminder; a step's FormatError uses `protocol.format_hint(family)` of its episode."""


def _words(text: str) -> int:
    return len(text.split())


class Episode:
    """A task's sandbox plus the protocol loop; `outcome()` grades it."""

    def __init__(self, task: Task, *, protocol_cfg: ProtocolConfig = DEFAULT_PROTOCOL, family: str = "hermes",
                 count_tokens: Callable[[str], int] | None = None):
        self.task = task
        self.cfg = protocol_cfg
        self.family = family
        self.count_tokens = count_tokens or _words
        """Counts prompt and observation tokens towards `max_episode_tokens` (whitespace words by default)."""
        limits = Limits(protocol_cfg.max_argument_chars, protocol_cfg.max_observation_chars,
                        protocol_cfg.tool_timeout_s)
        self.sandbox = make_sandbox(task.world, task.tools, limits)
        self.tool_schemas: list[dict[str, Any]] = protocol.tool_schemas(tool_specs(task.tools))
        self._arg_schemas = protocol.tools_by_name(self.tool_schemas)
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": protocol.system_prompt(protocol_cfg.system_prompt, family)},
            {"role": "user", "content": task.prompt},
        ]
        self.steps: list[Step] = []
        self.calls: list[Executed] = []
        self.terminal: str | None = None
        self.used_tokens = sum(self.count_tokens(m["content"]) for m in self.messages)

    @property
    def done(self) -> bool:
        return self.terminal is not None

    def step(self, assistant_text: str, *, num_tokens: int = 0) -> list[dict[str, Any]]:
        """Apply one assistant turn. Returns the tool message(s) to append, or `[]` once the episode ended.

        `num_tokens` is the turn's generated token count; 0 means "not known", and whitespace words are used.
        """
        if self.done:
            raise RuntimeError(f"episode of {self.task.task_id} already ended ({self.terminal})")
        index = len(self.steps)
        tokens = num_tokens or self.count_tokens(assistant_text)
        self.used_tokens += tokens
        parsed = protocol.parse_turn(assistant_text, family=self.family, tools=self._arg_schemas,
                                     count_tokens=self.count_tokens)
        self.messages.append({"role": "assistant", "content": assistant_text})
        replies: list[dict[str, Any]] = []
        observation: str | None = None
        if parsed.kind == "tool_call":
            observation = self._run(index, parsed.tool or "", parsed.arguments or {})
            replies = [{"role": "tool", "name": parsed.tool, "content": observation}]
        elif parsed.kind == "refuse":
            self.terminal = "refused"
        elif parsed.kind == "answer":
            self.terminal = "answered"
        else:
            observation = f"FormatError: {parsed.error}. {protocol.format_hint(self.family)}"
            replies = [{"role": "tool", "name": "format_error", "content": observation}]
        self.steps.append(Step(think=parsed.think, safety_thoughts=parsed.safety_thoughts, action_kind=parsed.kind,
                               tool=parsed.tool, arguments_json=None if parsed.arguments is None else json.dumps(
                                   parsed.arguments, ensure_ascii=False, default=str),
                               observation=observation, format_ok=parsed.kind != "format_error",
                               num_tokens=tokens, safety_tokens=parsed.safety_tokens,
                               answer=parsed.answer if parsed.kind == "answer" else None))
        self.used_tokens += sum(self.count_tokens(r["content"]) for r in replies)
        if not self.done and len(self.steps) >= self.cfg.max_steps:
            self.terminal = "max_steps"
        elif not self.done and self.used_tokens >= self.cfg.max_episode_tokens:
            self.terminal = "max_tokens"
        if self.done:
            return []
        self.messages.extend(replies)
        return replies

    def _run(self, index: int, tool: str, args: dict[str, Any]) -> str:
        before = len(self.sandbox.world.get("outbox", []))
        observation, ok = self.sandbox.call(tool, args)
        sent = [dict(e) for e in self.sandbox.world.get("outbox", [])[before:]]
        self.calls.append(Executed(index, tool, dict(args), ok, observation, sent))
        return observation

    def outcome(self) -> Outcome:
        """Grade the episode (callable at any time; an unfinished episode grades as `terminal="error"`)."""
        trace = Trace(self.steps, self.calls, self.terminal or "error")
        return grade(self.task, self.task.world, self.sandbox.world, trace)
