"""Rollout throughput: the Ray fleet (1 and 2 workers) vs a plain in-process loop over the same episodes.

Two policies:
- `scripted` (the `naive` scripted policy; no model): measures the episode machinery itself — rendering,
  tokenizing, parsing, sandbox tools, grading — and the Ray overhead of one remote call per episode.
- `model` (the tiny model, HF engine, sampling at temperature 1, seeded per turn): in process, the loop awaits an
  `HFEngine` directly; through Ray, the workers call one `EngineActor` via an `EngineRouter`. Per-turn seeds
  derive from the trajectory id, so both sides generate the same tokens and do the same work.

Every configuration runs the same episodes (tasks × G). Workers are started and warmed before the clock
starts (`wait_for_workers`), so the numbers are steady-state throughput, not actor start-up. Reports
episodes/s, generated tokens/s, and two ratios measured in the same run: `fleet_vs_inprocess` (1 worker vs
the plain loop: < 1 is Ray's overhead) and `scaling_2v1` (2 workers vs 1). Prints a table and one JSON line.

    python -m mosaic_ray.benchmarks.rollout_throughput [--tasks 100] [--model-tasks 12] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from typing import Any


def _summ(name: str, records: list, seconds: float) -> dict[str, Any]:
    generated = sum(sum(r.loss_mask) for r in records)
    return {"config": name, "episodes": len(records), "seconds": seconds, "episodes_per_s": len(records) / seconds,
            "gen_tokens_per_s": generated / seconds, "errors": sum(r.error is not None for r in records),
            "episode_cpu_ms": 1e3 * sum(r.timings.total_s - r.timings.generate_s for r in records) / len(records)}


def _fleet_run(cfg, model_dir: str, tasks, group_size: int, workers: int, **source) -> tuple[list, float]:
    from mosaic_ray.actors.fleet import RolloutFleet

    from mosaic_ray.schema import from_arrow

    with RolloutFleet(cfg, model_dir=model_dir, run_id="bench", num_workers=workers, **source) as fleet:
        fleet.wait_for_workers(workers)
        list(fleet.stream(tasks[:2], group_size=1, iteration=-1))  # warm the workers' code paths
        start = time.perf_counter()
        records = [r for b in fleet.stream(tasks, group_size=group_size, iteration=0) for r in from_arrow(b)]
        return records, time.perf_counter() - start


def _inprocess_run(specs, policy_for, tok, cfg) -> tuple[list, float]:
    from mosaic_ray.rollout import run_episodes

    start = time.perf_counter()
    records = asyncio.run(run_episodes(specs, policy_for, tok, concurrency=cfg.rollout.episodes_per_worker,
                                       protocol_cfg=cfg.protocol, family=cfg.model.family))
    return records, time.perf_counter() - start


def bench_scripted(cfg, model_dir: str, tasks, group_size: int) -> list[dict]:
    from mosaic_ray.rollout import episode_specs, load_tokenizer, scripted_factory

    tok = load_tokenizer(model_dir)
    specs = episode_specs(tasks, group_size=group_size, run_id="bench", iteration=0)
    rows = [_summ("scripted in-process", *_inprocess_run(specs, scripted_factory("naive", tok), tok, cfg))]
    for n in (1, 2):
        rows.append(_summ(f"scripted fleet {n}w", *_fleet_run(cfg, model_dir, tasks, group_size, n, scripted="naive")))
    return rows


def bench_model(cfg, model_dir: str, tasks, group_size: int) -> list[dict]:
    from mosaic_ray.actors.engines import EngineRouter
    from mosaic_ray.actors.engines.actor import start_engine_actors
    from mosaic_ray.actors.engines.hf import HFEngine
    from mosaic_ray.actors.rollout_worker import EnginePolicy

    from mosaic_ray.rollout import episode_specs, load_tokenizer

    tok = load_tokenizer(model_dir)
    specs = episode_specs(tasks, group_size=group_size, run_id="bench", iteration=0)
    e = cfg.engine

    async def inprocess() -> tuple[list, float]:
        from mosaic_ray.rollout import run_episodes

        engine = HFEngine(model_dir, max_batch_size=e.max_batch_size, max_wait_ms=e.max_wait_ms, device="cpu")
        policy = EnginePolicy(EngineRouter([engine]), e)
        await run_episodes(specs[:2], lambda s: policy, tok, protocol_cfg=cfg.protocol)  # warm up
        start = time.perf_counter()
        records = await run_episodes(specs, lambda s: policy, tok, concurrency=cfg.rollout.episodes_per_worker,
                                     protocol_cfg=cfg.protocol, family=cfg.model.family)
        elapsed = time.perf_counter() - start
        await engine.close()
        return records, elapsed

    rows = [_summ("model in-process", *asyncio.run(inprocess()))]
    engines = start_engine_actors(e, model_dir, num_engines=1)
    try:
        for n in (1, 2):
            rows.append(_summ(f"model fleet {n}w", *_fleet_run(cfg, model_dir, tasks, group_size, n,
                                                               engine_handles=engines)))
    finally:
        import ray

        for h in engines:
            ray.kill(h)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="rollout fleet vs in-process episode loop")
    ap.add_argument("--model", default=None, help="HF model dir (default: the cached tiny model)")
    ap.add_argument("--tasks", type=int, default=100, help="tasks for the scripted runs (× group size)")
    ap.add_argument("--model-tasks", type=int, default=12, help="tasks for the model runs (× group size)")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from mosaic_ray.hygiene import set_torch_threads

    set_torch_threads(1)
    import ray

    from mosaic_ray.config import TinyModelConfig, load_config
    from mosaic_ray.scenarios import load_tasks

    model_dir = args.model
    if model_dir is None:
        from mosaic_ray.models.tiny import cached_tiny_model

        model_dir = str(cached_tiny_model(TinyModelConfig()))
    cfg = load_config("tiny-cpu", ["rollout.num_cpus_per_worker=0.5", "rollout.episodes_per_worker=32",
                                   "rollout.autoscale=false", "rollout.max_workers=2", "engine.num_cpus=0.5",
                                   "engine.device=cpu", "engine.max_batch_size=32", "protocol.max_new_tokens=32",
                                   "protocol.max_steps=3"])
    tasks = load_tasks("train", size=max(args.tasks, args.model_tasks))
    temp = tempfile.mkdtemp(prefix="mr-rb-", dir="/tmp")
    rows: list[dict] = []
    try:
        ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                           "TOKENIZERS_PARALLELISM": "false"}})
        rows += bench_scripted(cfg, model_dir, tasks[:args.tasks], args.group_size)
        if not args.skip_model:
            rows += bench_model(cfg, model_dir, tasks[:args.model_tasks], args.group_size)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

    by = {r["config"]: r for r in rows}
    ratios = {}
    for kind in ("scripted", "model"):
        if f"{kind} fleet 1w" in by:
            base, one, two = by[f"{kind} in-process"], by[f"{kind} fleet 1w"], by[f"{kind} fleet 2w"]
            ratios[f"{kind}_fleet1w_vs_inprocess"] = one["episodes_per_s"] / base["episodes_per_s"]
            ratios[f"{kind}_fleet2w_vs_inprocess"] = two["episodes_per_s"] / base["episodes_per_s"]
            ratios[f"{kind}_scaling_2w_vs_1w"] = two["episodes_per_s"] / one["episodes_per_s"]
    load = os.getloadavg()[0]
    print(f"model {model_dir} | G={args.group_size} | cores {os.cpu_count()} | load average {load:.1f}")
    print(f"{'config':<22} {'episodes':>9} {'seconds':>8} {'episodes/s':>11} {'gen tok/s':>10} {'errors':>7} "
          f"{'ms/episode outside generate':>28}")
    for r in rows:
        print(f"{r['config']:<22} {r['episodes']:>9} {r['seconds']:>8.2f} {r['episodes_per_s']:>11.1f} "
              f"{r['gen_tokens_per_s']:>10.0f} {r['errors']:>7} {r['episode_cpu_ms']:>28.1f}")
    for k, v in ratios.items():
        print(f"{k:<34} {v:6.2f}x")
    result = {"rows": rows, "ratios": ratios, "load_average": load, "cores": os.cpu_count(),
              "group_size": args.group_size}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
