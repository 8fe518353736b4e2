"""A minimal OpenAI-compatible completions server in front of any `Engine` (aiohttp, binds 127.0.0.1).

It exists so the OpenAI HTTP engine is tested against a real server, and so a local policy can be served to
tools that speak the OpenAI API. It implements the part of the API our client uses, with vLLM's extensions:

- `POST /v1/completions`: `prompt` as token ids (a list of ints, or a list of such lists) or text (tokenized
  with the engine's tokenizer); `max_tokens`, `temperature`, `top_p`, `seed`, `stop_token_ids`, `logprobs`.
  Each choice carries `token_ids` (vLLM's `return_token_ids`), `logprobs.tokens` as `token_id:N` (vLLM's
  `return_tokens_as_token_ids`), `logprobs.token_logprobs`, `finish_reason`; the response carries the
  engine's `policy_version`.
- `GET /v1/models`, `GET /health`.

Errors are JSON `{"error": {"message", "type"}}` with status 400 for a bad request.

Run standalone: `python -m mosaic_ray.actors.engines.openai_server --model DIR --port 8000`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from aiohttp import web

from .base import Engine, GenerationRequest, SamplingParams

__all__ = ["build_app", "start_server"]


class BadRequest(ValueError):
    pass


def _prompts(body: dict, engine: Engine) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        tokenizer = getattr(engine, "tokenizer", None)
        if tokenizer is None:
            raise BadRequest("prompt: text prompts need an engine with a tokenizer; send token ids")
        return [tokenizer.encode(prompt, add_special_tokens=False)]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    if (isinstance(prompt, list) and prompt
            and all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt)):
        return prompt
    raise BadRequest("prompt: expected text, a non-empty list of token ids, or a list of such lists")


def _sampling(body: dict) -> SamplingParams:
    try:
        return SamplingParams(temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                              max_new_tokens=int(body.get("max_tokens", 16)),
                              stop_token_ids=tuple(body.get("stop_token_ids") or ()), seed=body.get("seed"),
                              ignore_eos=bool(body.get("ignore_eos", False)))
    except (TypeError, ValueError) as exc:
        raise BadRequest(str(exc)) from None


def build_app(engine: Engine, model_name: str = "mosaic-policy") -> web.Application:
    async def completions(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise BadRequest("body: expected a JSON object")
            if int(body.get("n", 1)) != 1:
                raise BadRequest("n: only n=1 is supported (send one request per sample)")
            prompts, sampling = _prompts(body, engine), _sampling(body)
            reqs = [GenerationRequest(p, sampling, request_id=f"cmpl-{i}") for i, p in enumerate(prompts)]
            outs = await engine.generate(reqs)
        except (BadRequest, ValueError) as exc:
            return web.json_response({"error": {"message": str(exc), "type": "invalid_request_error"}}, status=400)
        tokenizer = getattr(engine, "tokenizer", None)
        choices = []
        for i, out in enumerate(outs):
            text = tokenizer.decode(out.token_ids) if tokenizer is not None else ""
            choices.append({"index": i, "text": text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                            "logprobs": {"tokens": [f"token_id:{t}" for t in out.token_ids],
                                         "token_logprobs": out.logprobs}})
        usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": sum(len(o.token_ids) for o in outs)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return web.json_response({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                                  "created": int(time.time()), "model": body.get("model", model_name),
                                  "choices": choices, "usage": usage,
                                  "policy_version": min((o.policy_version for o in outs), default=engine.version)})

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model_name, "object": "model"}]})

    async def health(_: web.Request) -> web.Response:
        return web.json_response(engine.health())

    app = web.Application(client_max_size=64 << 20)
    app.add_routes([web.post("/v1/completions", completions), web.get("/v1/models", models),
                    web.get("/health", health)])
    return app


async def start_server(engine: Engine, host: str = "127.0.0.1", port: int = 0,
                       model_name: str = "mosaic-policy") -> tuple[web.AppRunner, str]:
    """Serve `engine` on the running loop; returns (runner, base_url ending in /v1). `await runner.cleanup()`."""
    runner = web.AppRunner(build_app(engine, model_name), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if port == 0 else port
    return runner, f"http://{host}:{bound}/v1"


def main(argv: list[str] | None = None) -> None:
    from mosaic_ray.config import EngineConfig

    from . import make_engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF model directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)

    async def run() -> None:
        engine = make_engine(EngineConfig(kind="hf"), args.model, dtype=args.dtype)
        runner, url = await start_server(engine, args.host, args.port)
        print(f"serving {args.model} at {url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(run())


if __name__ == "__main__":
    main()
