"""`mosaic-ray serve`: a trained MOSAIC agent behind an OpenAI-compatible API, on Ray Serve.

The Serve application `mosaic-agent` has one deployment, `MosaicAgent`. Each replica loads the model once (an HF
or vLLM engine) and answers HTTP through `OpenAIService`, the same code as the aiohttp `openai_server`:

- `POST /v1/chat/completions`: agent mode, one MOSAIC turn per request, returned as `tool_calls` (a `refuse`
  call for a refusal) or `content`, with the plan and safety check in `message.mosaic`;
- `POST /v1/completions`: raw token-id completions, what `OpenAIEngine` sends, so `engine.kind: openai` with
  `engine.base_url` at the served app evaluates through it;
- `GET /v1/models`, `GET /health`.

The CLI process owns the app. It joins the Ray cluster of `--address` / `RAY_ADDRESS`, or starts a private
local one; starts Serve with its HTTP proxy on `--host:--port` (127.0.0.1 by default; a cluster that already runs
Serve keeps its own proxy address, and start-up fails when nothing answers on the one asked for); runs the app;
and stays in the foreground until SIGINT or SIGTERM. Then it deletes the app, shuts Serve down when no other app
is left on the cluster, and stops the Ray instance it started. The state file
`$XDG_CACHE_HOME/mosaic-ray/serve/<port>.json` (default `~/.cache/...`) lets `serve status` and `serve stop` find
it; it is removed on a clean stop. On a multi-node cluster the model directory must be readable from every node.

Ray, torch and transformers are imported inside the handlers, so `mosaic-ray --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mosaic_ray.errors import UserError

if TYPE_CHECKING:
    from ray.serve import Application
    from starlette.requests import Request
    from starlette.responses import Response

    from mosaic_ray.config import MosaicConfig

__all__ = ["APP_NAME", "AgentServer", "Scaling", "ServeState", "ServeTarget", "build_application", "register",
           "resolve_target", "state_path"]

APP_NAME = "mosaic-agent"
DEPLOYMENT_NAME = "MosaicAgent"
REACHABLE_TIMEOUT_S = 15.0
"""How long start-up waits for the HTTP proxy to answer once the app runs."""


# ------------------------------------------------------------------------------------------ what to serve


@dataclass(frozen=True)
class ServeTarget:
    """A model directory and the config whose protocol (system prompt, family, turn budget) it was trained with."""

    model_dir: str
    model_name: str
    """The id `/v1/models` reports: `RUN/iter-N` for a run's checkpoint, else the model directory's name."""
    cfg: MosaicConfig


def resolve_target(*, run_dir: str | None, checkpoint: str | None, model: str | None,
                   config: str | None) -> ServeTarget:
    """The checked flags of `serve`; UserError names the flag and the path before anything starts."""
    if (run_dir is None) == (model is None):
        raise UserError("serve: give exactly one of --run-dir DIR (a training run: its config and newest "
                        "checkpoint) or --model DIR (a model directory, with --config PRESET)")
    if run_dir is not None:
        if config is not None:
            raise UserError(f"serve --config {config}: not with --run-dir (the run's own config.yaml is used)")
        cfg, model_dir = _run_checkpoint(run_dir, checkpoint)
        name = f"{Path(run_dir).resolve().name}/{Path(model_dir).name}"
    else:
        if checkpoint is not None:
            raise UserError(f"serve --checkpoint {checkpoint}: only with --run-dir")
        from mosaic_ray.config import load_config

        cfg, model_dir, name = load_config(config or "tiny-cpu"), model, Path(model).resolve().name
    flag = "--run-dir" if run_dir is not None else "--model"
    if not Path(model_dir).is_dir():
        raise UserError(f"serve {flag}: no model directory {model_dir}")
    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"serve {flag}: {model_dir} is not a Hugging Face model directory (no config.json)")
    return ServeTarget(str(Path(model_dir).resolve()), name, cfg)


def _run_checkpoint(run_dir: str, checkpoint: str | None) -> tuple[MosaicConfig, str]:
    """(config, checkpoint dir) of a local run: `--checkpoint iter-N`, else the newest."""
    from mosaic_ray.evaluation import latest_checkpoint

    try:
        cfg, newest = latest_checkpoint(run_dir)
    except UserError:
        raise
    except ValueError as exc:
        raise UserError(f"serve {exc}") from None
    if checkpoint is None:
        return cfg, newest
    chosen = Path(run_dir) / "checkpoints" / checkpoint
    if not chosen.is_dir():
        known = ", ".join(sorted(p.name for p in chosen.parent.glob("iter-*")))
        raise UserError(f"serve --checkpoint {checkpoint}: no {chosen} (checkpoints of {run_dir}: {known})")
    return cfg, str(chosen)


@dataclass(frozen=True)
class Scaling:
    """How many replicas serve the app and what each reserves: a fixed count, or autoscaling between bounds."""

    replicas: int | None = None
    """Fixed replica count (default 1 when no bound is given)."""
    min_replicas: int | None = None
    """Autoscaling lower bound (0 scales to zero when idle; default 1 when only the upper bound is given)."""
    max_replicas: int | None = None
    """Autoscaling upper bound (default: the lower bound, at least 1)."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.replicas is not None and self.autoscaling:
            raise UserError("serve --replicas: not with --min-replicas/--max-replicas (a fixed count, or "
                            "autoscaling between bounds)")
        if self.replicas is not None and self.replicas < 1:
            raise UserError(f"serve --replicas: must be >= 1, got {self.replicas}")
        if self.autoscaling and not 0 <= self.lower <= self.upper >= 1:
            raise UserError(f"serve --min-replicas/--max-replicas: need 0 <= min <= max and max >= 1, got "
                            f"{self.min_replicas}/{self.max_replicas}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise UserError(f"serve --num-cpus/--num-gpus: must be >= 0, got {self.num_cpus}/{self.num_gpus}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def lower(self) -> int:
        """Fewest replicas (autoscaling)."""
        return 1 if self.min_replicas is None else self.min_replicas

    @property
    def upper(self) -> int:
        """Most replicas: the fixed count, or the autoscaling upper bound."""
        if not self.autoscaling:
            return self.replicas or 1
        return max(self.lower, 1) if self.max_replicas is None else self.max_replicas

    def deployment_options(self) -> dict[str, Any]:
        scale: dict[str, Any] = ({"autoscaling_config": {"min_replicas": self.lower, "max_replicas": self.upper}}
                                 if self.autoscaling else {"num_replicas": self.upper})
        return {**scale, "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}


# ------------------------------------------------------------------------------------------ the deployment


class AgentServer:
    """The `MosaicAgent` deployment body: one engine per replica, HTTP answered by `OpenAIService` in agent mode.

    A plain class, wrapped by `serve.deployment` in `build_application`, so importing this module needs no Ray."""

    def __init__(self, target: ServeTarget, engine_kind: Literal["hf", "vllm"]):
        from mosaic_ray.hygiene import set_torch_threads
        from mosaic_ray.rollout import load_tokenizer

        from .engines import make_engine
        from .engines.openai_server import AgentProtocol, OpenAIService

        cfg = target.cfg
        set_torch_threads(cfg.engine.cpu_threads)
        self.engine = make_engine(dataclasses.replace(cfg.engine, kind=engine_kind), target.model_dir,
                                  dtype=cfg.model.dtype)
        self.service = OpenAIService(self.engine, target.model_name, tokenizer=load_tokenizer(target.model_dir, cfg.model.chat_template),
                                     agent=AgentProtocol.from_config(cfg))

    async def __call__(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        status, payload = await self.service.handle(request.method, request.url.path, await request.body())
        return JSONResponse(payload, status_code=status)

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose engine reports not ok is replaced."""
        health = self.engine.health()
        if not health.get("ok"):
            raise RuntimeError(f"{DEPLOYMENT_NAME}: engine unhealthy: {health}")


def build_application(target: ServeTarget, scaling: Scaling,
                      engine_kind: Literal["hf", "vllm"] = "hf") -> Application:
    """The `mosaic-agent` application. Up to `engine.max_batch_size` requests run at once on a replica, so
    concurrent clients share the engine's batches."""
    from ray import serve

    deployment = serve.deployment(AgentServer, name=DEPLOYMENT_NAME,
                                  max_ongoing_requests=target.cfg.engine.max_batch_size,
                                  max_constructor_retry_count=2, **scaling.deployment_options())
    return deployment.bind(target, engine_kind)


# ------------------------------------------------------------------------------------------ state file


@dataclass(frozen=True)
class ServeState:
    """What `serve status` and `serve stop` need to find a running `serve` (written once its app runs)."""

    address: str
    """GCS address of the Ray cluster the app runs on."""
    host: str
    port: int
    pid: int
    """The foreground `mosaic-ray serve` process."""
    model: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def write(self) -> None:
        path = state_path(self.port)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def read(cls, port: int) -> ServeState | None:
        path = state_path(port)
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise UserError(f"{path}: not a serve state file ({exc}); delete it") from None


def state_path(port: int) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "mosaic-ray" / "serve" / f"{port}.json"


def _is_serving(pid: int) -> bool:
    """Whether `pid` is a live `mosaic-ray serve` process: not gone, not a zombie, not a reused pid."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"serve" in args


def _served(port: int) -> ServeState | None:
    """The state of the `serve` on `port`, or None after saying on stderr why there is none."""
    state = ServeState.read(port)
    if state is None:
        print(f"mosaic-ray serve: nothing is served on port {port} (no {state_path(port)})", file=sys.stderr)
    elif not _is_serving(state.pid):
        print(f"mosaic-ray serve: nothing is served on port {port}: pid {state.pid} of {state_path(port)} is gone "
              f"(stale state file)", file=sys.stderr)
        return None
    return state


# ------------------------------------------------------------------------------------------ commands


def _start(args: argparse.Namespace) -> int:
    target = resolve_target(run_dir=args.run_dir, checkpoint=args.checkpoint, model=args.model, config=args.config)
    scaling = Scaling(args.replicas, args.min_replicas, args.max_replicas, args.num_cpus, args.num_gpus)
    _check_port(args.host, args.port)
    import ray
    from ray import serve

    address = args.address or os.environ.get("RAY_ADDRESS") or None
    _join_ray(address, scaling)
    stop = _stop_on_signals()
    deploying = False
    try:
        if APP_NAME in serve.status().applications:
            raise UserError(f"serve: the Ray cluster at {address} already runs an app {APP_NAME}; stop it first")
        serve.start(http_options={"host": args.host, "port": args.port}, proxy_location="HeadOnly")
        deploying = True
        try:
            serve.run(build_application(target, scaling, args.engine), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # the replicas failed to start: say why in one line, then clean up
            print(f"mosaic-ray serve: app {APP_NAME} failed to deploy: {_deploy_error(exc)}", file=sys.stderr)
            return 1
        state = ServeState(ray.get_runtime_context().gcs_address, args.host, args.port, os.getpid(), target.model_dir)
        _wait_reachable(state.url)
        state.write()
        print(f"serving {target.model_dir} at {state.url} (app {APP_NAME})", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        state_path(args.port).unlink(missing_ok=True)
        _shutdown(delete_app=deploying)
    return 0


def _join_ray(address: str | None, scaling: Scaling) -> None:
    """Connect to the cluster at `address`, or start a private local instance with CPUs for every replica."""
    import ray

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=max(2, math.ceil(scaling.upper * scaling.num_cpus)),
                 include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})


def _stop_on_signals() -> threading.Event:
    """An event SIGINT and SIGTERM set, so the foreground process stops cleanly, also mid start-up. Installed
    after `ray.init`, which replaces the SIGTERM handler with one that exits at once."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _deploy_error(exc: RuntimeError) -> str:
    """The exception that failed the replicas' constructor (the last one in each deployment's message, which holds
    the whole traceback), else `exc`'s own message."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    errors = []
    for dep in app.deployments.values() if app is not None else ():
        lines = dep.message.splitlines()
        starts = [i for i, line in enumerate(lines) if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b", line)]
        if starts:
            errors.append(" ".join(line.strip() for line in lines[starts[-1]:]))
    return "; ".join(errors) or str(exc)


def _check_port(host: str, port: int) -> None:
    state = ServeState.read(port)
    if state is not None and _is_serving(state.pid):
        raise UserError(f"serve --port {port}: already served by pid {state.pid} ({state.model}); stop it with "
                        f"`mosaic-ray serve stop --port {port}`")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"serve --port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None


def _wait_reachable(url: str) -> None:
    """Wait until the proxy answers `GET {url}/models`; a cluster already running Serve elsewhere never does."""
    deadline = time.monotonic() + REACHABLE_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve: app {APP_NAME} runs, but nothing answers at {url}/models ({exc}); a "
                                   "cluster that already ran Serve keeps its own proxy host and port") from None
            time.sleep(0.3)


def _shutdown(*, delete_app: bool) -> None:
    """Delete our app, shut Serve down when no other app is left, then leave Ray: `ray.shutdown()` stops a private
    instance this process started, and only disconnects from a cluster it joined."""
    import ray
    from ray import serve

    try:
        if delete_app:
            serve.delete(APP_NAME)
        if not serve.status().applications:
            serve.shutdown()
    finally:
        ray.shutdown()


def _status(args: argparse.Namespace) -> int:
    state = _served(args.port)
    if state is None:
        return 1
    import ray
    from ray import serve

    ray.init(address=state.address, log_to_driver=False, logging_level="ERROR")
    try:
        app = serve.status().applications.get(APP_NAME)
    finally:
        ray.shutdown()
    if app is None:
        print(f"mosaic-ray serve: pid {state.pid} serves port {args.port}, but the Ray cluster at {state.address} "
              f"has no app {APP_NAME} (starting or stopping)", file=sys.stderr)
        return 1
    print(f"{APP_NAME}: {_name(app.status)} at {state.url}")
    print(f"  model {state.model}, pid {state.pid}, ray {state.address}")
    for name, dep in app.deployments.items():
        replicas = ", ".join(f"{n} {_name(s)}" for s, n in dep.replica_states.items()) or "no replicas"
        print(f"  deployment {name}: {_name(dep.status)}, replicas: {replicas}" + (f" ({dep.message})" if dep.message
                                                                                   else ""))
    return 0


def _name(status: Any) -> str:
    """Serve's status enums (some arrive as plain strings) as their names."""
    return status.value if isinstance(status, Enum) else str(status)


def _stop(args: argparse.Namespace) -> int:
    state = _served(args.port)
    if state is None:
        return 1
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while _is_serving(state.pid):
        if time.monotonic() > deadline:
            print(f"mosaic-ray serve stop: pid {state.pid} still runs {args.timeout:.0f} s after SIGTERM",
                  file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"stopped {APP_NAME} on port {args.port} (pid {state.pid})")
    return 0


_START_ONLY = ("run_dir", "checkpoint", "model", "config")


def _serve_cmd(args: argparse.Namespace) -> int:
    if args.action is None:
        return _start(args)
    given = [f"--{k.replace('_', '-')}" for k in _START_ONLY if getattr(args, k) is not None]
    if given:
        raise UserError(f"serve {args.action}: {', '.join(given)} only apply when starting (`mosaic-ray serve`)")
    return _status(args) if args.action == "status" else _stop(args)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a trained agent behind an OpenAI-compatible API on Ray Serve (status, stop)",
        description="Serve a MOSAIC agent (a run's checkpoint, or a model directory) as the Ray Serve app "
                    f"{APP_NAME}: POST /v1/chat/completions answers one agent turn as tool_calls or content.")
    p.add_argument("action", nargs="?", choices=("status", "stop"), default=None,
                   help="status: show the app served on --port; stop: stop it (default: start serving)")
    src = p.add_argument_group("what to serve (start)")
    src.add_argument("--run-dir", default=None, help="local training run: its config.yaml and newest checkpoint")
    src.add_argument("--checkpoint", default=None, metavar="iter-N", help="a checkpoint of --run-dir (default newest)")
    src.add_argument("--model", default=None, metavar="DIR", help="HF model directory (instead of --run-dir)")
    src.add_argument("--config", default=None, metavar="PRESET",
                     help="preset or YAML with the protocol and engine settings for --model (default tiny-cpu)")
    src.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="inference engine per replica")
    net = p.add_argument_group("where")
    net.add_argument("--host", default="127.0.0.1", help="HTTP proxy address (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=int, default=8000)
    net.add_argument("--address", default=None,
                     help="Ray cluster to join (default $RAY_ADDRESS, else a private local Ray instance)")
    scale = p.add_argument_group("replicas (start)")
    scale.add_argument("--replicas", type=int, default=None, help="fixed replica count (default 1)")
    scale.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound")
    scale.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound")
    scale.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    scale.add_argument("--num-gpus", type=float, default=0.0, help="GPUs reserved per replica")
    p.add_argument("--timeout", type=float, default=60.0, help="stop: seconds to wait for the server to exit")
    p.set_defaults(func=_serve_cmd)
