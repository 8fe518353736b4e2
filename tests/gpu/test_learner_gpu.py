"""GPU-only: a bf16 FSDP2 learner step on one GPU, and the prepared GPU check (skipped on CPU machines, with the
reason)."""

from __future__ import annotations

import pytest
import torch

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs a CUDA GPU (FSDP2 + NCCL + bf16 path); CPU machines run the gloo tests "
                                      "in test_fsdp.py instead")


@needs_gpu
def test_fsdp2_bf16_step_on_one_gpu(tiny_model_dir):
    from mosaic_ray.benchmarks.learner_throughput import main

    result = main(["--model", tiny_model_dir, "--device", "cuda", "--strategy", "fsdp2", "--bf16", "--steps", "2",
                   "--rounds", "1", "--no-sync"])
    assert result["learner_tokens_per_s"] > 0 and result["peak_gpu_gib"] > 0


@needs_gpu
def test_gpu_check_passes_on_the_tiny_model(tiny_model_dir):
    from mosaic_ray.benchmarks.gpu_check import main

    assert main(["--model", tiny_model_dir, "--seq", "64", "--batch", "8", "--steps", "3"]) == 0
