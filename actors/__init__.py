"""Ray actors of MOSAIC-Ray (installed as `mosaic_ray.actors`): engines, rollout workers, the pair builder."""
