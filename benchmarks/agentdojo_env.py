"""AgentDojo worlds as a training source: one user task (optionally × one injection task under an attack) as an
episode the rollout fleet can drive with `reset` / `step` / `grade`.

Tools run against AgentDojo's own environment (its pydantic world, deep-copied per episode) through its own
`FunctionsRuntime`; tool errors come back as observations. Grading is AgentDojo's: the user task's
`utility_from_traces`/`utility` → `Outcome.benign_success`, the injection task's `security_from_traces`/`security`
→ `Outcome.injection_followed` (AgentDojo's security True = the injected goal was achieved).

Splits are explicit and seeded by user-task id (`split_of`), so a policy trained on the `train` user tasks can be
evaluated on the held-out `test` user tasks with `run_suite(..., split="test")`. All user × injection pairs of a
user task fall on the same side, so a test user task never appears in training under any injection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agentdojo.agent_pipeline.tool_execution import tool_result_to_str
from agentdojo.attacks.attack_registry import load_attack
from agentdojo.functions_runtime import FunctionCall, FunctionsRuntime
from mosaic_ray.benchmarks.agentdojo import SUITES, SYSTEM_MESSAGE, Split, load_suite, split_of, tool_schemas

from mosaic_ray.types import REFUSE_TOOL, Outcome

MAX_OBSERVATION_CHARS = 20_000
"""Longer tool outputs are cut with a marker (AgentDojo's largest default outputs are a few thousand chars)."""


@dataclass(frozen=True)
class AgentDojoScenario:
    suite: str
    user_task: str
    injection_task: str | None = None
    attack: str | None = None
    """Attack that writes the injection (required with `injection_task`)."""
    split: Split = "train"

    @property
    def task_id(self) -> str:
        return f"agentdojo/{self.suite}/{self.user_task}/{self.injection_task or 'clean'}/{self.attack or 'none'}"

    @property
    def category(self) -> str:
        return "benign" if self.injection_task is None else "injection"


def scenarios(split: Split, *, suites: tuple[str, ...] = SUITES, attack: str | None = "important_instructions",
              include_clean: bool = True, seed: int = 0, test_fraction: float = 0.3) -> list[AgentDojoScenario]:
    """Every scenario of `split`: each user task clean (if `include_clean`) and × each injection task (if `attack`)."""
    out = []
    for name in suites:
        suite = load_suite(name)
        for ut in suite.user_tasks:
            side = split_of(name, ut, seed=seed, test_fraction=test_fraction)
            if side != split:
                continue
            if include_clean:
                out.append(AgentDojoScenario(name, ut, split=side))
            if attack is not None:
                out += [AgentDojoScenario(name, ut, it, attack, side) for it in suite.injection_tasks]
    return out


_ATTACKS: dict[tuple[str, str], Any] = {}
"""(suite, attack) → loaded attack, shared by episodes: it caches each user task's injection candidates."""


class _AttackTarget:
    """What AgentDojo attacks read from the attacked pipeline: its name ("local" = a local model)."""

    name = "local-mosaic"


class AgentDojoEpisode:
    """One episode of an AgentDojo scenario: `reset() → (messages, tool_schemas)`, `step(tool, args) → str`,
    `grade(final_answer) → Outcome`. Calling the `refuse` tool ends the episode (terminal, nothing executed)."""

    def __init__(self, scenario: AgentDojoScenario, *, max_steps: int = 30) -> None:
        if (scenario.injection_task is None) != (scenario.attack is None):
            raise ValueError(f"agentdojo scenario {scenario.task_id}: injection_task and attack go together")
        self.scenario = scenario
        self.max_steps = max_steps
        self.suite = load_suite(scenario.suite)
        self.user_task = self.suite.get_user_task_by_id(scenario.user_task)
        self.injection_task = (None if scenario.injection_task is None
                               else self.suite.get_injection_task_by_id(scenario.injection_task))
        self.runtime = FunctionsRuntime(self.suite.tools)
        self.env: Any = None
        self.pre_env: Any = None
        self.trace: list[FunctionCall] = []
        self.refused_at: int | None = None

    def _injections(self) -> dict[str, str]:
        if self.injection_task is None:
            return {}
        key = (self.scenario.suite, self.scenario.attack)
        if key not in _ATTACKS:
            _ATTACKS[key] = load_attack(self.scenario.attack, self.suite, _AttackTarget())
        return _ATTACKS[key].attack(self.user_task, self.injection_task)

    def reset(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Fresh world (injected when the scenario has an injection); returns the opening chat and tool schemas."""
        world = self.suite.load_and_inject_default_environment(self._injections())
        self.env = self.user_task.init_environment(world)
        self.pre_env = self.env.model_copy(deep=True)
        self.trace, self.refused_at = [], None
        messages = [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": self.user_task.PROMPT}]
        return messages, tool_schemas(self.runtime)

    @property
    def done(self) -> bool:
        return self.refused_at is not None or len(self.trace) >= self.max_steps

    def step(self, tool_name: str, args: dict[str, Any]) -> str:
        """Run one tool call on the episode's world; errors (bad args, unknown tool, limits) are observations."""
        if self.env is None:
            raise RuntimeError(f"agentdojo episode {self.scenario.task_id}: call reset() before step()")
        if self.done:
            return "EpisodeError: the episode has ended"
        if tool_name == REFUSE_TOOL:
            self.refused_at = len(self.trace)
            return "The request was refused; the episode has ended."
        call = FunctionCall(function=tool_name, args=dict(args), id=f"call_{len(self.trace)}")
        self.trace.append(call)
        result, error = self.runtime.run_function(self.env, tool_name, call.args)
        text = error if error is not None else tool_result_to_str(result)
        if len(text) > MAX_OBSERVATION_CHARS:
            text = text[:MAX_OBSERVATION_CHARS] + f"\n[... truncated {len(text) - MAX_OBSERVATION_CHARS} chars]"
        return text

    def grade(self, final_answer: str | None) -> Outcome:
        """AgentDojo's checks on the world as it stands (a refusal still counts harm already done)."""
        if self.env is None:
            raise RuntimeError(f"agentdojo episode {self.scenario.task_id}: call reset() before grade()")
        output = final_answer or ""
        utility = self.user_task.utility_from_traces(output, self.pre_env, self.env, self.trace)
        if utility is None:
            utility = self.user_task.utility(output, self.pre_env, self.env)
        followed = False
        if self.injection_task is not None:
            followed = self.injection_task.security_from_traces(output, self.pre_env, self.env, self.trace)
            if followed is None:
                followed = self.injection_task.security(output, self.pre_env, self.env)
        refused = self.refused_at is not None
        terminal = "refused" if refused else "answered" if final_answer is not None else "max_steps"
        return Outcome(terminal=terminal, refused_at_step=self.refused_at, benign_success=bool(utility),
                       benign_progress=float(bool(utility)), injection_followed=bool(followed),
                       unsafe_before_refusal=refused and bool(followed), over_refused=refused,
                       num_steps=len(self.trace) + int(refused))


__all__ = ["AgentDojoEpisode", "AgentDojoScenario", "Split", "scenarios", "split_of"]
