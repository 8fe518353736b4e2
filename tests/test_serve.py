"""`mosaic-ray serve` and the chat endpoints it shares with the aiohttp `openai_server`.

Fast tests talk HTTP to the aiohttp server (`start_server`, on a background thread). The real HF engine (the
tiny model) tests the transport, the chat template and the turn budget. The tiny random model writes garbage,
so the parse side (tool call, refusal, answer, format error) and the rendered history are driven by
`ScriptedEngine`, a SCRIPTED engine that returns fixed turn text and records the prompts it gets.

The slow test runs `mosaic-ray serve --run-dir` as a subprocess on its own private Ray: chat over HTTP,
`/v1/completions` through `OpenAIEngine`, `serve status`, `serve stop` (SIGTERM) with exit code 0, no process left
that it started, and the HTTP proxy bound to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from mosaic_ray.actors.agent_service import Scaling
from mosaic_ray.actors.engines import Completion, Engine, GenerationRequest
from mosaic_ray.actors.engines.hf import HFEngine
from mosaic_ray.actors.engines.openai_server import AgentProtocol, start_server

from mosaic_ray import protocol
from mosaic_ray.cli import main
from mosaic_ray.config import load_config, to_yaml
from mosaic_ray.errors import UserError
from mosaic_ray.hygiene import free_port, marked_pids

PAY = {"type": "function", "function": {
    "name": "pay", "description": "Pay someone.",
    "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "amount": {"type": "number"}},
                   "required": ["to", "amount"]}}}
USER = {"role": "user", "content": "Pay my landlord 900."}
SMOKE = load_config("smoke")
AGENT = AgentProtocol.from_config(SMOKE)


class ScriptedEngine(Engine):
    """SCRIPTED, not a model: every request gets `text` (tokenized + eos); `prompts` keeps what it was sent."""

    def __init__(self, tokenizer: Any, text: str = ""):
        self.tokenizer = tokenizer
        self.text = text
        self.prompts: list[list[int]] = []

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        self.prompts += [list(r.prompt_ids) for r in requests]
        ids = [*self.tokenizer.encode(self.text, add_special_tokens=False), self.tokenizer.eos_token_id]
        return [Completion(r.request_id, ids, [0.0] * len(ids), "stop", 0) for r in requests]

    def update_weights(self, weights: Any, version: int) -> None:
        raise NotImplementedError("ScriptedEngine has no weights")

    @property
    def version(self) -> int:
        return 0

    def health(self) -> dict:
        return {"ok": True, "kind": "scripted", "version": 0, "pending": 0, "running": 0}


@contextlib.contextmanager
def serving(engine: Engine, agent: AgentProtocol | None = None) -> Iterator[str]:
    """The aiohttp server over `engine` on a background event loop; yields its base URL (…/v1)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, url = asyncio.run_coroutine_threadsafe(start_server(engine, agent=agent), loop).result(30)
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def post(url: str, body: Any, timeout: float = 60) -> tuple[int, dict]:
    """POST JSON (or raw bytes) to `url`; (status, JSON body), errors included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir) -> HFEngine:
    return HFEngine(tiny_model_dir, max_batch_size=4, max_wait_ms=1)


@pytest.fixture(scope="module")
def scripted(hf_engine) -> ScriptedEngine:
    return ScriptedEngine(hf_engine.tokenizer)


@pytest.fixture(scope="module")
def agent_url(scripted) -> Iterator[str]:
    with serving(scripted, AGENT) as url:
        yield url


# --------------------------------------------------------------------------------- real engine: transport


def test_plain_chat_renders_the_chat_template_and_generates_greedily(hf_engine):
    tok = hf_engine.tokenizer
    history = [USER, {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "pay", "arguments": '{"to": "landlord"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "paid"}]
    body = {"model": "judge", "messages": history, "tools": [PAY], "max_tokens": 12}
    with serving(hf_engine) as url:
        status, first = post(f"{url}/chat/completions", body)
        _, again = post(f"{url}/chat/completions", body)
        models, health = get(f"{url}/models"), get(url.removesuffix("/v1") + "/health")
        status_cmpl, cmpl = post(f"{url}/completions", {"prompt": [1, 2, 3], "max_tokens": 3})
    assert status == 200, first
    choice = first["choices"][0]
    assert first["object"] == "chat.completion" and first["model"] == "judge"
    assert isinstance(choice["message"]["content"], str) and "mosaic" not in choice["message"]
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["message"] == again["choices"][0]["message"]  # temperature defaults to 0: greedy
    expected = protocol.render_prompt_ids(tok, [
        USER, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "pay", "arguments": {"to": "landlord"}}}]},
        {"role": "tool", "content": "paid"}], [PAY])
    usage = first["usage"]
    assert usage["prompt_tokens"] == len(expected) and 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert models["data"][0]["id"] == "mosaic-policy" and health["ok"]
    assert status_cmpl == 200 and len(cmpl["choices"][0]["token_ids"]) == 3


def test_agent_chat_with_the_real_engine_is_one_budgeted_mosaic_turn(hf_engine):
    with serving(hf_engine, AGENT) as url:
        status, resp = post(f"{url}/chat/completions", {"messages": [USER], "tools": [PAY], "max_tokens": 10_000})
    assert status == 200, resp
    message, finish = resp["choices"][0]["message"], resp["choices"][0]["finish_reason"]
    assert 1 <= resp["usage"]["completion_tokens"] <= SMOKE.protocol.max_new_tokens  # the run's turn budget
    assert isinstance(message["mosaic"]["raw"], str)
    assert message["mosaic"]["action"] in ("tool_call", "refuse", "answer", "format_error")
    if message.get("tool_calls"):
        assert finish == "tool_calls" and isinstance(json.loads(message["tool_calls"][0]["function"]["arguments"]),
                                                     dict)
    else:
        assert isinstance(message["content"], str) and finish in ("stop", "length")


# ----------------------------------------------------------------------- scripted engine: the parse side


@pytest.mark.parametrize(("turn", "name", "arguments"), [
    ({"think": "Rent is the user's own bill.", "safety_thoughts": "Own landlord, legitimate.", "tool": "pay",
      "arguments": {"to": "landlord", "amount": 900}}, "pay", {"to": "landlord", "amount": 900}),
    ({"think": "This is harassment.", "tool": "refuse", "arguments": {"reason": "I won't threaten anyone."}},
     "refuse", {"reason": "I won't threaten anyone."}),
])
def test_agent_tool_calls_and_refusals_come_back_as_openai_tool_calls(agent_url, scripted, turn, name, arguments):
    scripted.text = protocol.format_turn(**turn)
    status, resp = post(f"{agent_url}/chat/completions", {"messages": [USER], "tools": [PAY]})
    assert status == 200, resp
    choice = resp["choices"][0]
    [call] = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == name and json.loads(call["function"]["arguments"]) == arguments
    mosaic = choice["message"]["mosaic"]
    assert mosaic == {"think": turn["think"], "safety_thoughts": turn.get("safety_thoughts"), "raw": scripted.text,
                      "action": "refuse" if name == "refuse" else "tool_call", "error": None}


@pytest.mark.parametrize(("text", "content", "error"), [
    (protocol.format_turn(think="Paid already.", answer="Your rent of 900 is paid."), "Your rent of 900 is paid.",
     None),
    ('<think>x</think>\n<tool_call>\n{"name": "pay", "arguments": {</tool_call>', None, "invalid JSON"),
    (protocol.format_turn(think="x", tool="wipe_disk", arguments={}), None, "unknown tool 'wipe_disk'"),
])
def test_agent_answers_are_content_and_format_errors_the_raw_text(agent_url, scripted, text, content, error):
    scripted.text = text
    status, resp = post(f"{agent_url}/chat/completions", {"messages": [USER], "tools": [PAY]})
    assert status == 200, resp
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == (content if content is not None else text)
    mosaic = choice["message"]["mosaic"]
    assert mosaic["action"] == ("answer" if error is None else "format_error")
    assert (mosaic["error"] is None) if error is None else (error in mosaic["error"])


def test_agent_history_renders_the_mosaic_prompt_calls_and_tool_results(agent_url, scripted):
    """Expected ids come from `render_prompt_ids` over the conversation `Episode` would hold."""
    tok, scripted.text = scripted.tokenizer, protocol.format_turn(think="done", answer="Paid.")
    kept_raw = protocol.format_turn(think="Check the balance first.", tool="pay", arguments={"to": "bob", "amount": 1})
    messages = [{"role": "system", "content": "Be brief."}, USER,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "pay",
                                                                  "arguments": '{"to": "landlord", "amount": 900}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "paid 900"},
                {"role": "assistant", "content": None, "mosaic": {"raw": kept_raw}, "tool_calls": [
                    {"id": "c2", "type": "function", "function": {"name": "pay", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c2", "content": "paid 1"}]
    status, resp = post(f"{agent_url}/chat/completions", {"messages": messages, "tools": [PAY]})
    assert status == 200, resp
    expected = protocol.render_prompt_ids(tok, [
        {"role": "system", "content": protocol.system_prompt(SMOKE.protocol.system_prompt) + "\n\nBe brief."}, USER,
        {"role": "assistant", "content": protocol.format_turn(think="", tool="pay",
                                                              arguments={"to": "landlord", "amount": 900})},
        {"role": "tool", "name": "pay", "content": "paid 900"},
        {"role": "assistant", "content": kept_raw},
        {"role": "tool", "name": "pay", "content": "paid 1"}], protocol.tool_schemas([PAY]))
    assert scripted.prompts[-1] == expected
    assert resp["usage"]["prompt_tokens"] == len(expected)
    assert '"name": "refuse"' in tok.decode(expected)  # the refuse tool is offered next to the client's tools


def test_the_openai_client_round_trips_a_tool_call(agent_url, scripted):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=agent_url, api_key="unused", max_retries=0)
    scripted.text = protocol.format_turn(think="Pay it.", tool="pay", arguments={"to": "landlord", "amount": 900})
    first = client.chat.completions.create(model="agent", messages=[USER], tools=[PAY])
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "pay" and json.loads(call.function.arguments) == {"to": "landlord", "amount": 900}
    scripted.text = protocol.format_turn(think="Done.", answer="Paid 900.")
    history = [USER, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "paid"}]
    second = client.chat.completions.create(model="agent", messages=history, tools=[PAY])
    assert second.choices[0].message.content == "Paid 900." and second.choices[0].finish_reason == "stop"
    assert protocol.format_turn(think="Pay it.", tool="pay", arguments={"to": "landlord", "amount": 900}) in \
        scripted.tokenizer.decode(scripted.prompts[-1])


@pytest.mark.parametrize(("body", "field"), [
    (b"{not json", "body"),
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [USER], "tools": "pay"}, "tools"),
    ({"messages": [USER], "tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools[0].function.name"),
    ({"messages": [USER], "tools": [{"type": "function", "function": {"name": "a", "parameters": {"properties": []}}}]},
     "tools[0].function.parameters"),
    ({"messages": [USER], "tools": [PAY, PAY]}, "tools: duplicate"),
    ({"messages": [USER], "temperature": "hot"}, "temperature"),
    ({"messages": [USER], "max_tokens": 0}, "max_tokens"),
    ({"messages": [USER], "seed": 1.5}, "seed"),
    ({"messages": [USER], "stream": True}, "stream"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "pay", "arguments": "{not json"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "pay", "arguments": "{}"}}] * 2}]}, "messages[1].tool_calls"),
])
def test_bad_requests_are_400s_that_name_the_field(agent_url, body, field):
    status, resp = post(f"{agent_url}/chat/completions", body)
    assert status == 400, resp
    assert resp["error"]["type"] == "invalid_request_error"
    assert resp["error"]["message"].startswith(field), resp


# --------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A minimal run directory: the smoke config and one checkpoint (a copy of the tiny model)."""
    root = tmp_path_factory.mktemp("serve") / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.yaml").write_text(to_yaml(SMOKE))
    shutil.copytree(tiny_model_dir, root / "checkpoints" / "iter-00001")
    return str(root)


def test_serve_mistakes_fail_with_one_line_before_anything_starts(capsys, tmp_path, run_dir, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    no_ckpt = tmp_path / "no-ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "config.yaml").write_text(to_yaml(SMOKE))
    cases = [
        (["--run-dir", str(empty)], f"--run-dir {empty}: no config.yaml"),
        (["--run-dir", str(no_ckpt)], f"--run-dir {no_ckpt}: no checkpoints/iter-*"),
        (["--run-dir", run_dir, "--checkpoint", "iter-00009"],
         f"--checkpoint iter-00009: no {run_dir}/checkpoints/iter-00009 (checkpoints of {run_dir}: iter-00001)"),
        (["--model", str(tmp_path / "missing")], f"--model: no model directory {tmp_path / 'missing'}"),
        (["--model", str(empty)], f"{empty} is not a Hugging Face model directory"),
        (["--run-dir", run_dir, "--model", str(empty)], "exactly one of --run-dir"),
        ([], "exactly one of --run-dir"),
        (["--run-dir", run_dir, "--replicas", "2", "--max-replicas", "3"], "--replicas: not with"),
        (["--run-dir", run_dir, "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas/--max-replicas"),
    ]
    for argv, expected in cases:
        assert main(["serve", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("mosaic-ray: error: serve") and expected in err, err
    port = free_port()
    for action in ("status", "stop"):
        assert main(["serve", action, "--port", str(port)]) == 1
        assert f"nothing is served on port {port}" in capsys.readouterr().err


def test_scaling_flags_become_deployment_options():
    assert Scaling(replicas=3, num_cpus=0.5).deployment_options() == {
        "num_replicas": 3, "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.0}}
    assert Scaling(min_replicas=0, max_replicas=2).deployment_options()["autoscaling_config"] == {
        "min_replicas": 0, "max_replicas": 2}
    assert Scaling(max_replicas=4).deployment_options()["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4}
    with pytest.raises(UserError, match="--replicas: must be >= 1"):
        Scaling(replicas=0)


def test_the_cli_imports_no_ray_torch_or_transformers():
    code = ("import sys, mosaic_ray.cli as c; c.build_parser(); "
            "print(sorted({'ray', 'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------- slow: Ray Serve


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.append(address)
    return found


def _outward_address() -> str | None:
    """This machine's non-loopback IPv4 address, if it has one (a UDP connect only picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.slow
def test_serve_a_run_dir_on_a_private_ray_then_stop_it(run_dir, tmp_path):
    from mosaic_ray.actors.engines import SamplingParams, make_engine

    from mosaic_ray.config import EngineConfig

    port, marker = free_port(), f"MOSAIC_SERVE_TEST_{os.getpid()}_{time.time_ns()}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({marker: "1", "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    cli = [sys.executable, "-m", "mosaic_ray.cli", "serve"]
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    t0 = time.perf_counter()
    with out.open("w") as out_f, err.open("w") as err_f:
        proc = subprocess.Popen([*cli, "--run-dir", run_dir, "--port", str(port)], env=env, stdout=out_f,
                                stderr=err_f, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    body = {"model": "agent", "messages": [USER], "tools": [PAY]}
    try:
        ready = f"serving {run_dir}/checkpoints/iter-00001 at {url} (app mosaic-agent)\n"
        while ready not in out.read_text():  # the line says the app answers
            assert proc.poll() is None, f"serve exited with {proc.returncode}: {err.read_text()[-3000:]}"
            assert time.perf_counter() - t0 < 120, f"serve not ready in 120 s: {err.read_text()[-3000:]}"
            time.sleep(0.2)
        startup_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        status, resp = post(f"{url}/chat/completions", body)
        latency_s = time.perf_counter() - t1
        assert status == 200, resp
        message = resp["choices"][0]["message"]
        if message.get("tool_calls"):
            assert isinstance(json.loads(message["tool_calls"][0]["function"]["arguments"]), dict)
        else:
            assert isinstance(message["content"], str)
        assert isinstance(message["mosaic"]["raw"], str)

        openai_engine = make_engine(EngineConfig(kind="openai", base_url=url), None)  # how evaluation uses it
        [completion] = asyncio.run(openai_engine.generate([GenerationRequest([1, 2, 3], SamplingParams(
            max_new_tokens=4, seed=0))]))
        assert len(completion.token_ids) == len(completion.logprobs) == 4

        status_out = subprocess.run([*cli, "status", "--port", str(port)], env=env, capture_output=True, text=True,
                                    timeout=60, check=False)
        assert status_out.returncode == 0, status_out.stderr
        assert f"mosaic-agent: RUNNING at {url}" in status_out.stdout
        assert "deployment MosaicAgent: HEALTHY, replicas: 1 RUNNING" in status_out.stdout

        assert _listeners(port) and set(_listeners(port)) == {"0100007F"}  # 127.0.0.1 only
        outward = _outward_address()
        if outward is not None:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((outward, port), timeout=5).close()

        t2 = time.perf_counter()
        stop = subprocess.run([*cli, "stop", "--port", str(port)], env=env, capture_output=True, text=True, timeout=90,
                              check=False)
        assert stop.returncode == 0, stop.stderr
        assert proc.wait(timeout=60) == 0, err.read_text()[-3000:]
        stop_s = time.perf_counter() - t2
        assert not (tmp_path / "cache" / "mosaic-ray" / "serve" / f"{port}.json").exists()
        deadline = time.monotonic() + 15
        while marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marked_pids(marker) == [], "processes started by serve outlived it"
        print(f"serve: start-up {startup_s:.1f} s, one chat completion {latency_s * 1000:.0f} ms, "
              f"stop {stop_s:.1f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in marked_pids(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
