"""BFCL (Berkeley Function-Calling Leaderboard, `bfcl-eval` wheel data) through the project's call format.

Each test entry's chat and functions are shown to a project policy, which writes one MOSAIC turn as text. The
text is read back with the protocol (`benchmarks.calls.parse_calls`: one `<tool_call>` block per call, so the
parallel categories can make several calls in one turn), turned into BFCL's decoded form
`[{"func": {"arg": value}}]`, and graded by BFCL's own `ast_checker`. (Ir)relevance follows BFCL's rule: success
iff the turn does (relevance) / does not (irrelevance) decode to at least one call — a final answer or a `refuse`
call is an abstention.

Categories: the Python AST ones (`simple` = simple_python, multiple, parallel, parallel_multiple and their live_*
twins) and `irrelevance` / `live_irrelevance` / `live_relevance`. Not here: java/javascript (other languages),
multi_turn (stateful simulators), web_search and memory (need the network / HF weights).

`bfcl_eval` is imported lazily (its checker module pulls every model client BFCL knows); install it with
`scripts/install_bfcl.sh`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mosaic_ray.benchmarks import calls, harness

from mosaic_ray.driver.agent import EngineAgent

AST_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple",
                  "live_parallel", "live_parallel_multiple")
RELEVANCE_CATEGORIES = ("irrelevance", "live_irrelevance", "live_relevance")
CATEGORIES = AST_CATEGORIES + RELEVANCE_CATEGORIES
ALIASES = {"simple": "simple_python"}
CHECKER_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
"""A BFCL model key whose config keeps dotted function names (the checker only uses it to mangle names)."""
_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": None}


def _bfcl():
    """Import bfcl_eval with its project root (it creates result/ and score/ there) in a private temp dir."""
    os.environ.setdefault("BFCL_PROJECT_ROOT", str(Path(tempfile.gettempdir()) / "mosaic-ray-bfcl"))
    try:
        import bfcl_eval
    except ImportError as exc:
        raise RuntimeError("bfcl: bfcl-eval is not installed; run scripts/install_bfcl.sh") from exc
    return bfcl_eval


def load_category(category: str) -> tuple[list[dict], dict[str, list]]:
    """Entries of one category (JSON lines in the wheel) and its possible answers by id (empty for relevance)."""
    name = ALIASES.get(category, category)
    if name not in CATEGORIES:
        raise ValueError(f"bfcl: unknown category {category!r}; choose one of {('simple',) + CATEGORIES}")
    data = Path(_bfcl().__file__).parent / "data"
    entries = [json.loads(line) for line in (data / f"BFCL_v4_{name}.json").read_text().splitlines() if line.strip()]
    answers_file = data / "possible_answer" / f"BFCL_v4_{name}.json"
    answers = {}
    if name in AST_CATEGORIES:
        answers = {a["id"]: a["ground_truth"] for a in map(json.loads, answers_file.read_text().splitlines())}
    return entries, answers


def json_schema(bfcl_schema: Any) -> Any:
    """BFCL's parameter schema (types dict/float/tuple/any) → JSON Schema, recursively."""
    if isinstance(bfcl_schema, list):
        return [json_schema(s) for s in bfcl_schema]
    if not isinstance(bfcl_schema, dict):
        return bfcl_schema
    out = {}
    for key, value in bfcl_schema.items():
        if key == "type" and isinstance(value, str):
            mapped = _TYPES.get(value, value)
            if mapped is not None:
                out["type"] = mapped
        elif key == "properties" and isinstance(value, dict):
            out[key] = {k: json_schema(v) for k, v in value.items()}
        else:
            out[key] = json_schema(value)
    return out


def tool_schemas(entry: dict) -> list[dict]:
    return [{"type": "function", "function": {"name": f["name"], "description": f.get("description", ""),
                                              "parameters": json_schema(f.get("parameters", {}))}}
            for f in entry["function"]]


# ------------------------------------------------------------------------------------------------ policies


def _pick(allowed_by_key: dict[str, list]) -> dict[str, Any]:
    """{arg: allowed values} → {arg: first allowed value}; "" first means optional (omitted). Nested dict values
    follow the same shape in BFCL's answers, so they are picked recursively (a few nested values are already
    plain values, not lists of allowed values: those are kept as they are)."""
    out = {}
    for key, allowed in allowed_by_key.items():
        if not isinstance(allowed, list):
            out[key] = _concrete(allowed)
        elif allowed and allowed[0] != "":
            out[key] = _concrete(allowed[0])
    return out


def _concrete(value: Any) -> Any:
    if isinstance(value, dict):
        return _pick(value)
    if isinstance(value, list):
        return [_concrete(v) if isinstance(v, dict) else v for v in value]
    return value


def answer_calls(possible_answer: list[dict]) -> list[tuple[str, dict]]:
    """One concrete call per ground-truth call."""
    return [(name, _pick(params)) for call in possible_answer for name, params in call.items()]


class GroundTruthPolicy:
    """Replays BFCL's possible answers through the call format (abstains where no answer exists)."""

    name = "ground_truth"

    def act(self, messages: list[dict], tools: list[dict], possible_answer: list[dict] | None) -> str:
        if not possible_answer:
            return calls.answer_text("None of the provided functions fits this request.")
        return calls.tool_calls_text(answer_calls(possible_answer))


class NeverCallPolicy:
    """Always answers in text: the abstention baseline (irrelevance 1.0, every AST category 0)."""

    name = "never_call"

    def act(self, messages: list[dict], tools: list[dict], possible_answer: list[dict] | None) -> str:
        return calls.answer_text("I can't do that with the functions I have.")


class NaivePolicy:
    """Complies with everything: BFCL's answer where one exists, else the first function with placeholder arguments
    (so it fails every irrelevance entry)."""

    name = "naive"

    def act(self, messages: list[dict], tools: list[dict], possible_answer: list[dict] | None) -> str:
        if possible_answer:
            return calls.tool_calls_text(answer_calls(possible_answer))
        fn = tools[0]["function"]
        props = fn["parameters"].get("properties", {})
        return calls.tool_call_text(fn["name"], {k: _placeholder(v) for k, v in props.items()})


def _placeholder(schema: dict) -> Any:
    return {"integer": 1, "number": 1.0, "boolean": True, "array": [], "object": {}}.get(schema.get("type"), "x")


class RefusePolicy:
    """`over_refuse`: calls `refuse` on every entry (an abstention: irrelevance 1.0, every AST category 0)."""

    name = "over_refuse"

    def act(self, messages: list[dict], tools: list[dict], possible_answer: list[dict] | None) -> str:
        return calls.tool_call_text("refuse", {"reason": "I will not act on this request."})


SCRIPTED = {"ground_truth": GroundTruthPolicy, "naive": NaivePolicy, "never_call": NeverCallPolicy,
            "over_refuse": RefusePolicy}


def make_policy(policy_spec: str):
    kind, arg = calls.split_spec(policy_spec)
    if kind == "model":
        raise ValueError(f"bfcl: --policy {policy_spec!r} runs through run_suite (it starts the model's engines)")
    if arg not in SCRIPTED:
        raise ValueError(f"bfcl: unknown scripted policy {arg!r} in --policy {policy_spec!r}; "
                         f"choose one of {sorted(SCRIPTED)} or model:DIR")
    return SCRIPTED[arg]()


# ------------------------------------------------------------------------------------------------ grading


@dataclass
class EntryResult:
    id: str
    correct: bool
    num_calls: int
    kind: str
    """tool_call | answer | refuse | format_error (the protocol's verdict on the turn)"""
    error: str | None


def decode(text: str, tools: list[dict]) -> tuple[list[dict], str, str | None]:
    """Turn text → (BFCL decoded calls, turn kind, first error). Any format error voids the whole turn's calls."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    turns = calls.parse_calls(text, schemas)
    bad = next((t for t in turns if t.kind == "format_error"), None)
    if bad is not None:
        return [], "format_error", bad.error
    decoded = [{t.tool: dict(t.arguments or {})} for t in turns if t.kind == "tool_call"]
    return decoded, ("tool_call" if decoded else turns[0].kind), None


def grade(entry: dict, text: str, possible_answer: list | None, category: str) -> EntryResult:
    tools = tool_schemas(entry)
    decoded, kind, error = decode(text, tools)
    if category in RELEVANCE_CATEGORIES:
        correct = (not decoded) if "irrelevance" in category else bool(decoded)
        return EntryResult(entry["id"], correct, len(decoded), kind, error)
    if not decoded:
        return EntryResult(entry["id"], False, 0, kind, error or "no function call")
    _bfcl()
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker

    verdict = ast_checker(entry["function"], decoded, possible_answer, Language.PYTHON, category, CHECKER_MODEL)
    return EntryResult(entry["id"], bool(verdict["valid"]), len(decoded), kind,
                       None if verdict["valid"] else "; ".join(map(str, verdict.get("error", []))))


def run_suite(policy_spec: str, category: str, *, attack: str | None = None, limit: int | None = None,
              out: str | None = None, agent: EngineAgent | None = None, **_: Any) -> dict[str, Any]:
    """Score one policy on one BFCL category; returns (and writes to `out`) a report with `accuracy`.
    (`attack` exists for the shared `eval` signature; BFCL has no attacks.) `model:DIR` runs on `agent` (started
    here and closed after when not given), every entry at once so the engine batches them. With `out`, each
    entry is kept in `<out>.cases.jsonl` and a rerun skips the finished ones."""
    if attack is not None:
        raise ValueError(f"bfcl: --attack {attack!r} given, but BFCL has no attacks (they are AgentDojo's)")
    name = ALIASES.get(category, category)
    entries, answers = load_category(name)
    entries = entries[: limit if limit is not None else None]
    kind, arg = calls.split_spec(policy_spec)
    policy = make_policy(policy_spec) if kind == "scripted" else None
    own_agent = kind == "model" and agent is None
    if own_agent:
        agent = EngineAgent.start(arg)
    store = harness.CaseStore(out, {"benchmark": "bfcl", "suite": name, "policy": policy_spec})
    t0 = time.perf_counter()

    async def one(entry: dict) -> dict[str, Any]:
        messages = [{"role": m["role"], "content": m["content"]} for m in entry["question"][0]]
        tools = tool_schemas(entry)
        if policy is not None:
            text = policy.act(messages, tools, answers.get(entry["id"]))
        else:
            text = await agent.turn(messages, tools, session_id=entry["id"])
        return {**asdict(grade(entry, text, answers.get(entry["id"]), name)), "text": text}

    try:
        harness.run_cases(store, entries, lambda e: e["id"], one, desc=f"bfcl:{name}")
    finally:
        store.close()
        if own_agent:
            agent.close()
    results = [EntryResult(**{k: v for k, v in store.records[e["id"]].items() if k not in ("case_id", "text")})
               for e in entries]
    n = len(results)
    report = {
        "benchmark": "bfcl",
        "suite": name,
        "policy": policy_spec,
        "accuracy": sum(r.correct for r in results) / n if n else None,
        "format_error_rate": sum(r.kind == "format_error" for r in results) / n if n else None,
        "refusal_rate": sum(r.kind == "refuse" for r in results) / n if n else None,
        "counts": {"entries": n, "correct": sum(r.correct for r in results),
                   "format_errors": sum(r.kind == "format_error" for r in results),
                   "abstentions": sum(r.kind in ("answer", "refuse") for r in results)},
        "seconds": round(time.perf_counter() - t0, 3),
        "entries": [asdict(r) for r in results],
    }
    return store.finish(report)


__all__ = [
    "CATEGORIES",
    "SCRIPTED",
    "EntryResult",
    "GroundTruthPolicy",
    "NaivePolicy",
    "NeverCallPolicy",
    "RefusePolicy",
    "answer_calls",
    "decode",
    "grade",
    "json_schema",
    "load_category",
    "make_policy",
    "run_suite",
    "tool_schemas",
]
