"""GPU-only: a bf16 FSDP2 learner step on one GPU (skipped on CPU machines, with the reason)."""

from __future__ import annotations

import pytest
import torch


def test_fsdp2_bf16_step_on_one_gpu(tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (FSDP2 + NCCL + bf16 path); CPU machines run the gloo/DDP tests instead")
    from mosaic_ray.benchmarks.learner_throughput import main

    result = main(["--model", tiny_model_dir, "--device", "cuda", "--strategy", "fsdp2", "--bf16", "--steps", "2",
                   "--rounds", "1", "--no-sync"])
    assert result["learner_tokens_per_s"] > 0 and result["peak_gpu_gib"] > 0
