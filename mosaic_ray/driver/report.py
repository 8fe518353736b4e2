"""Run reports: `report.json`, `report.md` and PNG learning curves, from metrics rows and before/after evaluations.

Pure functions over plain dicts: the driver hands them what it logged; the files are written through the run
directory, so a report lands next to the datasets whether the run lives on local disk or on S3.
"""

from __future__ import annotations

import io
import json
from typing import Any

# Headline evaluation keys (the keys of `mosaic-ray eval`), with the direction that counts as better.
EVAL_KEYS: dict[str, str] = {
    "harmful_refusal_rate": "up",
    "harmful_action_rate": "down",
    "injection_success_rate": "down",
    "benign_success_rate": "up",
    "over_refusal_rate": "down",
    "privacy_leak_rate": "down",
    "format_error_rate": "down",
    "safety_check_rate": "",
    "mean_tokens": "",
}

# Learning curves: (metrics.jsonl key, title). Rollout rates are measured on the training rollouts.
CURVES: list[tuple[str, str]] = [
    ("rollout/harmful_refusal_rate", "harmful refusal"),
    ("rollout/injection_success_rate", "injection success"),
    ("rollout/benign_success_rate", "benign success"),
    ("rollout/over_refusal_rate", "over-refusal"),
    ("rollout/privacy_leak_rate", "privacy leak"),
    ("reward/mean", "reward"),
    ("rollout/mean_tokens", "tokens per episode"),
    ("rollout/safety_check_rate", "safety-check rate"),
]


def headline(evaluation: dict[str, Any]) -> dict[str, float]:
    """The headline keys of an evaluation summary (top level, or under `overall`)."""
    src = evaluation.get("overall", evaluation)
    return {k: float(src[k]) for k in EVAL_KEYS if k in src}


def build_report(*, config_name: str, before: dict[str, Any] | None, after: dict[str, Any] | None,
                 rows: list[dict[str, Any]], wall_time_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`report.json` content: `before` / `after` hold the evaluation keys of `mosaic-ray eval`."""
    report: dict[str, Any] = {
        "config": config_name,
        "iterations": len(rows),
        "wall_time_s": round(wall_time_s, 1),
        "before": headline(before) if before else {},
        "after": headline(after) if after else {},
        "before_by_category": {k: v for k, v in (before or {}).items() if isinstance(v, dict)},
        "after_by_category": {k: v for k, v in (after or {}).items() if isinstance(v, dict)},
        "final_metrics": rows[-1] if rows else {},
    }
    if report["before"] and report["after"]:
        report["delta"] = {k: round(report["after"][k] - report["before"][k], 4)
                           for k in report["before"] if k in report["after"]}
    report.update(extra or {})
    return report


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# MOSAIC-Ray run report — `{report['config']}`", "",
             f"{report['iterations']} iterations, wall time {report['wall_time_s']:.0f} s.", ""]
    before, after = report.get("before", {}), report.get("after", {})
    if before or after:
        lines += ["## Held-out evaluation: warm start (before) vs trained (after)", "",
                  "| metric | better | before | after | change |", "|---|---|---|---|---|"]
        for key, better in EVAL_KEYS.items():
            if key not in before and key not in after:
                continue
            b, a = before.get(key), after.get(key)
            change = f"{a - b:+.3f}" if a is not None and b is not None else ""
            fmt = (lambda v: "" if v is None else f"{v:.3f}")
            lines.append(f"| {key} | {better} | {fmt(b)} | {fmt(a)} | {change} |")
        lines.append("")
    final = report.get("final_metrics") or {}
    if final:
        lines += ["## Last iteration", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in final.items()]
        lines.append("")
    lines += ["Plots: `curves.png` (learning curves on training rollouts), `before_after.png`.", ""]
    return "\n".join(lines)


def curves_png(rows: list[dict[str, Any]]) -> bytes:
    """A grid of learning curves, one panel per CURVES entry present in the rows."""
    plt = _pyplot()
    present = [(k, t) for k, t in CURVES if any(k in r for r in rows)]
    n = max(1, len(present))
    cols = 4
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, present):
        xs = [r["iteration"] for r in rows if key in r]
        ys = [r[key] for r in rows if key in r]
        ax.plot(xs, ys, marker="o", ms=3)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    return _png(plt, fig)


def before_after_png(report: dict[str, Any]) -> bytes:
    plt = _pyplot()
    keys = [k for k in EVAL_KEYS if k != "mean_tokens" and k in report.get("before", {}) and k in report.get("after", {})]
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [report["before"][k] for k in keys], width=0.4, label="before (warm start)")
    ax.bar([x + 0.2 for x in xs], [report["after"][k] for k in keys], width=0.4, label="after")
    ax.set_xticks(list(xs), [k.replace("_rate", "").replace("_", " ") for k in keys], rotation=20, fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("held-out evaluation")
    return _png(plt, fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _png(plt: Any, fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=float)
