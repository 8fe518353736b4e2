"""`mosaic-ray report`: tables of evaluation results as JSON, Markdown and one PNG.

Two shapes:
- **side by side** (`report RESULT.json ...`): one row per result file, one column per metric it has.
- **paper table** (`report --before A --after B`, or `--run-dir D`): one row per paper metric — harmful refusal,
  harm score, injection ASR and utility under attack, benign success, over-refusal, leak rate, BFCL accuracy,
  over every suite present (internal, file:PATH, AgentDojo per attack, BFCL, AgentHarm, PrivacyLens) — and
  columns before / after / change / better. A side is a result JSON, an `eval --out DIR` directory, or (with
  `--run-dir`) a training run's `eval/{before,after}.json` plus its `eval_suites/{before,after}/`.

Inputs are the JSON files `mosaic-ray eval --out` writes (any dict with a `suite` and some metric keys, at top
level or under `overall`). Results judged by a non-official judge are footnoted as such.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mosaic_ray.errors import UserError

METRICS = ("utility", "utility_under_attack", "attack_success_rate", "accuracy", "refusal_rate", "format_error_rate",
           "harm_score", "benign_score", "leak_rate", "helpfulness", "harmful_refusal_rate", "injection_success_rate",
           "benign_success_rate", "over_refusal_rate", "privacy_leak_rate")
"""Rates in [0, 1] shown when a result has them; columns nobody has are dropped."""


def row(result: dict[str, Any], source: str) -> dict[str, Any]:
    """One table row: where it came from, what ran, and each known rate (None when absent)."""
    flat = {**result.get("overall", {}), **result} if isinstance(result.get("overall"), dict) else result
    suite = str(flat.get("suite", flat.get("split", "?")))
    name = suite if ":" in suite else f"{flat.get('benchmark', 'internal')}:{suite}"
    if flat.get("attack"):
        name += f" [{flat['attack']}]"
    values = {m: flat.get(m) for m in METRICS}
    return {"suite": name, "policy": flat.get("policy", "?"), "source": source,
            **{m: (float(v) if isinstance(v, (int, float)) else None) for m, v in values.items()}}


def report(inputs: list[str], out_dir: str) -> dict[str, Any]:
    """Table `inputs` (result JSON paths) into `out_dir`/report.{json,md,png}; returns the JSON table."""
    if not inputs:
        raise ValueError("report: no result files given")
    rows = []
    for path in inputs:
        rows.append(row(_read(path), str(path)))
    columns = [m for m in METRICS if any(r[m] is not None for r in rows)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = {"columns": ["suite", "policy", *columns], "rows": rows}
    (out / "report.json").write_text(json.dumps(table, indent=2))
    (out / "report.md").write_text(markdown(rows, columns))
    plot(rows, columns, out / "report.png")
    return table


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = ["suite", "policy", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["suite"], r["policy"], *("" if r[c] is None else f"{r[c]:.3f}" for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    """Grouped bars: one group per (suite, policy), one bar per metric it has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows)), 4.0))
    width = 0.8 / max(1, len(columns))
    for j, metric in enumerate(columns):
        xs = [i + j * width for i, r in enumerate(rows) if r[metric] is not None]
        ys = [r[metric] for r in rows if r[metric] is not None]
        ax.bar(xs, ys, width, label=metric)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['suite']}\n{r['policy']}" for r in rows], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["METRICS", "PAPER_ROWS", "load_side", "markdown", "paper_markdown", "paper_report", "paper_table", "plot",
           "report", "row", "suite_key"]


# ------------------------------------------------------------------------------------------------ paper table

PAPER_ROWS: tuple[tuple[str, str, str, str], ...] = (
    # (suite kind, metric key, label, better)
    ("agentharm:harmful", "refusal_rate", "harmful refusal rate", "up"),
    ("agentharm:harmful", "harm_score", "harm score", "down"),
    ("agentharm:harmful", "non_refusal_harm_score", "harm score when not refusing", "down"),
    ("agentharm:benign", "benign_score", "benign score", "up"),
    ("agentharm:benign", "refusal_rate", "over-refusal (benign refusal rate)", "down"),
    ("agentharm:chat", "refusal_rate", "harmful chat refusal rate", "up"),
    ("agentdojo", "attack_success_rate", "injection ASR", "down"),
    ("agentdojo", "utility_under_attack", "utility under attack", "up"),
    ("agentdojo", "utility", "benign success (utility)", "up"),
    ("bfcl", "accuracy", "BFCL accuracy", "up"),
    ("privacylens", "leak_rate", "leak rate", "down"),
    ("privacylens", "leak_rate_string_match", "leak rate, string match (lower bound)", "down"),
    ("privacylens", "helpfulness", "helpfulness", "up"),
    ("internal", "harmful_refusal_rate", "harmful refusal rate", "up"),
    ("internal", "injection_success_rate", "injection ASR", "down"),
    ("internal", "benign_success_rate", "benign success", "up"),
    ("internal", "over_refusal_rate", "over-refusal", "down"),
    ("internal", "privacy_leak_rate", "leak rate", "down"),
)
"""The paper's metrics per suite kind, in table order; `internal` rows also serve `file:PATH` suites."""


def suite_key(result: dict[str, Any]) -> tuple[str, str]:
    """(kind for PAPER_ROWS, display name) of one result, e.g. ("agentdojo", "agentdojo:banking [important_…]")."""
    bench = result.get("benchmark")
    suite = str(result.get("suite") or "internal:test")
    if bench == "agentharm":
        return f"agentharm:{suite}", f"agentharm:{suite} ({result.get('split', '?')})"
    if bench == "agentdojo":
        return "agentdojo", f"agentdojo:{suite}" + (f" [{result['attack']}]" if result.get("attack") else "")
    if bench in ("bfcl", "privacylens"):
        return bench, bench if bench == "privacylens" else f"bfcl:{suite}"
    return "internal", suite


def load_side(path: str, side: str | None = None) -> dict[str, dict[str, Any]]:
    """Results of one side by display name: a JSON file, an `eval --out` directory, or a run directory."""
    root = Path(path)
    if root.is_dir() and (root / "config.yaml").is_file() and side is not None:  # a training run
        files = [root / "eval" / f"{side}.json", *sorted((root / "eval_suites" / side).glob("*.json"))]
        files = [f for f in files if f.is_file()]
    elif root.is_dir():
        files = [f for f in sorted(root.glob("*.json")) if f.name not in ("summary.json", "report.json")]
    else:
        files = [root]
    if not files:
        raise ValueError(f"report: {path} holds no result JSON files")
    out = {}
    for f in files:
        result = _read(str(f))
        out[suite_key(result)[1]] = result
    return out


def _read(path: str) -> dict[str, Any]:
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"report: cannot read result JSON {path}: {exc}") from None
    if not isinstance(result, dict):  # bad file content, not a caller's type error
        raise ValueError(f"report: {path} holds {type(result).__name__}, expected a JSON object")  # noqa: TRY004
    if result.get("complete") is False:
        raise ValueError(f"report: {path} is not a complete result")
    return result


def _value(result: dict[str, Any] | None, key: str) -> float | None:
    if result is None:
        return None
    src = {**result.get("overall", {}), **result} if isinstance(result.get("overall"), dict) else result
    v = src.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def paper_table(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rows = paper metrics over every suite either side has; columns before / after / change / better."""
    names = list(dict.fromkeys([*before, *after]))
    kinds = {n: suite_key(after.get(n) or before[n])[0] for n in names}
    rows = []
    for kind, key, label, better in PAPER_ROWS:
        for name in names:
            if kinds[name] != kind:
                continue
            b, a = _value(before.get(name), key), _value(after.get(name), key)
            if b is None and a is None:
                continue
            rows.append({"metric": label, "suite": name, "key": key, "better": better, "before": b, "after": a,
                         "change": None if a is None or b is None else round(a - b, 4)})
    notes = sorted({f"{n}: {r['judge_note']}" for side in (before, after) for n, r in side.items()
                    if r.get("judge_official") is False})
    return {"columns": ["metric", "suite", "better", "before", "after", "change"], "rows": rows, "notes": notes}


def paper_markdown(table: dict[str, Any]) -> str:
    arrow = {"up": "↑", "down": "↓"}
    fmt = (lambda v: "" if v is None else f"{v:.3f}")
    lines = ["| metric | suite | better | before | after | change |", "|---|---|---|---|---|---|"]
    for r in table["rows"]:
        change = "" if r["change"] is None else f"{r['change']:+.3f}"
        lines.append(f"| {r['metric']} | {r['suite']} | {arrow[r['better']]} | {fmt(r['before'])} | "
                     f"{fmt(r['after'])} | {change} |")
    if table["notes"]:
        lines += ["", *(f"* {n}" for n in table["notes"])]
    return "\n".join(lines) + "\n"


def paper_plot(table: dict[str, Any], path: Path) -> None:
    """Horizontal bars: before and after for each row."""
    plt = _pyplot()
    rows = table["rows"]
    fig, ax = plt.subplots(figsize=(9.0, max(2.5, 0.38 * len(rows) + 1)))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r["before"] or 0 for r in rows], 0.4, label="before")
    ax.barh([y - 0.2 for y in ys], [r["after"] or 0 for r in rows], 0.4, label="after")
    ax.set_yticks(list(ys), [f"{r['metric']} ({'↑' if r['better'] == 'up' else '↓'}) — {r['suite']}" for r in rows],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def paper_report(before: str, after: str, out_dir: str, *, run_dir: bool = False) -> dict[str, Any]:
    """Write `out_dir`/paper.{json,md,png}; returns the table."""
    table = paper_table(load_side(before, "before" if run_dir else None), load_side(after, "after" if run_dir else None))
    if not table["rows"]:
        raise ValueError(f"report: no paper metric in {before} or {after}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper.json").write_text(json.dumps(table, indent=2))
    (out / "paper.md").write_text(paper_markdown(table))
    paper_plot(table, out / "paper.png")
    return table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _report_cmd(args: Any) -> int:
    try:
        if args.run_dir or args.before or args.after:
            if args.results:
                raise ValueError("give result files, or --before/--after (or --run-dir), not both")
            before, after = (args.run_dir, args.run_dir) if args.run_dir else (args.before, args.after)
            if not before or not after:
                raise ValueError("a before/after table needs both --before and --after (or --run-dir)")
            paper_report(before, after, args.out, run_dir=bool(args.run_dir))
            stem = "paper"
        else:
            if not args.results:
                raise ValueError("give result JSON files, or --before A --after B, or --run-dir D")
            report(args.results, args.out)
            stem = "report"
    except UserError:
        raise
    except ValueError as exc:  # a missing or bad result file: one line (mosaic_ray.cli), exit 2, no traceback
        raise UserError(f"report: {exc}") from None
    print((Path(args.out) / f"{stem}.md").read_text(), end="")
    for ext in ("md", "json", "png"):
        print(f"wrote {Path(args.out) / f'{stem}.{ext}'}")
    return 0


def register(subparsers: Any) -> None:
    """Add `mosaic-ray report`."""
    p = subparsers.add_parser("report", help="table eval results: side by side, or the paper's before/after table")
    p.add_argument("results", nargs="*", help="result JSON files written by `mosaic-ray eval --out` (side by side)")
    p.add_argument("--before", default=None, help="results before training: a JSON file or an `eval --out` directory")
    p.add_argument("--after", default=None, help="results after training (same forms as --before)")
    p.add_argument("--run-dir", default=None,
                   help="a training run: its eval/{before,after}.json and eval_suites/{before,after}/ results")
    p.add_argument("--out", default="report", help="output directory (default ./report)")
    p.set_defaults(func=_report_cmd)
