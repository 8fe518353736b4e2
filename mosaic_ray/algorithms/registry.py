"""The registry of the learner's losses by name: each loss module registers its loss with `register_loss`, and
importing `mosaic_ray.algorithms` imports every loss module (look losses up there, with `get_loss`)."""

from __future__ import annotations

from collections.abc import Callable

LOSSES: dict[str, Callable] = {}


def register_loss(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make a loss callable by name (`LearnerConfig.algorithm`)."""
    def deco(fn: Callable) -> Callable:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered (by {LOSSES[name].__module__})")
        LOSSES[name] = fn
        return fn
    return deco
