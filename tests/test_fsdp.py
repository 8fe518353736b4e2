"""FSDP2 (`fully_shard` over gloo, 2 CPU ranks) against one plain learner: the same update, shards that fit, and a
KL reference that is the warm start on every rank."""

from __future__ import annotations

import pytest
import torch
from mosaic_ray.learners import LearnerGroup
from test_learner import max_diff, random_batch

from mosaic_ray.algorithms.batch import PolicySample
from mosaic_ray.config import LearnerConfig

CFG = LearnerConfig(num_learners=0, lr=1e-3, micro_batch_tokens=10_000, kl_coef=0.05)
FSDP = LearnerConfig(**{**CFG.__dict__, "num_learners": 2, "strategy": "fsdp2", "micro_batch_tokens": 64,
                        "activation_checkpointing": True})


STEP_TOL = 1e-4
"""Weights after an Adam step (lr 1e-3) on 1 rank vs 2 FSDP2 ranks: the gradients are summed in another order,
and Adam's first step divides each by its own magnitude, so a near-zero component's rounding shows in the step. A
tenth of the step size: 1.25e-5 was seen on an AVX2 CPU (under 1e-5 on the CPU of earlier sessions)."""


def sft_batch(seed: int) -> list[PolicySample]:
    return [PolicySample(s.input_ids, s.loss_mask, s.old_logprobs, traj_id=s.traj_id) for s in random_batch(6, seed)]


@pytest.mark.slow
@pytest.mark.ray
def test_two_fsdp2_ranks_equal_one_learner_and_every_rank_keeps_the_warm_start_as_reference(tiny_model_dir,
                                                                                          ray_session):
    """Warm start (SFT) → reset_reference → one KL-regularised GRPO update, on 1 plain rank and on 2 FSDP2 ranks
    with activation checkpointing and gradient accumulation over 64-token micro-batches."""
    single = LearnerGroup(tiny_model_dir, CFG)
    double = LearnerGroup(tiny_model_dir, FSDP)
    try:
        assert max_diff(single.get_weights(), double.get_weights()) == 0.0   # sharded load == from the files
        for lg in (single, double):
            lg.sft_update(sft_batch(1), lr=1e-3)
            lg.reset_reference()
        warm = single.get_weights()
        assert max_diff(warm, double.get_weights()) < STEP_TOL
        for rank, ref in enumerate(double._all(lambda a: a.reference_weights, [(True,)] * 2)):
            assert max_diff(warm, ref) < STEP_TOL, f"rank {rank}: the KL reference is not the warm start"

        batch = random_batch(10, seed=10)
        m1, m2 = single.update(batch), double.update(batch)
        assert m2["learner/kl_ref"] == 0.0       # the first update after reset: reference == policy on every rank
        assert m1["learner/loss"] == pytest.approx(m2["learner/loss"], abs=1e-5)
        assert m1["learner/grad_norm"] == pytest.approx(m2["learner/grad_norm"], abs=1e-5)
        assert max_diff(single.get_weights(), double.get_weights()) < STEP_TOL

        from ray.util.placement_group import placement_group_table

        table = placement_group_table(double._pg)   # one bundle per rank, packed
        assert table["state"] == "CREATED" and table["strategy"] == "PACK" and len(table["bundles"]) == 2
        one, two = single.health()[0], double.health()
        assert [h["rank"] for h in two] == [0, 1]
        for h in two:   # each rank holds about half the parameters, and a reference sharded the same way
            assert h["param_bytes"] <= one["param_bytes"] / 2 + 64 * 1024
            assert h["reference_bytes"] == h["param_bytes"]
    finally:
        double.shutdown()


def test_a_one_rank_fsdp2_learner_loads_and_saves_like_a_plain_one(tiny_model_dir, tmp_path):
    """FSDP2 on one rank (meta-device build, sharded load from safetensors): same weights, same logprobs, and a
    checkpoint whose reference restores on a plain learner."""
    from safetensors.torch import load_file

    plain = LearnerGroup(tiny_model_dir, CFG)
    sharded = LearnerGroup(tiny_model_dir, LearnerConfig(**{**CFG.__dict__, "strategy": "fsdp2"}))
    try:
        batch = random_batch(3, seed=5)
        assert max_diff(plain.get_weights(), sharded.get_weights()) == 0.0
        for a, b in zip(plain.compute_logprobs(batch), sharded.compute_logprobs(batch)):
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
        sharded.update(batch)
        sharded.save(str(tmp_path / "ck"))
        ref = load_file(tmp_path / "ck" / "trainer_state" / "reference.safetensors")
        base = load_file(f"{tiny_model_dir}/model.safetensors")
        assert ref.keys() == base.keys() and all(torch.equal(ref[k], base[k]) for k in ref)
        plain.restore(str(tmp_path / "ck"))
        assert max_diff(plain.get_weights(), sharded.get_weights()) == 0.0
    finally:
        sharded.shutdown()


def test_loading_names_the_missing_tensor(tiny_model_dir, tmp_path):
    import shutil

    from mosaic_ray.learners.learner import Learner
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, broken / "model.safetensors", {"format": "pt"})
    with pytest.raises(KeyError, match="model.norm.weight"):
        Learner(str(broken), CFG)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Learner(str(broken), CFG)


def test_the_gpu_check_says_skipped_without_a_gpu():
    import subprocess
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/gpu/test_learner_gpu.py runs the check itself")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    done = subprocess.run([str(script)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "skipped: no GPU" in done.stdout, done.stdout + done.stderr


def test_the_gpu_check_verdict_fails_on_a_loss_mismatch_or_unsharded_ranks():
    from mosaic_ray.benchmarks.gpu_check import verdict

    rank0 = {"unsharded_loss_fp32": 5.0, "unsharded_loss_bf16": 5.01, "fsdp2_loss": 5.02, "loss_after": 4.9,
             "step_s": 0.1, "tokens_per_s": 1e5, "peak_gpu_bytes": 2**30, "param_shard_bytes": 270e6, "params": 135e6}
    rank1 = {**rank0, "param_shard_bytes": 270e6}
    assert verdict([rank0, rank1], 2, 2e-2, bf16=True)["ok"]
    assert not verdict([{**rank0, "fsdp2_loss": 5.5}, rank1], 2, 2e-2, bf16=True)["ok"]
    assert not verdict([rank0, {**rank1, "param_shard_bytes": 540e6}], 2, 2e-2, bf16=True)["ok"]   # not sharded
    assert not verdict([{**rank0, "loss_after": 5.1}, rank1], 2, 2e-2, bf16=True)["ok"]   # steps did not learn


@pytest.mark.slow
def test_the_gpu_check_passes_on_cpu_ranks(tiny_model_dir):
    """The check's own logic (spawned ranks, unsharded reference, verdict) over gloo in fp32, 2 CPU ranks."""
    from mosaic_ray.benchmarks.gpu_check import main

    assert main(["--device", "cpu", "--model", tiny_model_dir, "--ranks", "2", "--seq", "32", "--batch", "4",
                 "--steps", "2"]) == 0
