"""`mosaic-ray scenarios stats|sample|export`: inspect and export the built-in scenario suites."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mosaic_ray.scenarios.tasks import Task


def _load(args: argparse.Namespace) -> list[Task]:
    from mosaic_ray.scenarios import load_tasks, read_tasks

    if getattr(args, "input", None):
        return read_tasks(args.input)
    return load_tasks(args.split, size=args.size, seed=args.seed, domains=tuple(args.domain),
                      categories=tuple(args.category))


def stats(tasks: list[Task]) -> dict[str, Any]:
    """Counts per category, domain, category × domain, and templates; prompt length in words."""
    words = [len(t.prompt.split()) for t in tasks]
    return {
        "num_tasks": len(tasks),
        "categories": dict(Counter(t.category for t in tasks)),
        "domains": dict(Counter(t.domain for t in tasks)),
        "category_domain": {f"{c}/{d}": n for (c, d), n in sorted(Counter((t.category, t.domain) for t in tasks).items())},
        "templates": dict(Counter(t.category for t in {t.template_id: t for t in tasks}.values())),
        "prompt_words": {"mean": sum(words) / len(words), "max": max(words)} if words else {},
    }


def _stats_cmd(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    s = stats(_load(args))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    table = Table(title=f"scenarios: {s['num_tasks']} tasks")
    table.add_column("category")
    table.add_column("tasks", justify="right")
    table.add_column("templates", justify="right")
    for c, n in s["categories"].items():
        table.add_row(c, str(n), str(s["templates"].get(c, 0)))
    Console().print(table)
    print("domains:", ", ".join(f"{d}={n}" for d, n in s["domains"].items()))
    print(f"prompt words: mean {s['prompt_words'].get('mean', 0):.1f}, max {s['prompt_words'].get('max', 0)}")
    return 0


def _sample_cmd(args: argparse.Namespace) -> int:
    import random

    tasks = _load(args)
    for t in random.Random(args.seed).sample(tasks, min(args.n, len(tasks))):
        if args.json:
            print(json.dumps(t.to_dict()))
        else:
            print(f"[{t.category}/{t.domain}] {t.template_id}: {t.prompt}")
    return 0


def _export_cmd(args: argparse.Namespace) -> int:
    from mosaic_ray.scenarios import write_tasks

    tasks = _load(args)
    path = write_tasks(tasks, args.out)
    print(f"wrote {len(tasks)} tasks to {path}")
    return 0


def register(subparsers: Any) -> None:
    """Add `mosaic-ray scenarios`."""
    p = subparsers.add_parser("scenarios", help="inspect and export scenario suites")
    sub = p.add_subparsers(dest="scenarios_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--split", default="test", choices=["train", "test"])
        q.add_argument("--size", type=int, default=None, help="number of tasks (default 2400 train / 480 test)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--domain", action="append", default=[], help="restrict to a domain (repeatable)")
        q.add_argument("--category", action="append", default=[], help="restrict to a category (repeatable)")

    s = sub.add_parser("stats", help="counts per category / domain / template")
    common(s)
    s.add_argument("--input", default=None, help="a .parquet or .jsonl task file instead of the built-in suite")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_stats_cmd)
    s = sub.add_parser("sample", help="print a few tasks")
    common(s)
    s.add_argument("--input", default=None)
    s.add_argument("-n", type=int, default=5)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_sample_cmd)
    s = sub.add_parser("export", help="write tasks to .parquet or .jsonl")
    common(s)
    s.add_argument("--out", required=True, help="output path ending in .parquet or .jsonl")
    s.set_defaults(func=_export_cmd)
