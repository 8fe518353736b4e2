"""The inference-engine interface every backend implements (HF, vLLM, OpenAI-compatible HTTP).

Two planes, as in SkyRL's inference clients:

- **data plane**: `generate(requests) -> completions`. Rollout workers call it concurrently from many
  episodes; an engine batches what arrives together. A completion carries the generated ids, the
  log-probability of every generated id under the model's *raw* distribution (temperature 1, no top-p),
  the finish reason and the weights version that produced it. PPO ratios are computed against these
  log-probs, so they must equal a teacher-forced forward pass of the same weights.
- **control plane**: `update_weights(named tensors, version)`, `version`, `health()`, and the optional
  `pause()/resume()` (and `sleep()/wake_up()` on vLLM). Versions only move forward: an update whose version
  is not newer than the current one is rejected with `StaleWeightsError`, so a late message from an old
  learner step can never roll the policy back.

Weights always use plain Hugging Face parameter names (`model.layers.0.self_attn.q_proj.weight`), which is
what the learner emits.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch is heavy; only the HF/vLLM backends import it at run time
    import torch

FinishReason = Literal["stop", "length", "abort", "error"]
WeightsLike = Mapping[str, "torch.Tensor"] | Iterable[tuple[str, "torch.Tensor"]]
WeightMeta = Sequence[tuple[str, Sequence[int], str]]
"""`(HF name, shape, dtype name)` of each tensor of a bucketed update (`mosaic_ray.weight_transfer.Meta`)."""

__all__ = [
    "Completion",
    "Engine",
    "FinishReason",
    "GenerationRequest",
    "PauseMode",
    "SamplingParams",
    "StaleWeightsError",
    "WeightMeta",
    "WeightsLike",
    "check_version",
    "validate_request",
]


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled."""

    temperature: float = 1.0
    """0 = greedy (argmax); otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = all)."""
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    """Extra ids that end generation; the engine always also stops at the tokenizer's eos."""
    seed: int | None = None
    """Per-request seed: same seed + same prompt + same weights -> same tokens, batched or not."""
    ignore_eos: bool = False
    """Benchmarks only: do not stop at eos (stop_token_ids still stop), so every request generates exactly
    max_new_tokens and throughput comparisons do equal work."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature: must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p: must be in (0, 1], got {self.top_p!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens: must be >= 1, got {self.max_new_tokens!r}")
        # Lists from YAML/JSON would make the frozen dataclass unhashable; normalise to a tuple of ints.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt (already rendered and tokenized by the protocol) and how to continue it."""

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    session_id: str | None = None
    """Episode id: the router keeps a session on one engine, so its growing prompt reuses the prefix cache."""


@dataclass(frozen=True)
class Completion:
    """What an engine produced for one request."""

    request_id: str
    token_ids: list[int]
    """Generated ids, including the final eos/stop token when finish_reason == "stop"."""
    logprobs: list[float]
    """log p(token) under the raw (temperature-1, unfiltered) distribution, one per token id."""
    finish_reason: FinishReason
    policy_version: int
    """Weights version that produced every token of this completion."""


class StaleWeightsError(ValueError):
    """`update_weights` got a version that is not newer than the engine's current one."""


class PauseMode(enum.Enum):
    """What `pause()` does with generation that is already running (SkyRL's modes)."""

    WAIT = "wait"
    """Let running batches finish, start no new ones; queued requests wait for `resume()`."""
    ABORT = "abort"
    """Stop running batches at the next token; their rows return with finish_reason "abort" and the tokens
    generated so far. Queued requests wait for `resume()`."""


def validate_request(req: GenerationRequest, vocab_size: int | None = None) -> None:
    """Raise ValueError naming the request and the problem; called before a request joins a batch so one bad
    request fails alone instead of breaking its batch."""
    where = f"GenerationRequest(request_id={req.request_id!r})"
    if not isinstance(req.sampling, SamplingParams):
        raise TypeError(f"{where}.sampling: expected SamplingParams, got {type(req.sampling).__name__}")
    if not req.prompt_ids:
        raise ValueError(f"{where}.prompt_ids: empty prompt (render at least one token)")
    if vocab_size is not None:
        bad = [t for t in req.prompt_ids if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"{where}.prompt_ids: ids out of the vocabulary [0, {vocab_size}): {bad[:5]}")


def check_version(current: int, new: int) -> None:
    """Versions only move forward (see the module docstring)."""
    if not isinstance(new, int) or isinstance(new, bool):
        raise TypeError(f"update_weights: version must be an int, got {new!r}")
    if new <= current:
        raise StaleWeightsError(f"update_weights: version {new} is not newer than the engine's current version "
                                f"{current}; refusing to roll the policy back")


class Engine(ABC):
    """One policy server. Subclasses implement the data plane and the weight update; pause/resume and
    sleep/wake_up are optional control-plane verbs (the defaults raise NotImplementedError)."""

    # ------------------------------------------------------------------------------------ data plane

    @abstractmethod
    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Complete every request; the result is in request order. Safe to call concurrently."""

    # --------------------------------------------------------------------------------- control plane

    @abstractmethod
    def update_weights(self, weights: WeightsLike, version: int) -> None:
        """Load named tensors (plain HF names; a subset is allowed) as weights `version`.

        Raises StaleWeightsError when `version <= self.version`, ValueError on unknown names or shapes (before
        touching any weight). Generation already running finishes on the old weights first."""

    async def update_weights_async(self, weights: WeightsLike, version: int) -> None:
        """`update_weights` for callers on an event loop (engine actors): the default runs the blocking form in a
        thread so serving goes on meanwhile; engines whose update is itself async (vLLM) override this."""
        import asyncio

        await asyncio.to_thread(self.update_weights, weights, version)

    # Bucketed updates (what the driver's weight sync uses): begin → load every bucket → finish. `begin` drains (no
    # new rows are admitted, running ones finish on the old weights); nothing is sampled until `finish`, so no
    # completion ever comes from a half-loaded version. A `begin` with a newer version may supersede an update
    # that never finished (its sender died), and a `begin` of the same version restarts it (a push retried after
    # another engine died mid-way sends every bucket again): the engine stays held until some version is loaded
    # whole.

    async def begin_weight_update(self, version: int, meta: WeightMeta | None = None) -> None:
        """Drain and hold generation for an update to `version`. `meta` (`[(name, shape, dtype)]` of every tensor
        to come) is checked against the model first: ValueError on unknown names or shapes, nothing held."""
        raise NotImplementedError(f"{type(self).__name__} does not support bucketed weight updates")

    async def load_weight_bucket(self, weights: WeightsLike) -> None:
        """Load one bucket of the update begun by `begin_weight_update` (checked before any tensor is copied)."""
        raise NotImplementedError(f"{type(self).__name__} does not support bucketed weight updates")

    async def finish_weight_update(self, version: int) -> None:
        """Make `version` current and resume generation on it."""
        raise NotImplementedError(f"{type(self).__name__} does not support bucketed weight updates")

    @property
    @abstractmethod
    def version(self) -> int:
        """The weights version new generations will use (0 = as loaded)."""

    @abstractmethod
    def health(self) -> dict:
        """A small JSON-able status dict: at least `ok`, `kind`, `version`, `pending`, `running`."""

    async def pause(self, mode: PauseMode = PauseMode.WAIT) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support pause()")

    async def resume(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support resume()")

    async def sleep(self, level: int = 1) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support sleep() (vLLM only)")

    async def wake_up(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support wake_up() (vLLM only)")

    async def close(self) -> None:
        """Release background tasks and connections; the default has nothing to release."""
