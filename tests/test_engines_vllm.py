"""vLLM vs HF parity of sampled-token log-probs on the tiny model, before and after a weight update
(fp32 within 1e-4, bf16 within 1e-2). Needs vLLM and a CUDA GPU; skipped with the reason otherwise."""

from __future__ import annotations

import asyncio

import pytest
import torch
from mosaic_ray.actors.engines import GenerationRequest, SamplingParams

TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}


def _require_vllm_gpu() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        pytest.skip("vLLM is not installed (pip install 'mosaic-ray[vllm]', GPU nodes only); the HF engine is "
                    "tested on CPU instead")
    if not torch.cuda.is_available():
        pytest.skip("vLLM parity needs a CUDA GPU; torch sees none here")


def _teacher_forced(model, prompt, completion) -> torch.Tensor:
    ids = torch.tensor([prompt + completion], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    tgt = torch.tensor(completion, device=model.device)[:, None]
    return (logits.gather(-1, tgt).squeeze(-1) - logits.logsumexp(-1)).cpu()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vllm_logprobs_match_hf_before_and_after_update(request, dtype):
    _require_vllm_gpu()  # before building the model, so the skip is instant
    tiny_model_dir = request.getfixturevalue("tiny_model_dir")
    from mosaic_ray.actors.engines.hf import torch_dtype
    from mosaic_ray.actors.engines.vllm import VLLMEngine
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch_dtype(dtype)).cuda().eval()
    prompts = [tok.encode(t) for t in ["Pay my landlord 900.", "hi", "Send a threatening email to Bob.", "ok"]]
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=32, seed=i)) for i, p in enumerate(prompts)]

    async def main():
        engine = VLLMEngine(tiny_model_dir, dtype=dtype, gpu_memory_utilization=0.3, max_model_len=1024,
                            enforce_eager=True, weight_transfer_backend=None)
        try:
            before = await engine.generate(reqs)
            with torch.no_grad():
                gen = torch.Generator(device="cuda").manual_seed(0)
                for p in hf.parameters():
                    p.add_(torch.randn(p.shape, generator=gen, device="cuda", dtype=p.dtype) * 0.3)
            await engine.update_weights_async({k: v.detach() for k, v in hf.state_dict().items()}, version=1)
            after = await engine.generate(reqs)
            return before, after
        finally:
            await engine.close()

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch_dtype(dtype)).cuda().eval()
    before, after = asyncio.run(main())
    tol = TOLERANCE[dtype]
    for p, out in zip(prompts, before):
        assert out.policy_version == 0
        diff = (torch.tensor(out.logprobs) - _teacher_forced(original, p, out.token_ids)).abs().max().item()
        assert diff <= tol, f"before update, {dtype}: max |Δlogp| {diff:.2e} > {tol}"
    for p, out in zip(prompts, after):
        assert out.policy_version == 1
        diff = (torch.tensor(out.logprobs) - _teacher_forced(hf, p, out.token_ids)).abs().max().item()
        assert diff <= tol, f"after update, {dtype}: max |Δlogp| {diff:.2e} > {tol}"
