"""`mosaic-ray eval` and `train.eval_suites`: run a policy on suites, print their tables, write their JSON.

The suites are named and parsed in `mosaic_ray.evaluation` (`--suite` specs, the scripted policies of each suite,
the internal suites' metrics). Here they run: the internal suites (`internal`, `file:PATH`) through
`mosaic_ray.evaluation.evaluate_tasks`, the external ones through their adapter's `run_suite` in
`mosaic_ray.benchmarks`, looked up by name in `SUITE_MODULES` and imported only when asked for (the adapters sit
above the driver: they import it, it never imports them). A `model:DIR` policy runs on one `EngineAgent` shared by
every suite of the command, and `--judge model:DIR` on another.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mosaic_ray.driver.cli  # noqa: F401 - registers the `model:DIR` policy (engines + rollout fleet)
from mosaic_ray.config import MosaicConfig, ProtocolConfig, load_config
from mosaic_ray.episode import DEFAULT_PROTOCOL
from mosaic_ray.errors import UserError
from mosaic_ray.evaluation import (
    DEFAULT_ATTACK,
    EXTERNAL_SUITES,
    PAPER_SUITES,
    SCRIPTED_BY_SUITE,
    SuiteSpec,
    check_policy,
    evaluate_tasks,
    latest_checkpoint,
    parse_suites,
    print_table,
    spread_over_categories,
)
from mosaic_ray.judge.text import TextJudge

if TYPE_CHECKING:  # the agent module loads the engines' package: only a model policy or judge needs it
    from mosaic_ray.driver.agent import EngineAgent

__all__ = ["HEADLINE_BY_SUITE", "SUITE_MODULES", "EvalContext", "print_suite_table", "register", "run_eval_suites",
           "run_one"]

SUITE_MODULES: dict[str, str] = {kind: f"mosaic_ray.benchmarks.{kind}" for kind in EXTERNAL_SUITES}
"""External suite kind → the module of its adapter (its `run_suite(policy, name, **kwargs)` runs the suite)."""


def run_eval_suites(items: tuple[str, ...], agent: EngineAgent, out_dir: str, *,
                    label: str) -> dict[str, dict[str, Any]]:
    """`train.eval_suites` on `agent` (an `EngineAgent` over the run's engines, i.e. the current policy): one
    `<suite>.json` each in `out_dir`; AgentDojo suites run under the default attack (important_instructions)."""
    specs = parse_suites(",".join(items))
    args = argparse.Namespace(limit=None, split=None, attack=DEFAULT_ATTACK, data=None, seed=0,
                              suite_count=len(specs))
    ctx = EvalContext(label, agent.cfg, agent.cfg.protocol, "rules", agent=agent)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return {spec.label: run_one(spec, ctx, args, str(Path(out_dir) / f"{spec.slug}.json")) for spec in specs}


# ------------------------------------------------------------------------------------------------ CLI


@dataclass
class EvalContext:
    """What one `eval` command shares across its suites: the policy, its config, and (lazily) one model agent and
    one text judge."""

    policy: str
    cfg: MosaicConfig
    protocol: ProtocolConfig
    judge_spec: str
    agent: EngineAgent | None = None
    judge: TextJudge | None = None

    def model_agent(self) -> EngineAgent | None:
        """The agent of a `model:DIR` policy, started on first use (None for a scripted policy)."""
        if self.agent is None and self.policy.startswith("model:"):
            from mosaic_ray.driver.agent import EngineAgent

            self.agent = EngineAgent.start(self.policy.partition(":")[2], self.cfg)
        return self.agent

    def text_judge(self) -> TextJudge:
        """The `--judge` of the text-judged suites (AgentHarm, PrivacyLens), built on first use."""
        if self.judge is None:
            from mosaic_ray.driver.agent import make_judge

            self.judge = make_judge(self.judge_spec, self.cfg)
        return self.judge

    def close(self) -> None:
        """Stop the engines of the model agent and of a model judge."""
        for holder in (self.agent, getattr(self.judge, "agent", None)):
            if holder is not None:
                holder.close()


def run_one(spec: SuiteSpec, ctx: EvalContext, args: argparse.Namespace, out: str | None) -> dict[str, Any]:
    """Evaluate `ctx.policy` on one suite; returns the report (also written to `out` when given)."""
    limit = spec.limit if spec.limit is not None else args.limit
    if spec.kind in ("internal", "file"):
        if spec.kind == "file":
            from mosaic_ray.scenarios import read_tasks

            tasks = read_tasks(spec.name)
        else:
            from mosaic_ray.scenarios import load_tasks

            tasks = load_tasks(spec.name, seed=args.seed)
        if limit is not None:
            tasks = spread_over_categories(tasks, limit)
        return evaluate_tasks(ctx.policy, tasks, suite=spec.label, out=out,
                              cfg=replace(ctx.cfg, protocol=ctx.protocol))
    try:
        module = importlib.import_module(SUITE_MODULES[spec.kind])
    except ImportError as e:
        raise UserError(f"eval: suite {spec.label} needs the benchmark extra "
                        f"(pip install 'mosaic-ray[bench]'): {e}") from None
    kwargs: dict[str, Any] = {"limit": limit, "out": out, "agent": ctx.model_agent()}
    if spec.kind == "agentdojo":
        kwargs["attack"] = args.attack
    elif args.attack and spec.kind == "bfcl" and args.suite_count == 1:
        kwargs["attack"] = args.attack  # BFCL says why it has no attacks
    if spec.kind in ("agentharm", "privacylens"):
        kwargs.update(data=args.data, judge=ctx.text_judge())
    if spec.kind == "agentharm":
        kwargs["split"] = args.split if args.split not in ("train", "test") else None
    return module.run_suite(ctx.policy, spec.name, **kwargs)


HEADLINE_BY_SUITE: dict[str, tuple[str, ...]] = {
    "agentharm": ("harm_score", "benign_score", "refusal_rate", "non_refusal_harm_score", "full_score_rate",
                  "num_cases"),
    "privacylens": ("leak_rate", "leak_rate_string_match", "helpfulness", "adjusted_leak_rate", "refusal_rate",
                    "action_rate", "num_cases"),
    "agentdojo": ("utility", "utility_under_attack", "attack_success_rate", "refusal_rate", "format_error_rate"),
    "bfcl": ("accuracy", "refusal_rate", "format_error_rate"),
}
_CATEGORY_KEY = {"harm_score": "score", "benign_score": "score", "non_refusal_harm_score": "non_refusal_score",
                 "benign_refusal_rate": "refusal_rate"}
"""Headline key → its name in AgentHarm's per-category blocks."""


def _cell(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def print_suite_table(report: dict[str, Any], spec: SuiteSpec, policy: str) -> None:
    """One table per external suite: metric / value, or one row per category (and overall) where it has them."""
    from rich.console import Console
    from rich.table import Table

    title = f"{policy} on {spec.label}" + (f" [{report['attack']}]" if report.get("attack") else "")
    keys = [k for k in HEADLINE_BY_SUITE[spec.kind] if report.get(k) is not None]
    per_cat = report.get("per_category") or {}
    table = Table(title=title)
    if per_cat:
        table.add_column("category")
        for key in keys:
            table.add_column(key, justify="right")
        for cat, block in per_cat.items():
            table.add_row(cat, *(_cell(block.get(_CATEGORY_KEY.get(k, k))) for k in keys))
        table.add_row("overall", *(_cell(report[k]) for k in keys))
    else:
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in keys:
            table.add_row(key, _cell(report[key]))
    console = Console()
    console.print(table)
    if report.get("judge_note"):
        console.print(f"judge: {report['judge']} — {report['judge_note']}")


def _eval_cmd(args: argparse.Namespace) -> int:
    try:
        return _run_eval(args)
    except UserError:
        raise
    except ValueError as e:  # bad data, suite, policy or path: one line (mosaic_ray.cli), exit 2, no traceback
        raise UserError(f"eval: {e}") from None


def _run_eval(args: argparse.Namespace) -> int:
    specs = [_with_split(s, args.split) for s in parse_suites(args.suite)]
    args.suite_count = len(specs)
    if (args.policy is None) == (args.run_dir is None):
        raise ValueError("give exactly one of --policy or --run-dir")
    if args.run_dir and args.config:
        raise ValueError("--run-dir evaluates with the run's own config.yaml; --config is for --policy model:DIR")
    if args.run_dir:
        cfg, ckpt = latest_checkpoint(args.run_dir, args.checkpoint)
        cfg = load_config(str(Path(args.run_dir) / "config.yaml"), args.set) if args.set else cfg
        policy, protocol_cfg = f"model:{ckpt}", cfg.protocol
        print(f"policy: model:{ckpt} (newest checkpoint of {args.run_dir})", file=sys.stderr)
    else:
        cfg, policy, protocol_cfg = load_config(args.config or "tiny-cpu", args.set), args.policy, DEFAULT_PROTOCOL
        if args.set or args.config:
            protocol_cfg = cfg.protocol
    for spec in specs:
        check_policy(policy, spec)
    if args.attack is None and "paper" in (args.suite or "").split(","):
        args.attack = DEFAULT_ATTACK
    outs = _out_paths(specs, args.out)
    ctx = EvalContext(policy, cfg, protocol_cfg, args.judge)
    reports = {}
    try:
        for spec, out in zip(specs, outs):
            report = run_one(spec, ctx, args, out)
            reports[spec.label] = report
            if spec.kind in ("internal", "file"):
                print_table(report, f"{policy} on {spec.label}")
            else:
                print_suite_table(report, spec, policy)
            if out:
                print(f"results: {out} (per case: {report.get('cases_file', out + '.cases.jsonl')})")
    finally:
        ctx.close()
    if len(specs) > 1 and args.out:
        summary = Path(args.out) / "summary.json"
        summary.write_text(json.dumps({"policy": policy, "suites": {k: str(o) for k, o in zip(reports, outs)}},
                                      indent=2))
        print(f"summary: {summary}  (table before/after with: mosaic-ray report --before DIR --after DIR)")
    return 0


def _with_split(spec: SuiteSpec, split: str | None) -> SuiteSpec:
    """The internal suite names its split (train|test; `--split`, default test)."""
    if spec.kind != "internal":
        return spec
    name = spec.name or (split if split in ("train", "test") else None if split else "test")
    if name not in ("train", "test"):
        raise ValueError(f"--suite {spec.label}: the internal split is train or test, got {spec.name or split!r}")
    return SuiteSpec("internal", name, spec.limit)


def _out_paths(specs: list[SuiteSpec], out: str | None) -> list[str | None]:
    """One suite: `--out` is its JSON file. Several: `--out` is a directory holding `<suite>.json` each."""
    if len(specs) == 1:
        return [out]
    if out is None:
        raise ValueError("several suites need --out DIR (one <suite>.json each, plus summary.json)")
    Path(out).mkdir(parents=True, exist_ok=True)
    return [str(Path(out) / f"{s.slug}.json") for s in specs]


def _policies_help() -> str:
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in SCRIPTED_BY_SUITE.items())


def register(subparsers: Any) -> None:
    """Add `mosaic-ray eval`."""
    p = subparsers.add_parser(
        "eval", help="evaluate a policy on one or more suites",
        description="Evaluate a policy on scenario suites and external benchmarks. Each suite prints a table; "
                    "--out keeps per-case records (<out>.cases.jsonl, resumable) and the summary JSON.",
        epilog=f"scripted policies by suite — {_policies_help()}; model:DIR works in every suite. "
               f"Example (all paper axes): mosaic-ray eval --run-dir runs/X --suite paper --out results/after")
    p.add_argument("--policy", default=None,
                   help="scripted:NAME (naive and over_refuse in every suite; see below) or model:DIR")
    p.add_argument("--run-dir", default=None,
                   help="evaluate the newest checkpoint of this training run (model:DIR with the run's config: "
                        "model family, protocol budgets, engine kind, dtype)")
    p.add_argument("--checkpoint", default=None, metavar="iter-N",
                   help="with --run-dir: this checkpoint (a name under checkpoints/) instead of the newest")
    p.add_argument("--config", default=None,
                   help="with --policy model:DIR: the preset or YAML whose model family, engine and protocol the "
                        "model runs with (default tiny-cpu); --set overrides keys, e.g. --set engine.kind=vllm")
    p.add_argument("--suite", default=None,
                   help="comma list of internal[:train|test], file:PATH (.jsonl/.parquet task file), "
                        "agentharm[:harmful|benign|chat], privacylens, agentdojo:SUITE, bfcl:CATEGORY, each with an "
                        f"optional @LIMIT; or paper (= {PAPER_SUITES})")
    p.add_argument("--split", default=None,
                   help="internal: train|test (default test); agentharm: validation|test_public (default validation)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N cases per suite (an @N wins)")
    p.add_argument("--seed", type=int, default=0, help="task generation seed (internal suite)")
    p.add_argument("--attack", default=None, help="AgentDojo attack, e.g. important_instructions")
    p.add_argument("--data", default=None,
                   help="AgentHarm / PrivacyLens data: the benchmark's directory or a root holding agentharm/ and "
                        "privacylens/ (default $MOSAIC_DATA_DIR/<name>, else ../shared/data/<name>)")
    p.add_argument("--judge", default="rules",
                   help="judge of plain-text refusals, AgentHarm semantic checks and PrivacyLens leaks: rules "
                        "(offline fallback, labelled non-official) or model:DIR")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the model policy (e.g. engine.kind=vllm)")
    p.add_argument("--out", default=None, help="JSON report path (one suite) or directory (several suites)")
    p.set_defaults(func=_eval_cmd)
