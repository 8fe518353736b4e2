"""Async vs sync training: iteration throughput of the RL phase, and what each run learned, measured in one run.

    python -m mosaic_ray.benchmarks.async_throughput [--iterations 15] [--json async_throughput.json]
        [--set key=value ...] [--no-pin] [--keep DIR]

The default `tiny-cpu` config is trained twice, `train.mode=sync` then `train.mode=async` (`AsyncSchedule`: the
rollouts of iteration k+1 run while the learner updates on k, `train.max_staleness` 1), for `--iterations` RL
iterations each, same seed. Both start from one shared warm start: it is trained and evaluated ("before") once,
with the preset's own threads (tiny-cpu: 1 per engine, 2 for the learner; nothing else runs then), its run directory
(`checkpoints/warmstart`, `state.json`) copied twice, and each copy is `--resume`d in its mode with the core split
below, so both RL phases begin from identical weights.

Cores: one engine and one learner, each reserving 1 Ray CPU (`engine.num_cpus=1`, `learner.num_cpus=1`) and
running 1 torch thread (`engine.cpu_threads=1`, `learner.cpu_threads=1`; tiny-cpu gives the learner 2 for sync);
the project sets no CPU affinity itself, so this benchmark pins: once a run's actors are up, the learner process
gets the second core this process may use to itself, and everything else of the run (the engine, the rollout
workers, the pair builder, the driver, Ray's own processes: this process and all its descendants) the first
(`os.sched_setaffinity` on every thread; threads and processes started later inherit it; `--no-pin` leaves
placement to the OS). So the rollout side and the learner each have a core, as a cluster gives rollouts and
training their own machines: left to float, the light actors ran on the learner's core during async's
overlapped updates and slowed them by a third (update 5.2 s sync, 6.9 s async; ratio 1.00x). The local Ray gets
just enough logical CPUs for the actors' reservations (`ray_cpus`).

Timed: the RL phase only, from the first iteration's rollouts to the end of the last iteration (its checkpoint
included), on the driver's clock; the warm start, the evaluations and actor start-up (rollout workers included:
the clock starts once they are healthy) are outside. The first iteration's slower rollouts and update (engine and
learner warming up) are inside, in both modes. Iterations/s = iterations / those seconds; the ratio async/sync
of the two runs is the result (target >= 1.3x). It includes the async pipeline's fill (the first rollouts overlap
nothing) and drain (nor does the last update), so it grows with `--iterations`; the median `time/iteration_s`
ratio sync/async is printed beside it as the steady-state figure. Also per run: the mean rollout / judge / update
/ weight-sync seconds of an iteration (metrics.jsonl), their sum over the RL seconds (`overlap`: > 1 when phases
ran side by side), the mean staleness of the samples learned from, and the CPU seconds the engine and the learner
process used over the RL seconds (`busy`, from /proc). The sync run goes first, the async run right after it.

Learning: each run's held-out evaluation after training (`report.json` splits, `eval/after*.json` for the task
counts): harmful refusal, injection success, benign success, over-refusal, per split, beside the shared warm
start's. A difference async − sync is "worse" only past the evaluation's sampling noise, 2 standard errors of the
difference of two binomial rates (at least 2 tasks); one run per mode cannot show training's seed-to-seed spread,
which is larger (docs/learning-check.md).

Prints the per-mode table, the held-out table per split, the `async/sync` ratio line and one JSON line (also
written to `--json`). Exit status 0 when the ratio meets the target and no held-out metric is worse past noise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODES = ("sync", "async")
TARGET = 1.3
"""async iterations/s over sync iterations/s."""
DEFAULT_ITERATIONS = 15
"""Warm start, three evaluations and both runs of tiny-cpu in about 13-15 minutes on the 2-core machine: at 4
iterations (1 thread everywhere) the warm start took 267 s (now with the learner's 2 preset threads, ~1.4x
faster) and the "before" evaluation ~125 s, each run ~100 s outside its RL phase, an iteration ~11.5 s (sync) and
~9.5 s (async)."""
CORE_SPLIT = ("engine.num_engines=1", "learner.num_learners=1", "engine.num_cpus=1", "learner.num_cpus=1",
              "engine.cpu_threads=1", "learner.cpu_threads=1")
"""One engine and one learner, 1 Ray CPU and 1 torch thread each (the learner on a core of its own, see `pin`)."""
HELDOUT = {"harmful_refusal_rate": "harmful", "injection_success_rate": "injection",
           "benign_success_rate": "benign", "over_refusal_rate": "benign"}
"""The held-out metrics compared, with the category whose tasks are each rate's denominator."""
PHASES = ("rollout", "judge", "update", "weight_sync")

log = logging.getLogger("mosaic_ray.benchmarks.async_throughput")


# ------------------------------------------------------------------------------------------------ processes


def ray_cpus(cfg: Any) -> int:
    """Logical CPUs for the local Ray: what the run's actors reserve (engines, learners, pair builder, the
    largest rollout fleet, an LLM judge's replicas), rounded up."""
    need = (cfg.engine.num_cpus * cfg.engine.num_engines + cfg.learner.num_cpus * max(cfg.learner.num_learners, 1)
            + cfg.judge.num_cpus + cfg.rollout.max_workers * cfg.rollout.num_cpus_per_worker)
    if cfg.judge.kind == "llm" and cfg.judge.endpoint is None:
        need += cfg.judge.replica_num_cpus * cfg.judge.max_replicas
    return max(1, math.ceil(need - 1e-9))


def pin(pid: int, cpu: int) -> int:
    """Every thread of process `pid` onto `cpu` (threads it starts later inherit it); how many were pinned."""
    n = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:  # a process that just ended
        return 0
    for task in tasks:
        try:
            os.sched_setaffinity(int(task.name), {cpu})
            n += 1
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass
    return n


def descendants(root: int) -> list[int]:
    """Every live process whose chain of parents reaches `root` (not `root` itself), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # a process that just ended
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads (/proc/PID/stat); nan when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_trainer(pin_cores: tuple[int, int] | None):
    """A Trainer that pins its engine and learner after setup and clocks the RL phase."""
    import ray

    from mosaic_ray.driver.train import Trainer

    class BenchTrainer(Trainer):
        def setup(self) -> None:
            super().setup()
            # rollout workers up before the clock, as a run's "before" evaluation leaves them (a resumed run
            # starts its iterations right after setup)
            self.fleet.wait_for_workers()
            self.pids = {"engine": ray.get([h.__ray_call__.remote(lambda actor: os.getpid())
                                            for h in self.engines]),
                         "learner": list(getattr(self.learner, "pids", []))}
            self.pinned: dict[str, int] = {}
            if pin_cores is not None:
                rollout_core, learner_core = pin_cores
                learners = set(self.pids["learner"])
                for pid in [os.getpid(), *descendants(os.getpid())]:
                    if pid not in learners:
                        pin(pid, rollout_core)
                for pid in learners:
                    pin(pid, learner_core)
                self.pinned = {"learner": learner_core, "everything else": rollout_core}
            self.rl_t0: float | None = None
            self.rl_t1: float | None = None
            self.cpu0: dict[str, float] = {}
            self.cpu1: dict[str, float] = {}

        def cpu_now(self) -> dict[str, float]:
            return {kind: sum(cpu_seconds(p) for p in pids) for kind, pids in self.pids.items()}

        def collect(self, iteration: int):
            if self.rl_t0 is None:  # the first rollouts start the RL phase (in either schedule)
                self.rl_t0, self.cpu0 = time.perf_counter(), self.cpu_now()
            return super().collect(iteration)

        def finish_iteration(self, it: int, row: dict[str, float], t0: float) -> None:
            super().finish_iteration(it, row, t0)  # the last one writes the final checkpoint: inside the phase
            self.rl_t1, self.cpu1 = time.perf_counter(), self.cpu_now()

    return BenchTrainer


class WarmStartDone(Exception):
    """Raised once the warm start is checkpointed and evaluated: the shared starting point is on disk."""


def warm_start(cfg: Any, run_dir: Path) -> None:
    """Warm start + "before" evaluation + `checkpoints/warmstart` + state.json in `run_dir`, then stop."""
    base = bench_trainer(None)

    class WarmOnly(base):
        def save_state(self, iteration: int) -> None:
            super().save_state(iteration)
            if iteration < 0:
                raise WarmStartDone

    try:
        WarmOnly(cfg, str(run_dir), progress=False).run()
    except WarmStartDone:
        return
    raise RuntimeError(f"{run_dir}: the warm-start run finished without checkpointing its warm start")


def train(cfg: Any, run_dir: Path, pin_cores: tuple[int, int] | None) -> dict[str, Any]:
    """Resume the copied warm start in `cfg.train.mode`; the run's timing and learning summary."""
    trainer = bench_trainer(pin_cores)(cfg, str(run_dir), resume=True, progress=False)
    t0 = time.perf_counter()
    report = trainer.run()
    wall = time.perf_counter() - t0
    if trainer.rl_t0 is None or trainer.rl_t1 is None:
        raise RuntimeError(f"{run_dir}: no iteration ran")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("iteration", -1) >= 0]
    rl_s = trainer.rl_t1 - trainer.rl_t0
    out: dict[str, Any] = {"mode": cfg.train.mode, "iterations": len(rows), "rl_s": round(rl_s, 2),
                           "iterations_per_s": len(rows) / rl_s, "run_wall_s": round(wall, 1)}
    for phase in PHASES:
        out[f"{phase}_s"] = mean(r.get(f"time/{phase}_s", 0.0) for r in rows)
    out["overlap"] = sum(out[f"{p}_s"] for p in PHASES) * len(rows) / rl_s
    out["median_iteration_s"] = statistics.median(r["time/iteration_s"] for r in rows)
    out["staleness_mean"] = mean(r.get("staleness/mean", 0.0) for r in rows)
    out["episodes_per_s"] = sum(r.get("rollout/episodes", 0.0) for r in rows) / rl_s
    for kind in ("engine", "learner"):
        out[f"{kind}_busy"] = (trainer.cpu1.get(kind, math.nan) - trainer.cpu0.get(kind, math.nan)) / rl_s
    out["pinned"] = trainer.pinned
    out["heldout"] = heldout(report, run_dir)
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


# ------------------------------------------------------------------------------------------------ results


def heldout(report: dict[str, Any], run_dir: Path) -> dict[str, dict[str, Any]]:
    """{split: {"before": {metric: v}, "after": {metric: v}, "n": {metric: tasks in its denominator}}} of one run,
    for the `HELDOUT` metrics."""
    out = {}
    for split, entry in (report.get("splits") or {}).items():
        path = run_dir / "eval" / ("after.json" if split == "templates" else f"after-{split}.json")
        per_cat = json.loads(path.read_text()).get("per_category", {}) if path.is_file() else {}
        out[split] = {side: {k: entry.get(side, {}).get(k) for k in HELDOUT} for side in ("before", "after")}
        out[split]["n"] = {k: int(per_cat.get(cat, {}).get("num_tasks", 0)) for k, cat in HELDOUT.items()}
    return out


def throughput_ratio(sync: dict[str, Any], asyn: dict[str, Any]) -> float:
    """async iterations/s over sync iterations/s (each run's own iterations over its own RL seconds)."""
    return asyn["iterations_per_s"] / sync["iterations_per_s"]


def steady_ratio(sync: dict[str, Any], asyn: dict[str, Any]) -> float:
    """Median sync iteration seconds over median async iteration seconds (`time/iteration_s`: the wait for the
    iteration's rollouts plus its update, checkpoints left out); a secondary figure, free of the pipeline's fill
    (the first rollouts, which nothing overlaps) and drain (the last update, likewise)."""
    return sync["median_iteration_s"] / asyn["median_iteration_s"]


def compare_heldout(sync: dict[str, dict[str, Any]], asyn: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per split and metric: both runs' after values, async − sync, the noise band (2 standard errors of a
    difference of two binomial rates on these task counts, at least 2 tasks) and the verdict: "worse" / "better"
    (past the band, in the metric's good direction, `report.EVAL_KEYS`) or "within noise"."""
    from mosaic_ray.driver.report import EVAL_KEYS

    rows = []
    for split in sync:
        if split not in asyn:
            continue
        for metric in HELDOUT:
            s, a = sync[split]["after"].get(metric), asyn[split]["after"].get(metric)
            n = min(sync[split]["n"].get(metric, 0), asyn[split]["n"].get(metric, 0))
            row = {"split": split, "metric": metric, "before": sync[split]["before"].get(metric), "sync": s,
                   "async": a, "n": n, "diff": None, "noise": None, "verdict": "not measured"}
            if s is not None and a is not None and n > 0:
                band = max(2 * math.sqrt((s * (1 - s) + a * (1 - a)) / n), 2 / n)
                gain = (a - s) if EVAL_KEYS[metric] == "up" else (s - a)
                verdict = "worse" if gain < -band else "better" if gain > band else "within noise"
                row.update(diff=a - s, noise=band, verdict=verdict)
            rows.append(row)
    return rows


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def print_results(runs: dict[str, dict[str, Any]], ratio: float, comparison: list[dict[str, Any]],
                  setup: dict[str, Any]) -> None:
    print(f"\nasync vs sync, {setup['config']}: {setup['iterations']} RL iterations each, cores "
          f"{setup['cores']}, pinned: {setup['pin'] or 'nothing (OS placement)'}, Ray CPUs "
          f"{setup['ray_cpus']}, load average {setup['load_average']:.1f}")
    head = (f"{'mode':<6} {'iters':>5} {'RL s':>8} {'iters/s':>8} {'rollout s':>9} {'judge s':>7} {'update s':>8} "
            f"{'sync s':>6} {'overlap':>7} {'med iter s':>10} {'staleness':>9} {'eng busy':>8} {'lrn busy':>8}")
    print(head)
    for mode in MODES:
        r = runs[mode]
        print(f"{mode:<6} {r['iterations']:>5} {r['rl_s']:>8.1f} {r['iterations_per_s']:>8.4f} {r['rollout_s']:>9.2f} "
              f"{r['judge_s']:>7.2f} {r['update_s']:>8.2f} {r['weight_sync_s']:>6.2f} {r['overlap']:>7.2f} "
              f"{r['median_iteration_s']:>10.2f} "
              f"{r['staleness_mean']:>9.2f} {r['engine_busy']:>8.2f} {r['learner_busy']:>8.2f}")
    for split in dict.fromkeys(c["split"] for c in comparison):
        print(f"\nheld-out after training, {split} (%; before = the shared warm start)")
        print(f"{'metric':<24} {'n':>4} {'before':>7} {'sync':>7} {'async':>7} {'async-sync':>10} {'noise':>7}  verdict")
        for c in (c for c in comparison if c["split"] == split):
            diff = "–" if c["diff"] is None else f"{100 * c['diff']:+.1f}"
            noise = "–" if c["noise"] is None else f"±{100 * c['noise']:.1f}"
            print(f"{c['metric']:<24} {c['n']:>4} {_pct(c['before']):>7} {_pct(c['sync']):>7} {_pct(c['async']):>7} "
                  f"{diff:>10} {noise:>7}  {c['verdict']}")
    met = "met" if ratio >= TARGET else f"missed by {TARGET - ratio:.2f}x"
    print(f"\nasync/sync iterations/s: {ratio:.2f}x (target >= {TARGET}x: {met}); steady state, median "
          f"iteration seconds sync/async (no pipeline fill or drain): {steady_ratio(runs['sync'], runs['async']):.2f}x")


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mosaic_ray.benchmarks.async_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, help="RL iterations of each run")
    p.add_argument("--config", default="tiny-cpu", help="preset or YAML (default: tiny-cpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both runs (after the core split; train.mode is set per run)")
    p.add_argument("--json", metavar="PATH", help="also write the JSON result here")
    p.add_argument("--no-pin", action="store_true", help="leave the placement of every process to the OS")
    p.add_argument("--keep", metavar="DIR", help="keep the run directories under DIR (default: a temp dir, removed)")
    args = p.parse_args(argv)
    if args.iterations < 1:
        p.error("--iterations must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    import ray

    from mosaic_ray.config import load_config
    from mosaic_ray.driver.cli import WORKER_ENV
    from mosaic_ray.hygiene import set_torch_threads

    set_torch_threads(1)
    cfgs = {mode: load_config(args.config, [*CORE_SPLIT, *args.set, f"train.iterations={args.iterations}",
                                            f"train.mode={mode}"]) for mode in MODES}
    warm_cfg = load_config(args.config, [*args.set, f"train.iterations={args.iterations}", "train.mode=sync"])
    cores = sorted(os.sched_getaffinity(0))
    pin_cores = None if args.no_pin or len(cores) < 2 else (cores[0], cores[1])
    if pin_cores is None and not args.no_pin:
        log.warning("only %d core(s) available to this process: nothing is pinned", len(cores))
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="async-throughput-"))
    root.mkdir(parents=True, exist_ok=True)
    if any((root / name).exists() for name in ("warmstart", *MODES)):
        raise SystemExit(f"--keep {root}: already holds runs of this benchmark; choose another directory")
    temp = tempfile.mkdtemp(prefix="mr-at-", dir="/tmp")  # short: Ray's socket paths
    n_cpus = max(ray_cpus(c) for c in (warm_cfg, *cfgs.values()))
    runs: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    try:
        ray.init(address="local", num_cpus=n_cpus, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
                 runtime_env={"env_vars": {**WORKER_ENV, "HF_HUB_OFFLINE": os.environ["HF_HUB_OFFLINE"]}})
        log.info("warm start (shared by both runs) in %s", root / "warmstart")
        warm_start(warm_cfg, root / "warmstart")
        warm_s = time.perf_counter() - t_start
        for mode in MODES:
            shutil.copytree(root / "warmstart", root / mode)
            log.info("%s run: %d iterations in %s", mode, args.iterations, root / mode)
            runs[mode] = train(cfgs[mode], root / mode, pin_cores)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    ratio = throughput_ratio(runs["sync"], runs["async"])
    comparison = compare_heldout(runs["sync"]["heldout"], runs["async"]["heldout"])
    setup = {"config": args.config, "iterations": args.iterations, "cores": len(cores), "ray_cpus": n_cpus,
             "pin": {"learner": pin_cores[1], "everything else": pin_cores[0]} if pin_cores else None,
             "load_average": os.getloadavg()[0], "overrides": [*CORE_SPLIT, *args.set],
             "max_staleness": cfgs["async"].train.max_staleness, "warm_start_and_before_eval_s": round(warm_s, 1),
             "warm_start_threads": {"engine": warm_cfg.engine.cpu_threads, "learner": warm_cfg.learner.cpu_threads},
             "total_s": round(time.perf_counter() - t_start, 1), "kept": str(root) if args.keep else None}
    print_results(runs, ratio, comparison, setup)
    learning_ok = not any(c["verdict"] == "worse" for c in comparison)
    result = {"setup": setup, "runs": {m: {k: v for k, v in r.items() if k != "heldout"} for m, r in runs.items()},
              "ratio_async_over_sync": ratio, "target": TARGET, "ratio_met": ratio >= TARGET,
              "steady_ratio_sync_over_async_median_iteration_s": steady_ratio(runs["sync"], runs["async"]),
              "heldout": comparison, "heldout_ok": learning_ok}
    from mosaic_ray.benchmarks.harness import emit

    emit(result, args.json)
    return 0 if ratio >= TARGET and learning_ok else 1


if __name__ == "__main__":
    sys.exit(main())
