"""Scripted evaluation throughput (tasks/s) over the whole held-out test split.

Baseline, measured in the same run: replaying each task's oracle calls straight through the sandbox (no protocol
rendering or parsing, no episode bookkeeping, no grading). The ratio shows what the full text-level loop costs
on top of the tools themselves — the per-episode CPU overhead a rollout worker pays besides generation.

    python benchmarks/scripted_eval_throughput.py [--repeats 3] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import time

from mosaic_ray.envs import make_sandbox
from mosaic_ray.policies import get_scripted, run_policy
from mosaic_ray.scenarios import load_tasks


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    tasks = load_tasks("test")
    gen_s = time.perf_counter() - t0

    def replay() -> None:
        for t in tasks:
            box = make_sandbox(t.world, t.tools)
            for c in t.ground_truth():
                box.call(c.tool, c.args, strict=True)

    rows = {"generate test split": (len(tasks) / gen_s, None)}
    base = len(tasks) / _best(replay, args.repeats)
    rows["baseline: sandbox replay of oracle"] = (base, 1.0)
    for name in ("safe", "naive", "over_refuse", "random"):
        rate = len(tasks) / _best(lambda name=name: run_policy(tasks, get_scripted(name)), args.repeats)
        rows[f"scripted eval: {name}"] = (rate, rate / base)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"scripted evaluation throughput, {len(tasks)} test tasks (best of {args.repeats})")
    table.add_column("what")
    table.add_column("tasks/s", justify="right")
    table.add_column("vs baseline", justify="right")
    for what, (rate, ratio) in rows.items():
        table.add_row(what, f"{rate:,.0f}", "–" if ratio is None else f"{ratio:.2f}x")
    Console().print(table)
    result = {"num_tasks": len(tasks), "repeats": args.repeats,
              "tasks_per_s": {k: round(v[0], 1) for k, v in rows.items()},
              "ratio_vs_replay": {k: round(v[1], 3) for k, v in rows.items() if v[1] is not None}}
    print(json.dumps(result, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
