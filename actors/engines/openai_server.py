"""A minimal OpenAI-compatible server in front of any `Engine` (aiohttp, binds 127.0.0.1).

It exists so the OpenAI HTTP engine is tested against a real server, and so a local policy can be served to
tools that speak the OpenAI API. It implements the part of the API our clients use, with vLLM's extensions:

- `POST /v1/completions`: `prompt` as token ids (a list of ints, or a list of such lists) or text (tokenized
  with the engine's tokenizer); `max_tokens`, `temperature`, `top_p`, `seed`, `stop_token_ids`, `logprobs`.
  Each choice carries `token_ids` (vLLM's `return_token_ids`), `logprobs.tokens` as `token_id:N` (vLLM's
  `return_tokens_as_token_ids`), `logprobs.token_logprobs`, `finish_reason`; the response carries the
  engine's `policy_version`.
- `POST /v1/chat/completions`: `messages`, optional `tools` (OpenAI function format), `max_tokens`,
  `temperature` (default 0 = greedy), `top_p`, `seed`. Two modes:
  - *chat* (no `AgentProtocol`): the messages and tools go through the tokenizer's chat template and
    `message.content` is the decoded text (an LLM judge, or any OpenAI client, against a local model);
  - *agent* (an `AgentProtocol`): one MOSAIC turn. The MOSAIC system prompt comes first, the `refuse` tool is
    added to the client's tools, and the parsed turn is answered OpenAI-style: a tool call or a refusal as
    `message.tool_calls` (finish_reason `tool_calls`; a refusal is a call of `refuse`), a final answer as
    `message.content`, a format error as the raw text in `message.content`. `message.mosaic` = {think,
    safety_thoughts, raw, action, error} carries the plan and the safety check for clients that want them.
- `GET /v1/models`, `GET /health`.

Errors are JSON `{"error": {"message", "type"}}` with status 400 for a bad request; the message names the field.
`OpenAIService` holds the logic apart from any HTTP framework: `build_app` (aiohttp) and the Ray Serve app
(`mosaic_ray.actors.agent_service`) both hand it (method, path, body).

Run standalone (chat mode): `python -m mosaic_ray.actors.engines.openai_server --model DIR --port 8000`.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web

from mosaic_ray import protocol
from mosaic_ray.types import ParsedTurn

from .base import Completion, Engine, GenerationRequest, SamplingParams

if TYPE_CHECKING:
    from mosaic_ray.config import MosaicConfig

__all__ = ["AgentProtocol", "BadRequest", "OpenAIService", "agent_messages", "agent_reply", "build_app",
           "start_server"]

DEFAULT_CHAT_MAX_TOKENS = 256
"""`max_tokens` of a chat-mode request that sets none (agent mode uses the protocol's turn budget)."""

_ROLES = ("system", "user", "assistant", "tool")
_MOSAIC_FIELDS = ("raw", "think", "safety_thoughts")
"""Fields of an assistant message's `mosaic` extra that history rendering reads back."""


class BadRequest(ValueError):
    """A request the server cannot answer (HTTP 400); the message names the field."""


@dataclass(frozen=True)
class AgentProtocol:
    """How agent mode writes the prompt and reads the turn: the protocol the policy was trained with."""

    system_prompt: Literal["compact", "full"] = "compact"
    """`protocol.system_prompt` of the run."""
    family: str = "hermes"
    """`model.family`: the tool-call syntax the turn is parsed with."""
    max_new_tokens: int = 96
    """`protocol.max_new_tokens`: the most one turn may generate (a client's `max_tokens` may only lower it)."""

    @classmethod
    def from_config(cls, cfg: MosaicConfig) -> AgentProtocol:
        return cls(cfg.protocol.system_prompt, cfg.model.family, cfg.protocol.max_new_tokens)


# ----------------------------------------------------------------------------------- /v1/completions


def _prompts(body: dict, tokenizer: Any) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
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


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ------------------------------------------------------------------------- /v1/chat/completions: request


def _number(body: dict, key: str, default: Any, *, minimum: float, integer: bool = False) -> Any:
    """`body[key]` checked as a JSON number (an integer when `integer`) >= minimum; `default` when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise BadRequest(f"{key}: expected {'an integer' if integer else 'a number'}, got {value!r:.60}")
    if value < minimum:
        raise BadRequest(f"{key}: must be >= {minimum}, got {value!r}")
    return value


def _chat_sampling(body: dict, default_max_tokens: int, cap: int | None = None) -> SamplingParams:
    """Sampling of a chat request: greedy unless `temperature` is set; `max_tokens` capped at `cap` when given."""
    if body.get("stream"):
        raise BadRequest("stream: streaming is not supported; send stream: false")
    if body.get("stop"):
        raise BadRequest("stop: stop strings are not supported; a turn ends at the model's end-of-turn token")
    if body.get("n", 1) != 1:
        raise BadRequest("n: only n=1 is supported (send one request per sample)")
    if body.get("tool_choice", "auto") not in ("auto", None):
        raise BadRequest(f"tool_choice: only 'auto' is supported, got {body['tool_choice']!r:.60}")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, default_max_tokens, minimum=1, integer=True)
    return SamplingParams(temperature=float(_number(body, "temperature", 0.0, minimum=0)),
                          top_p=float(_number(body, "top_p", 1.0, minimum=0)),
                          max_new_tokens=max_tokens if cap is None else min(max_tokens, cap),
                          seed=_number(body, "seed", None, minimum=0, integer=True))


def _text(value: Any, where: str) -> str | None:
    """Message content as text: a string, null, or a list of `{"type": "text", "text": …}` parts (joined)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise BadRequest(f"{where}: expected a string or a list of {{'type': 'text', 'text': str}} parts")


def _optional_str(m: dict, key: str, where: str) -> str | None:
    value = m.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{where}.{key}: expected a string, got {value!r:.60}")
    return value


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` → `[{"id", "name", "arguments": dict}]`."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"{where}: expected a list of {{'type': 'function', 'function': {{name, arguments}}}}")
    calls = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"{at}.function.name: expected {{'type': 'function', 'function': {{'name': str, "
                             f"'arguments': JSON string}}}}")
        arguments = fn.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as exc:
                raise BadRequest(f"{at}.function.arguments: not valid JSON ({exc})") from None
        if not isinstance(arguments, dict):
            raise BadRequest(f"{at}.function.arguments: expected a JSON object, got {arguments!r:.60}")
        calls.append({"id": _optional_str(call, "id", at) or "", "name": fn["name"], "arguments": arguments})
    return calls


def _message(m: Any, where: str) -> dict[str, Any]:
    """One checked, normalised message: role, content (str, or None for an assistant that only calls tools),
    and per role `tool_calls` + `mosaic` (assistant) or `tool_call_id` + `name` (tool)."""
    if not isinstance(m, dict):
        raise BadRequest(f"{where}: expected an object with role and content, got {type(m).__name__}")
    role = "system" if m.get("role") == "developer" else m.get("role")
    if role not in _ROLES:
        raise BadRequest(f"{where}.role: expected one of {', '.join(_ROLES)}, got {m.get('role')!r:.40}")
    out: dict[str, Any] = {"role": role, "content": _text(m.get("content"), f"{where}.content")}
    if role == "assistant":
        out["tool_calls"] = _tool_calls(m.get("tool_calls"), f"{where}.tool_calls")
        mosaic = m.get("mosaic") or {}
        if not isinstance(mosaic, dict):
            raise BadRequest(f"{where}.mosaic: expected an object, got {mosaic!r:.60}")
        out["mosaic"] = {k: _optional_str(mosaic, k, f"{where}.mosaic") for k in _MOSAIC_FIELDS}
        if not out["content"] and not out["tool_calls"] and not out["mosaic"]["raw"]:
            raise BadRequest(f"{where}.content: an assistant message needs content or tool_calls")
    elif out["content"] is None:
        raise BadRequest(f"{where}.content: expected a string")
    if role == "tool":
        out["tool_call_id"] = _optional_str(m, "tool_call_id", where)
        out["name"] = _optional_str(m, "name", where)
    return out


def _chat_messages(body: dict) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: expected a non-empty list of {role, content} objects")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def _chat_tools(body: dict) -> list[dict[str, Any]]:
    """`tools` checked as OpenAI function specs (the chat template reads name, description and properties)."""
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequest("tools: expected a list of {'type': 'function', 'function': {...}} objects")
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise BadRequest(f"{at}: expected {{'type': 'function', 'function': {{name, description, parameters}}}}")
        fn = tool["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"{at}.function.name: expected a non-empty string")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise BadRequest(f"{at}.function.description: expected a string")
        parameters = fn.get("parameters") or {"type": "object", "properties": {}}
        properties = parameters.get("properties", {}) if isinstance(parameters, dict) else None
        if not isinstance(properties, dict) or not all(isinstance(p, dict) for p in properties.values()):
            raise BadRequest(f"{at}.function.parameters: expected a JSON schema object whose properties are "
                             f"schemas, got {parameters!r:.100}")
        out.append({"type": "function", "function": {"name": fn["name"], "description": description,
                                                     "parameters": parameters}})
    names = [t["function"]["name"] for t in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BadRequest(f"tools: duplicate tool names {duplicates}")
    return out


# --------------------------------------------------------------------------- chat mode and agent mode


def _template_message(m: dict[str, Any]) -> dict[str, Any]:
    """A checked message in the shape HF chat templates read (tool-call arguments as a dict)."""
    out: dict[str, Any] = {"role": m["role"], "content": m["content"] or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c["id"], "type": "function",
                              "function": {"name": c["name"], "arguments": c["arguments"]}} for c in m["tool_calls"]]
    if m.get("name"):
        out["name"] = m["name"]
    return out


def _turn_text(m: dict[str, Any], family: str, where: str) -> str:
    """An assistant message as the turn the policy writes: `mosaic.raw` when the client sent it back, else the
    turn rebuilt with `format_turn` (one call, or the answer). Content that is not a well-formed answer (a
    format error's raw text sent back without `mosaic`) is kept verbatim: it is what the policy wrote."""
    mosaic = m["mosaic"]
    if mosaic["raw"]:
        return mosaic["raw"]
    think, safety, calls = mosaic["think"] or "", mosaic["safety_thoughts"], m["tool_calls"]
    if len(calls) > 1:
        raise BadRequest(f"{where}.tool_calls: a MOSAIC turn makes exactly one call, got {len(calls)}")
    if calls:
        try:
            return protocol.format_turn(think=think, safety_thoughts=safety, tool=calls[0]["name"],
                                        arguments=calls[0]["arguments"], family=family)
        except ValueError as exc:
            raise BadRequest(f"{where}.tool_calls[0]: cannot be written as a MOSAIC turn ({exc})") from None
    try:
        return protocol.format_turn(think=think, safety_thoughts=safety, answer=m["content"], family=family)
    except ValueError:
        return m["content"]


def agent_messages(messages: list[dict[str, Any]], agent: AgentProtocol) -> list[dict[str, Any]]:
    """Checked client messages → the MOSAIC conversation the policy was trained on.

    One system message: the MOSAIC prompt, built as `Episode` builds it, then the client's system text (merged,
    because chat templates read only the first system message). Assistant turns are re-rendered into turn text
    (`_turn_text`); tool messages become `{"role": "tool", "name", "content"}`, the name looked up from the
    assistant call their `tool_call_id` answers."""
    system = [protocol.system_prompt(agent.system_prompt, agent.family)] + [m["content"] for m in messages
                                                                            if m["role"] == "system"]
    out: list[dict[str, Any]] = [{"role": "system", "content": "\n\n".join(system)}]
    names: dict[str, str] = {}
    for i, m in enumerate(messages):
        if m["role"] == "user":
            out.append({"role": "user", "content": m["content"]})
        elif m["role"] == "assistant":
            names.update((c["id"], c["name"]) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": _turn_text(m, agent.family, f"messages[{i}]")})
        elif m["role"] == "tool":
            name = names.get(m["tool_call_id"] or "") or m["name"] or "tool"
            out.append({"role": "tool", "name": name, "content": m["content"]})
    return out


def agent_reply(parsed: ParsedTurn, raw: str, finish_reason: str) -> tuple[dict[str, Any], str]:
    """(OpenAI assistant message, finish_reason) of one parsed MOSAIC turn: a call or a refusal as `tool_calls`,
    an answer as content, a format error as the raw text; `mosaic` keeps the plan, the check and the verdict."""
    message: dict[str, Any] = {
        "role": "assistant", "content": None,
        "mosaic": {"think": parsed.think, "safety_thoughts": parsed.safety_thoughts, "raw": raw,
                   "action": parsed.kind, "error": parsed.error}}
    if parsed.kind in ("tool_call", "refuse"):
        message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                  "function": {"name": parsed.tool,
                                               "arguments": json.dumps(parsed.arguments, ensure_ascii=False)}}]
        return message, "tool_calls"
    message["content"] = parsed.answer if parsed.kind == "answer" else raw
    return message, finish_reason


# ------------------------------------------------------------------------------------------- service


class OpenAIService:
    """The OpenAI-compatible endpoints over one engine, apart from any HTTP framework (see the module doc).

    `agent=None` serves chat mode on `/v1/chat/completions`; an `AgentProtocol` serves agent mode.
    """

    def __init__(self, engine: Engine, model_name: str = "mosaic-policy", *, tokenizer: Any = None,
                 agent: AgentProtocol | None = None):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
        self.agent = agent
        self._posts: dict[str, Callable[[dict], Awaitable[dict]]] = {
            "/v1/completions": self.completions, "/v1/chat/completions": self.chat_completions}
        self._gets: dict[str, Callable[[], dict]] = {"/v1/models": self.models, "/health": self.health}

    async def handle(self, method: str, path: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of one request: 200, 400 for a bad request (or one the engine rejects), 404."""
        try:
            if method == "GET" and path in self._gets:
                return 200, self._gets[path]()
            if method == "POST" and path in self._posts:
                return 200, await self._posts[path](_json_object(raw))
        except ValueError as exc:  # BadRequest, and the engine's own request checks
            return 400, {"error": {"message": str(exc), "type": "invalid_request_error"}}
        known = ", ".join([*(f"POST {p}" for p in self._posts), *(f"GET {p}" for p in self._gets)])
        return 404, {"error": {"message": f"{method} {path}: no such endpoint (known: {known})",
                               "type": "not_found_error"}}

    async def completions(self, body: dict) -> dict[str, Any]:
        if int(body.get("n", 1)) != 1:
            raise BadRequest("n: only n=1 is supported (send one request per sample)")
        prompts, sampling = _prompts(body, self.tokenizer), _sampling(body)
        reqs = [GenerationRequest(p, sampling, request_id=f"cmpl-{i}") for i, p in enumerate(prompts)]
        outs = await self.engine.generate(reqs)
        choices = []
        for i, out in enumerate(outs):
            text = self.tokenizer.decode(out.token_ids) if self.tokenizer is not None else ""
            choices.append({"index": i, "text": text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                            "logprobs": {"tokens": [f"token_id:{t}" for t in out.token_ids],
                                         "token_logprobs": out.logprobs}})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model", self.model_name), "choices": choices,
                "usage": _usage(sum(map(len, prompts)), sum(len(o.token_ids) for o in outs)),
                "policy_version": min((o.policy_version for o in outs), default=self.engine.version)}

    async def chat_completions(self, body: dict) -> dict[str, Any]:
        if self.tokenizer is None:
            raise BadRequest("messages: chat needs an engine with a tokenizer (its chat template renders them)")
        messages, tools = _chat_messages(body), _chat_tools(body)
        if self.agent is None:
            sampling = _chat_sampling(body, DEFAULT_CHAT_MAX_TOKENS)
            prompt = protocol.render_prompt_ids(self.tokenizer, [_template_message(m) for m in messages], tools)
        else:
            tools = protocol.tool_schemas(tools)
            sampling = _chat_sampling(body, self.agent.max_new_tokens, cap=self.agent.max_new_tokens)
            prompt = protocol.render_prompt_ids(self.tokenizer, agent_messages(messages, self.agent), tools)
        [out] = await self.engine.generate([GenerationRequest(prompt, sampling, request_id="chat-0")])
        message, finish_reason = self._reply(out, tools)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", self.model_name),
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
                "usage": _usage(len(prompt), len(out.token_ids)), "policy_version": out.policy_version}

    def _reply(self, out: Completion, tools: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        text = protocol.assistant_text(self.tokenizer, out.token_ids)
        if self.agent is None:
            return {"role": "assistant", "content": text}, out.finish_reason
        parsed = protocol.parse_turn(text, family=self.agent.family, tools=protocol.tools_by_name(tools))
        return agent_reply(parsed, text, out.finish_reason)

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model"}]}

    def health(self) -> dict[str, Any]:
        return self.engine.health()


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"body: not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object")
    return body


# ------------------------------------------------------------------------------------------- aiohttp


def build_app(engine: Engine, model_name: str = "mosaic-policy", *, agent: AgentProtocol | None = None,
              api_key: str | None = None) -> web.Application:
    """`api_key`: when given, every request must carry `Authorization: Bearer <api_key>` (else 401; the key is
    compared in constant time and never echoed or logged)."""
    service = OpenAIService(engine, model_name, agent=agent)
    expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def route(request: web.Request) -> web.Response:
        if expected is not None and not hmac.compare_digest(request.headers.get("Authorization", "").encode(),
                                                             expected):
            return web.json_response({"error": {"message": "missing or wrong API key (Authorization: Bearer …)",
                                                "type": "authentication_error"}}, status=401)
        status, payload = await service.handle(request.method, request.path, await request.read())
        return web.json_response(payload, status=status)

    app = web.Application(client_max_size=64 << 20)
    app.add_routes([web.post("/v1/completions", route), web.post("/v1/chat/completions", route),
                    web.get("/v1/models", route), web.get("/health", route)])
    return app


async def start_server(engine: Engine, host: str = "127.0.0.1", port: int = 0, model_name: str = "mosaic-policy",
                       *, agent: AgentProtocol | None = None, api_key: str | None = None
                       ) -> tuple[web.AppRunner, str]:
    """Serve `engine` on the running loop; returns (runner, base_url ending in /v1). `await runner.cleanup()`."""
    runner = web.AppRunner(build_app(engine, model_name, agent=agent, api_key=api_key), access_log=None)
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
    ap.add_argument("--api-key-env", default=None, metavar="NAME",
                    help="require `Authorization: Bearer $NAME` on every request (the key is read from the "
                         "environment, never from the command line)")
    args = ap.parse_args(argv)
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            ap.error(f"--api-key-env {args.api_key_env}: that environment variable is not set")

    async def run() -> None:
        engine = make_engine(EngineConfig(kind="hf"), args.model, dtype=args.dtype)
        runner, url = await start_server(engine, args.host, args.port, api_key=api_key)
        print(f"serving {args.model} at {url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(run())


if __name__ == "__main__":
    main()
