"""OpenAI-compatible HTTP engine: evaluate a served model (vLLM `serve`, our `openai_server`, an API) through
the same `generate` interface. No weight updates: the server owns its weights.

Requests go to `POST {base_url}/completions` with the prompt as token ids (the protocol has already rendered
it), `logprobs: 0`, and vLLM's extensions `return_token_ids` / `return_tokens_as_token_ids` so the generated
ids come back exactly (re-tokenizing text would not round-trip). For raw log-probs a vLLM server must run with
`--logprobs-mode raw_logprobs`.

Only transport errors (connection refused/reset, timeouts) are retried; an HTTP 4xx/5xx is raised at once with
the server's message (SkyRL's rule). The client is picklable: `__getstate__` drops the live HTTP session.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Sequence
from typing import Any

from .base import Completion, Engine, GenerationRequest, WeightsLike, validate_request

__all__ = ["OpenAIEngine", "OpenAIHTTPError"]


class OpenAIHTTPError(RuntimeError):
    """The server answered with an error status; the message carries the server's own message."""


class OpenAIEngine(Engine):
    def __init__(self, base_url: str, *, model: str = "default", timeout_s: float = 600.0,
                 transport_retries: int = 2, api_key: str | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"engine.base_url: expected an http(s) URL ending in /v1, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.transport_retries = transport_retries
        self._api_key = api_key  # never logged or put in reprs
        self._last_version = 0
        self._session = None
        self._session_loop = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_session"] = state["_session_loop"] = None
        return state

    def __repr__(self) -> str:
        return f"OpenAIEngine(base_url={self.base_url!r}, model={self.model!r})"

    # ------------------------------------------------------------------------------------ data plane

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        for req in requests:
            validate_request(req)
        return list(await asyncio.gather(*(self._complete(r) for r in requests)))

    def _body(self, req: GenerationRequest) -> dict[str, Any]:
        s = req.sampling
        body = {"model": self.model, "prompt": list(req.prompt_ids), "max_tokens": s.max_new_tokens,
                "temperature": s.temperature, "top_p": s.top_p, "logprobs": 0, "n": 1,
                "return_token_ids": True, "return_tokens_as_token_ids": True, "skip_special_tokens": False}
        if s.seed is not None:
            body["seed"] = s.seed
        if s.ignore_eos:
            body["ignore_eos"] = True
        if s.stop_token_ids:
            body["stop_token_ids"] = list(s.stop_token_ids)
        return body

    async def _complete(self, req: GenerationRequest) -> Completion:
        data = await self._post("/completions", self._body(req))
        try:
            choice = data["choices"][0]
            token_ids = _token_ids(choice)
            logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise OpenAIHTTPError(f"{self.base_url}/completions: response without token ids and log-probs ({exc!r}); "
                                  "the server must support return_token_ids or return_tokens_as_token_ids") from None
        if len(logprobs) != len(token_ids):
            raise OpenAIHTTPError(f"{self.base_url}/completions: {len(token_ids)} token ids but {len(logprobs)} "
                                  "log-probs")
        version = int(data.get("policy_version", self._last_version))
        self._last_version = max(self._last_version, version)
        reason = choice.get("finish_reason")
        return Completion(req.request_id, token_ids, logprobs,
                          reason if reason in ("stop", "length", "abort") else "error", version)

    async def _post(self, path: str, body: dict) -> dict:
        import aiohttp

        session = self._get_session()
        for attempt in range(self.transport_retries + 1):
            try:
                async with session.post(self.base_url + path, json=body) as resp:
                    text = await resp.text()
                    if resp.status >= 400:
                        raise OpenAIHTTPError(f"POST {self.base_url}{path}: HTTP {resp.status}: {_message(text)}")
                    return json.loads(text)
            except (TimeoutError, aiohttp.ClientConnectionError):
                if attempt == self.transport_retries:
                    raise
                await asyncio.sleep(0.2 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _get_session(self):
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                                  headers=headers)
            self._session_loop = loop
        return self._session

    # --------------------------------------------------------------------------------- control plane

    def update_weights(self, weights: WeightsLike, version: int) -> None:
        raise NotImplementedError("OpenAIEngine serves a model behind HTTP and cannot load weights; use "
                                  "engine.kind: hf or vllm for training, and the OpenAI engine for evaluation")

    @property
    def version(self) -> int:
        """The newest `policy_version` a response reported (0 for servers that do not report one)."""
        return self._last_version

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as resp:
                ok = resp.status == 200
        except OSError as exc:
            return {"ok": False, "kind": "openai", "base_url": self.base_url, "error": repr(exc),
                    "version": self._last_version, "pending": 0, "running": 0}
        return {"ok": ok, "kind": "openai", "base_url": self.base_url, "version": self._last_version,
                "pending": 0, "running": 0}

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


def _token_ids(choice: dict) -> list[int]:
    if choice.get("token_ids") is not None:
        return [int(t) for t in choice["token_ids"]]
    return [int(str(t).removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]


def _message(text: str) -> str:
    try:
        body = json.loads(text)
        return str(body["error"]["message"]) if isinstance(body.get("error"), dict) else str(body)
    except (ValueError, AttributeError, KeyError):
        return text[:500]
