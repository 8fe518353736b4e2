"""Bytes through the driver per training iteration, and the iteration time, of the current code and of a baseline
commit measured in the same run.

    python -m mosaic_ray.benchmarks.driver_bytes --baseline-ref 25bcf60 --out driver_bytes.json [--iterations 3]

The driver process is instrumented (nothing else is): every value `ray.get` returns to it, every argument it sends
with an actor call, and every dataset table it reads from the run's storage, each sized as Ray serializes it. A
`smoke` run (a local Ray cluster of its own, the tiny model) is measured per iteration: rollouts, judge, update and
weight sync (the warm start and the evaluations are outside the iterations and not counted).

The baseline runs the same measurement on `--baseline-ref`, checked out as a git worktree: a subprocess in a
throw-away venv (its Ray workers run the same interpreter) whose `mosaic_ray` packages resolve to that worktree.
Printed: a table per side, and the ratios current / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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

REPO = Path(__file__).resolve().parents[1]
SMALL = ["warmstart.steps=6", "warmstart.num_demos=60", "train.eval_size=4", "rollout.tasks_per_iteration=4",
         "scenarios.train_size=100", "scenarios.test_size=40", "train.checkpoint_every=1000"]
"""The smoke preset, smaller outside the iterations (warm start, evaluation); the iterations keep smoke's sizes."""
MAP_MODULE = '''"""The baseline's package map: the project's packages from a worktree, every dependency from the main venv."""
import importlib

finder = importlib.import_module({finder!r})
finder.MAPPING.update({mapping!r})
finder.install()
'''


class DriverBytes:
    """Counts what crosses the driver process's Ray API and storage reads (Ray's own serialized sizes)."""

    def __init__(self) -> None:
        self.received = self.sent = self.read = 0

    def total(self) -> int:
        return self.received + self.sent + self.read

    def install(self) -> None:
        import ray
        import ray.actor

        from mosaic_ray.storage import RunStorage

        def size(value: Any) -> int:
            return ray._private.worker.global_worker.get_serialization_context().serialize(value).total_bytes

        real_get, real_remote, real_read = ray.get, ray.actor.ActorMethod._remote, RunStorage.read_dataset

        def get(refs: Any, *args: Any, **kwargs: Any) -> Any:
            out = real_get(refs, *args, **kwargs)
            self.received += size(out)
            return out

        def remote(method: Any, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
            self.sent += size((args, kwargs))
            return real_remote(method, args=args, kwargs=kwargs, **options)

        def read_dataset(storage: Any, dataset: str, *args: Any, **kwargs: Any) -> Any:
            table = real_read(storage, dataset, *args, **kwargs)
            self.read += table.nbytes
            return table

        ray.get, ray.actor.ActorMethod._remote, RunStorage.read_dataset = get, remote, read_dataset


def measure(iterations: int) -> dict[str, Any]:
    """One smoke run in this process, instrumented; per-iteration bytes and seconds."""
    import ray

    from mosaic_ray.config import load_config
    from mosaic_ray.driver.train import Trainer

    cfg = load_config("smoke", [*SMALL, f"train.iterations={iterations}"])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    counter = DriverBytes()
    counter.install()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="driver-bytes-") as tmp:
        trainer = Trainer(cfg, str(Path(tmp) / "run"), progress=False)
        finish = trainer.finish_iteration
        marks = {"start": (0, 0, 0)}

        def collect(iteration: int) -> Any:
            marks["start"] = (counter.received, counter.sent, counter.read)
            marks["t0"] = time.perf_counter()
            return collect_real(iteration)

        def finished(it: int, row: dict[str, float], t0: float) -> None:
            r0, s0, d0 = marks["start"]
            rows.append({"iteration": it, "received_bytes": counter.received - r0, "sent_bytes": counter.sent - s0,
                         "dataset_read_bytes": counter.read - d0,
                         "iteration_s": round(time.perf_counter() - marks["t0"], 2)})
            finish(it, row, t0)

        collect_real, trainer.collect, trainer.finish_iteration = trainer.collect, collect, finished
        trainer.run()
    ray.shutdown()
    for r in rows:
        r["total_bytes"] = r["received_bytes"] + r["sent_bytes"] + r["dataset_read_bytes"]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "iteration"}
    return {"iterations": rows, "mean": mean}


def baseline(ref: str, iterations: int) -> dict[str, Any]:
    """`measure` on commit `ref`: a subprocess (and its Ray workers) in a throw-away venv whose `mosaic_ray`
    packages come from a git worktree of `ref` and whose dependencies come from this venv (removed afterwards)."""
    finders = [m for m in sys.modules if m.startswith("__editable___mosaic_ray_") and m.endswith("_finder")]
    if not finders:
        raise RuntimeError("--baseline-ref needs the editable install of the project (make install-dev)")
    finder = sys.modules[finders[0]]
    here = str(REPO)
    with tempfile.TemporaryDirectory(prefix="driver-bytes-base-") as tmp:
        tree, venv = Path(tmp) / "tree", Path(tmp) / "venv"
        subprocess.run(["git", "-C", here, "worktree", "add", "--detach", str(tree), ref], check=True,
                       capture_output=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
            site = next((venv / "lib").glob("python*/site-packages"))
            mapping = {name: path.replace(here, str(tree), 1) for name, path in finder.MAPPING.items()}
            (site / "mosaic_baseline_map.py").write_text(MAP_MODULE.format(finder=finder.__name__, mapping=mapping))
            main_site = str(Path(finder.__file__).parent)
            (site / "mosaic_baseline.pth").write_text(f"{main_site}\nimport mosaic_baseline_map\n")
            out = Path(tmp) / "base.json"
            done = subprocess.run([str(venv / "bin" / "python"), __file__, "--measure-only", "--iterations",
                                   str(iterations), "--out", str(out)], capture_output=True, text=True, check=False,
                                  cwd=tmp)  # not the checkout: Ray puts the driver's directory on its workers' path
            if done.returncode != 0:
                raise RuntimeError(f"baseline at {ref} failed: {done.stderr[-3000:]}")
            result = json.loads(out.read_text())
            result["ref"] = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=True,
                                           capture_output=True, text=True).stdout.strip()
            return result
        finally:
            subprocess.run(["git", "-C", here, "worktree", "remove", "--force", str(tree)], check=False,
                           capture_output=True)


def print_table(name: str, result: dict[str, Any]) -> None:
    print(f"\n{name}")
    print(f"{'iteration':>9} {'received KB':>12} {'sent KB':>10} {'read KB':>10} {'total KB':>10} {'seconds':>8}")
    for r in result["iterations"]:
        print(f"{r['iteration']:>9} {r['received_bytes'] / 1e3:>12.1f} {r['sent_bytes'] / 1e3:>10.1f} "
              f"{r['dataset_read_bytes'] / 1e3:>10.1f} {r['total_bytes'] / 1e3:>10.1f} {r['iteration_s']:>8.2f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--baseline-ref", help="a git commit to measure in the same run (e.g. the last release)")
    ap.add_argument("--out", help="write the result as JSON here")
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure_only:
        result = measure(args.iterations)
        Path(args.out).write_text(json.dumps(result))
        return result
    result: dict[str, Any] = {"current": measure(args.iterations)}
    print_table("current", result["current"])
    if args.baseline_ref:
        result["baseline"] = base = baseline(args.baseline_ref, args.iterations)
        print_table(f"baseline {base['ref']}", base)
        cur, old = result["current"]["mean"], base["mean"]
        result["ratios"] = {"driver_bytes": cur["total_bytes"] / max(old["total_bytes"], 1),
                            "iteration_time": cur["iteration_s"] / max(old["iteration_s"], 1e-9)}
        print(f"\n| per iteration (mean) | baseline {base['ref']} | current | current / baseline |\n|---|---|---|---|\n"
              f"| bytes through the driver | {old['total_bytes'] / 1e3:.1f} KB | {cur['total_bytes'] / 1e3:.1f} KB | "
              f"{result['ratios']['driver_bytes']:.3f} |\n"
              f"| iteration time | {old['iteration_s']:.1f} s | {cur['iteration_s']:.1f} s | "
              f"{result['ratios']['iteration_time']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
