"""The learner group (installed as `mosaic_ray.learners`): distributed learners, weight sync, checkpoints."""

from mosaic_ray.learners.group import LearnerGroup
from mosaic_ray.learners.learner import Learner

__all__ = ["Learner", "LearnerGroup"]
