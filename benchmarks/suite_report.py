"""One report over several suites' results: a JSON table, a Markdown table and one PNG, side by side.

Inputs are the JSON files written by `agentdojo.run_suite`, `bfcl.run_suite` or the internal `eval` (any dict
with a `suite` and some of the metric keys below, at top level or under `overall`). Missing metrics are blank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS = ("utility", "utility_under_attack", "attack_success_rate", "accuracy", "refusal_rate", "format_error_rate",
           "harmful_refusal_rate", "injection_success_rate", "benign_success_rate", "over_refusal_rate",
           "privacy_leak_rate")
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
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"report: cannot read result JSON {path}: {exc}") from None
        if not isinstance(result, dict):  # bad file content, not a caller's type error
            raise ValueError(f"report: {path} holds {type(result).__name__}, expected a JSON object")  # noqa: TRY004
        rows.append(row(result, str(path)))
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


__all__ = ["METRICS", "markdown", "plot", "report", "row"]


def _report_cmd(args: Any) -> int:
    table = report(args.results, args.out)
    print((Path(args.out) / "report.md").read_text(), end="")
    print(f"{len(table['rows'])} results tabled in {args.out}/report.{{json,md,png}}")
    return 0


def register(subparsers: Any) -> None:
    """Add `mosaic-ray report RESULT.json ... --out DIR`."""
    p = subparsers.add_parser("report", help="table several eval results (internal, AgentDojo, BFCL) side by side")
    p.add_argument("results", nargs="+", help="result JSON files written by `mosaic-ray eval --out`")
    p.add_argument("--out", default="report", help="output directory for report.json, report.md, report.png")
    p.set_defaults(func=_report_cmd)
