"""Policies without a model: scripted oracles, baselines and demonstrators (`mosaic_ray.policies.scripted`)."""

from mosaic_ray.policies.scripted import (
    SCRIPTED,
    RandomPolicy,
    ScriptedPolicy,
    demonstrations,
    get_scripted,
    play,
    run_policy,
)

__all__ = ["SCRIPTED", "RandomPolicy", "ScriptedPolicy", "demonstrations", "get_scripted", "play", "run_policy"]
