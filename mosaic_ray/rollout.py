"""One rollout episode at the token level, without Ray: task → fresh sandbox → MOSAIC loop → TrajectoryRecord.

Token in, token out. The prompt is rendered once (`render_prompt_ids`); after that the sequence only grows:

    prompt_ids | gen turn 0 (mask 1) | [eos if cut] + observation ids (mask 0) | gen turn 1 (mask 1) | …

The generated ids are kept exactly as sampled (never re-tokenized from text), so `behavior_logprobs` line up
one-to-one with the tokens the learner scores. The text of a turn is decoded only to drive the sandbox
(`Episode.step`). Observation ids come from `observation_ids`, which reproduces what the chat template puts
between two assistant turns, including the next assistant header.

Limits: `Episode` ends the loop at a terminal action or `max_steps`; the runner itself enforces
`max_episode_tokens` on the real token count (prompt + completion) — each turn may generate at most what is
left of the budget, and an observation that would overflow it ends the episode as `max_tokens`. The episode's
own word-count estimate of the budget is switched off so only one count decides.

Failures: an exception from the policy (engine) or the sandbox fails that episode only. The record keeps the
tokens produced so far (consistent lengths), `error="Type: message"`, and an `Outcome` with terminal `error`.

The policy is any async callable `TurnRequest -> completion` where the completion has `token_ids`,
`logprobs`, `finish_reason` and `policy_version` (an engine `Completion` fits). `ScriptedTurns` adapts a
scripted policy: it encodes each planned turn's text to ids (+ eos) with log-prob 0.0. The Ray rollout worker
(`mosaic_ray.actors.rollout_worker`) is a thin async wrapper around `run_episode`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mosaic_ray import protocol
from mosaic_ray.config import ProtocolConfig
from mosaic_ray.episode import DEFAULT_PROTOCOL, Episode
from mosaic_ray.scenarios.tasks import Task
from mosaic_ray.schema import Timings, TrajectoryRecord, make_group_id, make_traj_id
from mosaic_ray.types import Outcome

__all__ = [
    "EpisodeReceipt",
    "EpisodeSpec",
    "Policy",
    "PolicyFactory",
    "ScriptedCompletion",
    "ScriptedTurns",
    "TurnCompletion",
    "TurnRequest",
    "episode_specs",
    "failed_record",
    "load_tokenizer",
    "run_episode",
    "run_episodes",
    "scripted_factory",
    "turn_seed",
]

_NO_BUDGET = 2**31 - 1


@dataclass(frozen=True)
class EpisodeReceipt:
    """What a rollout worker returns for an episode it delivered straight to the pair builder: enough for the
    fleet's exactly-once book-keeping and the driver's progress, none of the trajectory itself."""

    traj_id: str
    group_id: str
    policy_version: int
    failed: bool
    """The episode ended in an error (its record is a failure record)."""

    @classmethod
    def of(cls, rec: TrajectoryRecord) -> EpisodeReceipt:
        return cls(rec.traj_id, rec.group_id, rec.policy_version, rec.error is not None)


@dataclass(frozen=True)
class EpisodeSpec:
    """One unit of rollout work: sample `sample_idx` of `task` in `iteration` of `run_id`.

    The trajectory id is derived from these fields, so a retried spec yields the same id (idempotent writes)."""

    task: Task
    run_id: str
    iteration: int
    sample_idx: int
    policy_version: int = 0
    """The version the caller expects; the record carries the version the engine reports."""
    temperature: float | None = None
    """Sampling temperature override for this episode (None = the engine config's; 0 = greedy)."""
    enqueued_at: float = 0.0
    """`time.time()` when the spec was queued (0 = unknown), for `timings.queued_s`."""
    attempt: int = 0
    """How many times this spec was re-queued after its worker died."""

    @property
    def traj_id(self) -> str:
        return make_traj_id(self.run_id, self.iteration, self.task.task_id, self.sample_idx)

    @property
    def group_id(self) -> str:
        return make_group_id(self.run_id, self.iteration, self.task.task_id)


def episode_specs(tasks: Iterable[Task], *, group_size: int, run_id: str, iteration: int, policy_version: int = 0,
                  temperature: float | None = None) -> list[EpisodeSpec]:
    """G specs per task (sample_idx 0..G-1), task order kept, all stamped with the same enqueue time."""
    if group_size < 1:
        raise ValueError(f"episode_specs: group_size must be >= 1, got {group_size}")
    now = time.time()
    return [EpisodeSpec(t, run_id, iteration, i, policy_version, temperature, now)
            for t in tasks for i in range(group_size)]


@dataclass(frozen=True)
class TurnRequest:
    """What the runner asks the policy for: continue `prompt_ids` by at most `max_new_tokens`."""

    prompt_ids: list[int]
    max_new_tokens: int
    seed: int
    """Deterministic per (trajectory, turn): a retried episode samples the same tokens from the same weights."""
    session_id: str
    """The trajectory id (engine routers keep a session on one engine for prefix reuse)."""
    request_id: str
    temperature: float | None = None


class TurnCompletion(Protocol):
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int


Policy = Callable[[TurnRequest], Awaitable[TurnCompletion]]
PolicyFactory = Callable[[EpisodeSpec], Policy]
"""Gives the policy for one episode (a shared engine adapter, or a fresh per-episode scripted plan)."""


def turn_seed(traj_id: str, turn: int) -> int:
    return zlib.crc32(f"{traj_id}#{turn}".encode())


# --------------------------------------------------------------------------------------------- scripted


@dataclass(frozen=True)
class ScriptedCompletion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int


class ScriptedTurns:
    """A scripted policy (`mosaic_ray.policies.scripted`) as a token-level policy for one episode.

    Each call returns the next planned turn encoded to ids plus eos, log-probs 0.0 (a scripted turn has no
    sampling distribution). A turn longer than `max_new_tokens` is cut there with finish_reason "length",
    as an engine would. When the plan runs out without a terminal action the turn is a final answer (as
    `scripted.play` does). `delay_s` sleeps before each turn to stand in for generation latency in tests and
    benchmarks of the fleet (episodes then overlap the way engine-bound ones do).
    """

    def __init__(self, policy: Any, task: Task, tokenizer: Any, *, family: str = "hermes", policy_version: int = 0,
                 delay_s: float = 0.0):
        from mosaic_ray.policies.scripted import render

        self._texts = [render(turn, family) for turn in policy.plan(task)]
        self._end = render(("end", None, None, None, "Done."), family)
        self._tokenizer = tokenizer
        self._version = policy_version
        self._delay_s = delay_s
        self._turn = 0

    async def __call__(self, request: TurnRequest) -> ScriptedCompletion:
        if self._delay_s > 0:
            await asyncio.sleep(self._delay_s)
        text = self._texts[self._turn] if self._turn < len(self._texts) else self._end
        self._turn += 1
        ids = list(self._tokenizer.encode(text, add_special_tokens=False)) + [self._tokenizer.eos_token_id]
        reason = "stop"
        if len(ids) > request.max_new_tokens:
            ids, reason = ids[:request.max_new_tokens], "length"
        return ScriptedCompletion(ids, [0.0] * len(ids), reason, self._version)


def scripted_factory(name_or_policy: Any, tokenizer: Any, *, family: str = "hermes",
                     delay_s: float = 0.0) -> PolicyFactory:
    """PolicyFactory for a scripted policy given by name (`safe`, `naive`, `over_refuse`, `random`) or object."""
    from mosaic_ray.policies.scripted import get_scripted

    policy = get_scripted(name_or_policy) if isinstance(name_or_policy, str) else name_or_policy
    return lambda spec: ScriptedTurns(policy, spec.task, tokenizer, family=family,
                                      policy_version=spec.policy_version, delay_s=delay_s)


def load_tokenizer(model_dir: str, chat_template: str | None = None) -> Any:
    """The HF tokenizer of a resolved local model directory (`mosaic_ray.models.source.resolve_model`), with
    `model.chat_template` set on it when the config names one (`mosaic_ray.protocol.templates`)."""
    from transformers import AutoTokenizer

    return protocol.apply_chat_template(AutoTokenizer.from_pretrained(model_dir), chat_template)


# ----------------------------------------------------------------------------------------------- runner


def _error_outcome(ep: Episode | None, error: str) -> Outcome:
    """Grade what ran (steps, tokens) but mark the episode as an infrastructure failure."""
    out = Outcome(terminal="error")
    if ep is not None:
        try:
            out = ep.outcome()
        except Exception:  # noqa: BLE001 - the grade of a broken episode is best effort; the error matters
            out = Outcome(terminal="error", num_steps=len(ep.steps))
    out.terminal, out.error = "error", error
    return out


async def run_episode(spec: EpisodeSpec, policy: Policy, tokenizer: Any, *,
                      protocol_cfg: ProtocolConfig = DEFAULT_PROTOCOL, family: str = "hermes",
                      worker_id: str = "") -> TrajectoryRecord:
    """Play one episode of `spec.task` with `policy`; never raises for policy or sandbox errors (see module doc)."""
    start, t_start = time.time(), time.perf_counter()
    traj_id = spec.traj_id
    eos = tokenizer.eos_token_id
    budget = protocol_cfg.max_episode_tokens
    prompt_ids: list[int] = []
    completion: list[int] = []
    mask: list[int] = []
    logprobs: list[float] = []
    versions: list[int] = []
    generate_s = tools_s = 0.0
    ep: Episode | None = None
    error: str | None = None
    try:
        def count(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False))

        ep = Episode(spec.task, protocol_cfg=dataclasses.replace(protocol_cfg, max_episode_tokens=_NO_BUDGET),
                     family=family, count_tokens=count)
        prompt_ids = protocol.render_prompt_ids(tokenizer, ep.messages, ep.tool_schemas)
        turn = 0
        while not ep.done:
            room = budget - len(prompt_ids) - len(completion)
            if room <= 0:
                ep.terminal = "max_tokens"
                break
            request = TurnRequest(prompt_ids + completion, min(protocol_cfg.max_new_tokens, room),
                                  turn_seed(traj_id, turn), traj_id, f"{traj_id}#{turn}", spec.temperature)
            t0 = time.perf_counter()
            out = await policy(request)
            generate_s += time.perf_counter() - t0
            ids, lps = [int(t) for t in out.token_ids], [float(x) for x in out.logprobs]
            if len(ids) != len(lps):
                raise ValueError(f"turn {turn}: policy returned {len(ids)} token ids but {len(lps)} logprobs")
            if out.finish_reason in ("abort", "error"):
                raise RuntimeError(f"turn {turn}: generation ended with finish_reason={out.finish_reason!r}")
            completion += ids
            mask += [1] * len(ids)
            logprobs += lps
            versions.append(int(out.policy_version))
            t0 = time.perf_counter()
            replies = ep.step(protocol.assistant_text(tokenizer, ids), num_tokens=len(ids))
            if replies:
                # A turn cut by max_new_tokens has no eos; the template's turn end is added as a masked token.
                obs = ([] if ids and ids[-1] == eos else [eos]) + protocol.observation_ids(tokenizer, replies)
                if len(prompt_ids) + len(completion) + len(obs) >= budget:
                    ep.terminal = "max_tokens"
                else:
                    completion += obs
                    mask += [0] * len(obs)
                    logprobs += [0.0] * len(obs)
            tools_s += time.perf_counter() - t0
            turn += 1
        outcome = ep.outcome()
    except Exception as exc:  # noqa: BLE001 - one episode's failure is a value, never the worker's crash
        error = f"{type(exc).__name__}: {exc}"
        outcome = _error_outcome(ep, error)
    total = time.perf_counter() - t_start
    queued = max(0.0, start - spec.enqueued_at) if spec.enqueued_at else 0.0
    return TrajectoryRecord(
        traj_id=traj_id, run_id=spec.run_id, iteration=spec.iteration, task_id=spec.task.task_id,
        group_id=spec.group_id, sample_idx=spec.sample_idx, category=spec.task.category, domain=spec.task.domain,
        policy_version=min(versions) if versions else spec.policy_version, prompt_ids=prompt_ids,
        completion_ids=completion, loss_mask=mask, behavior_logprobs=logprobs,
        steps=list(ep.steps) if ep is not None else [], outcome=outcome,
        timings=Timings(queued_s=queued, generate_s=generate_s, tools_s=tools_s, total_s=total),
        worker_id=worker_id, error=error)


def failed_record(spec: EpisodeSpec, error: str, worker_id: str = "") -> TrajectoryRecord:
    """The record of an episode that could not run at all (e.g. it crashed its workers too often): empty
    tokens, terminal `error`, so the group stays complete and the failure is visible downstream."""
    return TrajectoryRecord(
        traj_id=spec.traj_id, run_id=spec.run_id, iteration=spec.iteration, task_id=spec.task.task_id,
        group_id=spec.group_id, sample_idx=spec.sample_idx, category=spec.task.category, domain=spec.task.domain,
        policy_version=spec.policy_version, prompt_ids=[], completion_ids=[], loss_mask=[], behavior_logprobs=[],
        steps=[], outcome=Outcome(terminal="error", error=error),
        timings=Timings(queued_s=max(0.0, time.time() - spec.enqueued_at) if spec.enqueued_at else 0.0),
        worker_id=worker_id, error=error)


async def run_episodes(specs: Sequence[EpisodeSpec], policy_for: PolicyFactory, tokenizer: Any, *,
                       concurrency: int = 32, protocol_cfg: ProtocolConfig = DEFAULT_PROTOCOL,
                       family: str = "hermes", worker_id: str = "") -> list[TrajectoryRecord]:
    """The plain in-process loop: every spec, at most `concurrency` at once; records in spec order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(spec: EpisodeSpec) -> TrajectoryRecord:
        async with gate:
            return await run_episode(spec, policy_for(spec), tokenizer, protocol_cfg=protocol_cfg, family=family,
                                     worker_id=worker_id)

    return list(await asyncio.gather(*(one(s) for s in specs)))
