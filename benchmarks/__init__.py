"""External benchmark adapters and throughput benchmarks (installed as `mosaic_ray.benchmarks`)."""
