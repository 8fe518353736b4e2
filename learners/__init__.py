"""The learner group (installed as `mosaic_ray.learners`): distributed learners, weight sync, checkpoints."""
