"""`mosaic-ray train` and the `model:DIR` evaluation policy.

Ray: when `ray.address` or `RAY_ADDRESS` is set (as under `ray job submit`) the driver connects to that cluster;
otherwise it starts a local Ray and stops it at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from mosaic_ray.config import ConfigError, MosaicConfig, load_config
from mosaic_ray.errors import UserError

if TYPE_CHECKING:
    from mosaic_ray.evaluation import Runner
    from mosaic_ray.scenarios.tasks import Task
    from mosaic_ray.types import Outcome

WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
"""What every worker of a run gets. Not HF_HUB_OFFLINE: whether Hub ids may download is the user's choice (set it
in the nodes' environment); the tiny default and local, `pkg:` and `s3://` models never touch the Hub."""


def init_ray(cfg: MosaicConfig) -> None:
    """Connect to `ray.address` / RAY_ADDRESS, or start a local Ray with single-threaded workers.

    The job's runtime env carries only WORKER_ENV, never credentials: Ray logs a runtime env and shows it in the
    dashboard. S3 credentials come from each node's own environment or instance role (s3fs/botocore's chain); a
    local Ray started here inherits the driver's environment.
    """
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if cfg.ray.auth_mode:
        os.environ.setdefault("RAY_AUTH_MODE", cfg.ray.auth_mode)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                 runtime_env=runtime_env, log_to_driver=True)


def _train_cmd(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    from mosaic_ray.driver.train import Trainer
    from mosaic_ray.hygiene import set_torch_threads

    set_torch_threads(1)
    if args.resume:
        run_dir = args.resume
        cfg = resumed_config(run_dir, args)
    else:
        cfg = load_config(args.config or "tiny-cpu", args.set)
        run_dir = args.run_dir or cfg.run_dir or os.path.join("runs", f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if _run_has(run_dir, "state.json"):
            raise UserError(f"--run-dir {run_dir}: already holds a run; continue it with --resume {run_dir} or "
                            f"choose another --run-dir")
    check_inputs(cfg)
    init_ray(cfg)
    trainer = Trainer(cfg, run_dir, resume=bool(args.resume), progress=False if args.quiet else None)
    try:
        report = trainer.run()
    except KeyboardInterrupt:
        print(f"interrupted; resume with: mosaic-ray train --resume {run_dir}", file=sys.stderr)
        return 130
    print_summary(report, run_dir)
    return 0


def resumed_config(run_dir: str, args: argparse.Namespace) -> MosaicConfig:
    """The saved config of the run in `run_dir`. A resume continues that run as it was configured: --config,
    --set and --run-dir are refused rather than silently ignored (start a new run to change the config)."""
    import yaml

    from mosaic_ray.config import from_dict
    from mosaic_ray.storage import RunStorage

    given = [flag for flag, used in (("--config", args.config is not None), ("--set", bool(args.set)),
                                     ("--run-dir", args.run_dir is not None)) if used]
    if given:
        raise UserError(f"--resume {run_dir}: continues the run with its saved config.yaml; {', '.join(given)} "
                        f"cannot change it (start a new run with --run-dir to change the config)")
    if "://" not in run_dir and not os.path.isdir(run_dir):
        raise UserError(f"--resume {run_dir}: no such directory")
    for name in ("state.json", "config.yaml"):
        if not _run_has(run_dir, name):
            raise UserError(f"--resume {run_dir}: no {name} (not a run directory, or the run never reached its "
                            f"first checkpoint)")
    storage = RunStorage(run_dir)
    try:
        return from_dict(yaml.safe_load(storage.get_text("config.yaml")))
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError(f"{storage.url('config.yaml')}: {e}") from None


def _run_has(run_dir: str, name: str) -> bool:
    """Whether the run directory holds `name` (a local directory is not created by asking)."""
    if "://" not in run_dir:
        return os.path.isfile(os.path.join(run_dir, name))
    from mosaic_ray.storage import RunStorage

    return RunStorage(run_dir).exists(name)


def check_inputs(cfg: MosaicConfig) -> None:
    """Read what the run reads from the user before any work starts: a task file (`scenarios.source`) fails
    here, naming its row and field, and a local model directory missing on this node fails naming the node and
    the path — not after Ray is up. (Each actor resolves the model again on its own node and fails the same way
    at start-up where the directory is missing there.)"""
    from mosaic_ray.driver.train import scenario_splits
    from mosaic_ray.models.source import is_local_path, resolve_model

    if cfg.engine.kind == "openai":
        raise ConfigError("engine.kind: an 'openai' engine serves a model behind HTTP and cannot load the learner's "
                          "weights; train with 'hf' or 'vllm' ('openai' is for mosaic-ray eval) (got 'openai')")
    if cfg.scenarios.source != "builtin":
        scenario_splits(cfg)
    judge_model = cfg.judge.model if cfg.judge.kind == "llm" and cfg.judge.endpoint is None else None
    for source in (cfg.model.path, judge_model):
        if source is not None and is_local_path(source):
            resolve_model(source, cfg.model.cache_dir)


def print_summary(report: dict[str, Any], run_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MOSAIC-Ray {report['config']}: held-out before (warm start) → after "
                        f"({report['iterations']} iterations, {report['wall_time_s']:.0f} s)")
    for col in ("metric", "before", "after", "change"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for key, before in report["before"].items():
        after = report["after"].get(key)
        table.add_row(key, f"{before:.3f}", "" if after is None else f"{after:.3f}",
                      "" if after is None else f"{after - before:+.3f}")
    Console().print(table)
    print(f"run directory: {run_dir} (report.md, report.json, curves.png, metrics.jsonl, checkpoints/)")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="run the MOSAIC training loop (default: the embedded tiny-cpu run)")
    p.add_argument("--config", default=None, help="preset name or YAML path (default tiny-cpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted config key")
    p.add_argument("--run-dir", default=None, help="local path or s3://bucket/prefix (default runs/NAME-TIME)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its last checkpoint, with its saved config (no --config/--set)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_train_cmd)


# ------------------------------------------------------------------------------- `eval --policy model:DIR`


def model_runner(path: str) -> Runner:
    """Runner for `mosaic-ray eval --policy model:DIR|s3://...`: HF engine actors + the rollout fleet, greedy."""
    if not path:
        raise UserError("policy model:DIR: give a model directory or s3:// URI, e.g. model:runs/x/checkpoints/iter-00009")

    def run(tasks: list[Task], cfg: MosaicConfig) -> list[tuple[Task, Outcome]]:
        """`cfg`: the model's family, engine, dtype and protocol (a trained run's own config under --run-dir)."""
        from dataclasses import replace

        import ray

        from mosaic_ray.actors.fleet import RolloutFleet
        from mosaic_ray.actors.rollout_worker import start_rollout_engines

        cfg = replace(cfg, model=replace(cfg.model, path=path))
        init_ray(cfg)
        engines = start_rollout_engines(cfg, path)
        fleet = RolloutFleet(cfg, model_dir=path, engine_handles=engines, run_id="eval")
        try:
            by_id = {t.task_id: t for t in tasks}
            records = list(fleet.evaluate(tasks, temperature=0.0))
        finally:
            fleet.shutdown()
            for engine in engines:
                ray.kill(engine, no_restart=True)
        return [(by_id[r.task_id], r.outcome) for r in records]

    return run


def _register_model_policy() -> None:
    from mosaic_ray.evaluation import POLICY_RESOLVERS

    POLICY_RESOLVERS.setdefault("model", model_runner)


_register_model_policy()
