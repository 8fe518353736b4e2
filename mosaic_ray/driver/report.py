"""Run reports: `report.json`, `report.md` and PNG learning curves, from metrics rows and before/after evaluations.

Pure functions over plain dicts: the driver hands them what it logged; the files are written through the run
directory, so a report lands next to the datasets whether the run lives on local disk or on S3.

Tables of evaluation results (`mosaic-ray report`: side by side, or the paper's before/after table over every
suite) are `mosaic_ray.driver.suite_report`.
"""

from __future__ import annotations

import io
import json
from typing import Any

# Headline evaluation keys (the keys of `mosaic-ray eval`), with the direction that counts as better. The safety
# check should be spent on risky episodes (`safety_gating_ratio` up) without taking over the output (share down).
EVAL_KEYS: dict[str, str] = {
    "harmful_refusal_rate": "up",
    "harmful_action_rate": "down",
    "injection_success_rate": "down",
    "benign_success_rate": "up",
    "over_refusal_rate": "down",
    "privacy_leak_rate": "down",
    "format_error_rate": "down",
    "safety_check_rate": "",
    "safety_check_rate_risky": "up",
    "safety_check_rate_benign": "down",
    "safety_gating_ratio": "up",
    "safety_token_share": "down",
    "mean_tokens": "",
}
RATIO_KEYS = ("safety_gating_ratio", "mean_tokens")
"""Headline keys that are not rates in [0, 1] (left out of the bar chart)."""

MAIN_SPLIT = "templates"
"""The split whose evaluation sits at the top level of the report (`before` / `after` / `delta`)."""
SPLITS: dict[str, str] = {
    "templates": "held-out templates, training domains",
    "domains": "sandbox domains never seen in training",
    "phrasing": "hand-written requests in words no template uses",
}
"""Evaluation split (`train.eval_splits`) → what it holds out."""

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
    ("rollout/safety_token_share", "safety-token share"),
]


def headline(evaluation: dict[str, Any]) -> dict[str, float]:
    """The defined headline keys of an evaluation summary (top level, or under `overall`); a rate with an empty
    denominator (None, e.g. no privacy tasks in the split) is left out."""
    src = evaluation.get("overall", evaluation)
    return {k: float(src[k]) for k in EVAL_KEYS if src.get(k) is not None}


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 4) for k in before if k in after}


def _safety_by_category(evaluation: dict[str, Any] | None) -> dict[str, float]:
    per_cat = (evaluation or {}).get("per_category", {})
    return {c: float(b["safety_check_rate"]) for c, b in per_cat.items() if b.get("safety_check_rate") is not None}


def _split_entry(name: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"description": SPLITS[name], "before": headline(before) if before else {},
                             "after": headline(after) if after else {},
                             "safety_check_rate_by_category": {"before": _safety_by_category(before),
                                                               "after": _safety_by_category(after)}}
    if entry["before"] and entry["after"]:
        entry["delta"] = _delta(entry["before"], entry["after"])
    return entry


def build_report(*, config_name: str, before: dict[str, Any] | None, after: dict[str, Any] | None,
                 rows: list[dict[str, Any]], wall_time_s: float, extra: dict[str, Any] | None = None,
                 splits: dict[str, dict[str, dict[str, Any] | None]] | None = None) -> dict[str, Any]:
    """`report.json` content. `before` / `after` are the main split's (held-out templates) summaries from
    `evaluation.summarize`; their headline keys sit at the top level. `splits` maps each further evaluation split
    (`domains`, `phrasing`) to {"before": summary, "after": summary} (either may be None: not evaluated).
    `report["splits"]` holds every split, the main one first: description, before / after headline, delta, and the
    safety-check rate per category."""
    splits = splits or {}
    for name in splits:
        if name == MAIN_SPLIT:
            raise ValueError(f"build_report: splits names {MAIN_SPLIT!r}, the main split; pass it as before/after")
        if name not in SPLITS:
            raise ValueError(f"build_report: unknown evaluation split {name!r} (known: {', '.join(SPLITS)})")
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
        report["delta"] = _delta(report["before"], report["after"])
    report["splits"] = {MAIN_SPLIT: _split_entry(MAIN_SPLIT, before, after),
                        **{k: _split_entry(k, v.get("before"), v.get("after")) for k, v in splits.items()}}
    report.update(extra or {})
    return report


def _fmt(v: float | None, missing: str = "–") -> str:
    return missing if v is None else f"{v:.3f}"


def _split_markdown(name: str, entry: dict[str, Any]) -> list[str]:
    before, after = entry["before"], entry["after"]
    lines = [f"## Held-out evaluation, `{name}`: warm start (before) vs trained (after)", "",
             f"{entry['description'].capitalize()}.", "",
             "| metric | better | before | after | change |", "|---|---|---|---|---|"]
    for key, better in EVAL_KEYS.items():
        if key not in before and key not in after:
            continue
        b, a = before.get(key), after.get(key)
        change = f"{a - b:+.3f}" if a is not None and b is not None else ""
        lines.append(f"| {key} | {better} | {_fmt(b, '')} | {_fmt(a, '')} | {change} |")
    lines.append("")
    for side, h in (("before", before), ("after", after)):
        if not h:
            continue
        by_cat = entry["safety_check_rate_by_category"][side]
        cats = ", ".join(f"{c} {v:.3f}" for c, v in by_cat.items())
        lines.append(f"- safety check, {side}: {_fmt(h.get('safety_check_rate_risky'))} of harmful+injection steps "
                     f"vs {_fmt(h.get('safety_check_rate_benign'))} of benign steps "
                     f"(ratio {_fmt(h.get('safety_gating_ratio'))}), safety-token share "
                     f"{_fmt(h.get('safety_token_share'))}" + (f"; by category: {cats}" if cats else ""))
    lines.append("")
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# MOSAIC-Ray run report — `{report['config']}`", "",
             f"{report['iterations']} iterations, wall time {report['wall_time_s']:.0f} s.", ""]
    for name, entry in report["splits"].items():
        if entry["before"] or entry["after"]:
            lines += _split_markdown(name, entry)
    final = report.get("final_metrics") or {}
    if final:
        lines += ["## Last iteration", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in final.items()]
        lines.append("")
    lines += ["Plots: `curves.png` (learning curves on training rollouts), `before_after.png` (one panel per split).",
              ""]
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
    """Before/after bars of the headline rates, one panel per split evaluated both before and after training."""
    plt = _pyplot()
    done = [(name, e) for name, e in report["splits"].items() if e["before"] and e["after"]]
    if not done:
        raise ValueError("before_after_png: no evaluation split has both a before and an after evaluation")
    fig, axes = plt.subplots(len(done), 1, figsize=(12, 3.6 * len(done)), squeeze=False)
    for ax, (name, entry) in zip(axes.flat, done):
        keys = [k for k in EVAL_KEYS if k not in RATIO_KEYS and k in entry["before"] and k in entry["after"]]
        xs = range(len(keys))
        ax.bar([x - 0.2 for x in xs], [entry["before"][k] for k in keys], width=0.4, label="before (warm start)")
        ax.bar([x + 0.2 for x in xs], [entry["after"][k] for k in keys], width=0.4, label="after")
        ax.set_xticks(list(xs), [k.replace("_rate", "").replace("_", " ") for k in keys], rotation=20, fontsize=8)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title(f"held-out evaluation: {name} ({entry['description']})")
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
