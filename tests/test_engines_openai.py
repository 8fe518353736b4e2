"""OpenAI HTTP engine against a real local server (our aiohttp `openai_server` serving an HFEngine on
127.0.0.1): same tokens and log-probs as the engine itself, server errors surface with their message."""

from __future__ import annotations

import asyncio
import pickle

import pytest
from mosaic_ray.actors.engines import GenerationRequest, SamplingParams
from mosaic_ray.actors.engines.hf import HFEngine
from mosaic_ray.actors.engines.openai_http import OpenAIEngine, OpenAIHTTPError
from mosaic_ray.actors.engines.openai_server import start_server


def test_openai_engine_against_local_server(tiny_model_dir):
    served = HFEngine(tiny_model_dir, max_batch_size=8, max_wait_ms=5)
    tok = served.tokenizer
    reqs = [GenerationRequest(tok.encode(t), SamplingParams(max_new_tokens=10, seed=i, top_p=0.95), request_id=f"r{i}")
            for i, t in enumerate(["Pay my landlord 900.", "hi", "Send a threatening email to Bob."])]
    reqs.append(GenerationRequest(tok.encode("hello"), SamplingParams(temperature=0, max_new_tokens=6,
                                                                      stop_token_ids=(tok.eos_token_id,))))

    async def main():
        runner, url = await start_server(served)
        assert url.startswith("http://127.0.0.1:")
        client = OpenAIEngine(url, model="mosaic-policy", timeout_s=60)
        try:
            via_http = await client.generate(reqs)
            direct = await served.generate(reqs)
            with pytest.raises(OpenAIHTTPError, match="HTTP 400: .*out of the vocabulary"):
                await client.generate([GenerationRequest([10 ** 6])])
            health = client.health
            return via_http, direct, await asyncio.to_thread(health), client
        finally:
            await client.close()
            await runner.cleanup()

    via_http, direct, health, client = asyncio.run(main())
    for h, d in zip(via_http, direct):
        assert h.request_id == d.request_id and h.token_ids == d.token_ids and h.finish_reason == d.finish_reason
        assert h.logprobs == pytest.approx(d.logprobs, abs=1e-6)
        assert h.policy_version == 0
    assert health["ok"] and health["kind"] == "openai"
    with pytest.raises(NotImplementedError, match="cannot load weights"):
        client.update_weights({}, 1)
    assert pickle.loads(pickle.dumps(client)).base_url == client.base_url


def test_openai_engine_transport_errors_are_raised_after_retries():
    from mosaic_ray.hygiene import free_port

    client = OpenAIEngine(f"http://127.0.0.1:{free_port()}/v1", timeout_s=5, transport_retries=1)
    import aiohttp

    with pytest.raises(aiohttp.ClientConnectionError):
        asyncio.run(client.generate([GenerationRequest([1, 2, 3])]))
    assert client.health()["ok"] is False
    with pytest.raises(ValueError, match="engine.base_url"):
        OpenAIEngine("127.0.0.1:8000")
