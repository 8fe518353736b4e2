"""`mosaic-ray judge-eval`: measure a judge on held-out pairs against the rubric (`mosaic_ray.judge.evaluate`)
before spending a cluster on it. The judge under test is built here from a config, runnable in this process: an
LLM judge on a local engine (`mosaic_ray.actors.engines.chat.EngineChat`) or over `judge.endpoint`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mosaic_ray.config import MosaicConfig, load_config
from mosaic_ray.judge.base import Judge
from mosaic_ray.judge.evaluate import evaluate_judge, held_out_pairs
from mosaic_ray.judge.llm import HTTPChat, LLMJudge
from mosaic_ray.judge.rubric import RubricJudge

__all__ = ["build_judge_from_config", "print_table", "register"]


def build_judge_from_config(cfg: MosaicConfig) -> tuple[Judge, Callable[[], None]]:
    """The judge `cfg.judge` describes, runnable in this process: the rubric; an LLM judge over `judge.endpoint`;
    or an LLM judge on `judge.model` (default: the policy's model) through a local engine of `engine.kind`.
    Returns (judge, close)."""
    from mosaic_ray.actors.engines.chat import EngineChat  # loads the engines' package: a local judge only

    jc = cfg.judge
    if jc.kind == "rubric":
        return RubricJudge(jc.tie_tolerance_tokens), lambda: None
    if jc.endpoint is not None:
        judge = LLMJudge(HTTPChat.from_config(jc), max_new_tokens=jc.max_new_tokens)
        return judge, judge.close
    from mosaic_ray.models.source import policy_source

    chat = EngineChat.load(jc.model or policy_source(cfg.model), jc.model or cfg.model.path or "tiny", cfg.engine,
                           cfg.model.dtype, cfg.model.cache_dir)
    judge = LLMJudge(chat, max_new_tokens=jc.max_new_tokens)
    return judge, judge.close


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.1f} %" if isinstance(v, float) and v <= 1 else str(v)


def print_table(report: dict[str, Any]) -> None:
    """Agreement, consistency, ties and parse failures, overall and per category, as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    cols = {"pairs": "pairs", "agreement": "agree", "agreement_decisive": "agree (decisive)",
            "position_consistency": "order-consistent", "tie_rate": "ties", "parse_failure_rate": "parse fail"}
    table = Table(title=f"judge-eval: {report['judge']} vs the rubric ({report['overall']['pairs_per_s']} pairs/s)")
    table.add_column("category")
    for header in cols.values():
        table.add_column(header, justify="right")
    for name, block in [("overall", report["overall"]), *report["by_category"].items()]:
        table.add_row(name, *(_fmt(block.get(c)) for c in cols))
    Console().print(table)


def _judge_eval(args: argparse.Namespace) -> int:
    shorthand = {"rubric": ("tiny-cpu", ["judge.kind=rubric"]), "llm": ("tiny-cpu", ["judge.kind=llm"])}
    name, sets = shorthand.get(args.judge, (args.judge, []))
    cfg = load_config(name, [*sets, *args.set])
    pairs = held_out_pairs(args.pairs, seed=args.seed)
    judge, close = build_judge_from_config(cfg)
    try:
        report = evaluate_judge(judge, pairs, on_pair=lambda k: print(f"\rjudged {k}/{len(pairs)} pairs", end="",
                                                                       flush=True) if k % 10 == 0 else None)
    finally:
        close()
    print()
    report["config"] = {"judge": args.judge, "set": list(args.set), "model": cfg.judge.model or cfg.model.path}
    print_table(report)
    text = json.dumps(report, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"written to {args.out}")
    else:
        print(text)
    return 0


def register(subparsers: Any) -> None:
    """Add `mosaic-ray judge-eval`."""
    p = subparsers.add_parser("judge-eval", help="measure a judge on held-out pairs against the rubric judge")
    p.add_argument("--judge", default="rubric",
                   help="`rubric`, `llm` (the tiny-cpu preset's model as an LLM judge), or a preset / YAML path "
                        "whose judge section (and model, engine) describe the judge")
    p.add_argument("--pairs", type=int, default=40, help="held-out pairs (balanced over categories)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", default=None, help="write the JSON report here (default: print it)")
    p.set_defaults(func=_judge_eval)
