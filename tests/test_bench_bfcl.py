"""BFCL through the project's call format, graded by BFCL's own checkers."""

from __future__ import annotations

import pytest

pytest.importorskip("bfcl_eval", reason="bfcl-eval is not installed: run scripts/install_bfcl.sh")

from mosaic_ray.benchmarks import bfcl, calls


@pytest.mark.parametrize("category", ["simple", "multiple", "parallel"])
def test_replayed_answers_pass_bfcl_checker(category):
    report = bfcl.run_suite("scripted:ground_truth", category, limit=50)
    assert report["counts"]["entries"] == 50
    assert report["accuracy"] >= 0.99, [e for e in report["entries"] if not e["correct"]]


def test_parallel_turn_carries_several_calls():
    report = bfcl.run_suite("scripted:ground_truth", "parallel", limit=5)
    assert all(e["num_calls"] >= 2 for e in report["entries"])


def test_checker_rejects_a_wrong_argument():
    entries, answers = bfcl.load_category("simple")
    entry = entries[0]
    (name, args), = bfcl.answer_calls(answers[entry["id"]])
    good = bfcl.grade(entry, calls.tool_call_text(name, args), answers[entry["id"]], "simple_python")
    key = next(k for k, v in args.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    bad = bfcl.grade(entry, calls.tool_call_text(name, {**args, key: args[key] + 7}), answers[entry["id"]],
                     "simple_python")
    assert good.correct and not bad.correct and bad.error


def test_never_call_abstains():
    assert bfcl.run_suite("scripted:never_call", "irrelevance", limit=50)["accuracy"] == 1.0
    assert bfcl.run_suite("scripted:never_call", "simple", limit=20)["accuracy"] == 0.0


def test_parse_calls_splits_blocks_and_keeps_format_errors():
    text = calls.tool_calls_text([("f", {"x": 1}), ("g", {"y": "a"})])
    turns = calls.parse_calls(text, {"f": {"type": "object", "properties": {"x": {"type": "integer"}}},
                                     "g": {"type": "object", "properties": {"y": {"type": "string"}}}})
    assert [(t.kind, t.tool, t.arguments) for t in turns] == [("tool_call", "f", {"x": 1}), ("tool_call", "g", {"y": "a"})]
    assert calls.parse_calls(text.replace("</tool_call>", "", 1), None)[0].kind == "format_error"
    decoded, kind, error = bfcl.decode(calls.tool_call_text("f", {"x": "one"}),
                                       [{"function": {"name": "f", "parameters": {"type": "object",
                                                                                  "properties": {"x": {"type": "integer"}}}}}])
    assert decoded == [] and kind == "format_error" and "must be integer" in error


def test_bad_inputs_name_what_is_wrong():
    with pytest.raises(ValueError, match="unknown category 'web_search'"):
        bfcl.run_suite("scripted:ground_truth", "web_search")
    with pytest.raises(ValueError, match="BFCL has no attacks"):
        bfcl.run_suite("scripted:ground_truth", "simple", attack="important_instructions")
    with pytest.raises(ValueError, match="unknown scripted policy 'oracle'"):
        bfcl.run_suite("scripted:oracle", "simple")


def test_model_policy_runs_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "bfcl.json"
    report = bfcl.run_suite(f"model:{tiny_model_dir}", "simple", limit=2, out=str(out))
    assert report["counts"]["entries"] == 2 and out.exists()
    assert 0.0 <= report["accuracy"] <= 1.0
