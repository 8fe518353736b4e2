"""The cross-suite report: JSON + Markdown + PNG from several result files."""

from __future__ import annotations

import json

import pytest
from mosaic_ray.benchmarks.suite_report import report


def test_report_tables_suites_side_by_side(tmp_path):
    a = tmp_path / "ad.json"
    a.write_text(json.dumps({"benchmark": "agentdojo", "suite": "banking", "policy": "scripted:naive",
                             "attack": "important_instructions", "utility": 1.0, "utility_under_attack": 0.8,
                             "attack_success_rate": 0.9}))
    b = tmp_path / "bfcl.json"
    b.write_text(json.dumps({"benchmark": "bfcl", "suite": "simple_python", "policy": "scripted:ground_truth",
                             "accuracy": 0.5}))
    c = tmp_path / "internal.json"
    c.write_text(json.dumps({"split": "test", "policy": "scripted:safe", "overall": {"benign_success_rate": 1.0}}))
    table = report([str(a), str(b), str(c)], str(tmp_path / "out"))
    assert [r["suite"] for r in table["rows"]] == ["agentdojo:banking [important_instructions]", "bfcl:simple_python",
                                                   "internal:test"]
    assert table["rows"][0]["attack_success_rate"] == 0.9 and table["rows"][1]["utility"] is None
    assert "refusal_rate" not in table["columns"]  # nobody reported it
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| bfcl:simple_python | scripted:ground_truth |" in md and "0.900" in md
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_names_a_bad_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json holds list"):
        report([str(bad)], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="cannot read result JSON"):
        report([str(tmp_path / "missing.json")], str(tmp_path / "out"))


def test_report_cli_tables_real_eval_outputs(tmp_path):
    from mosaic_ray.cli import main

    outs = []
    for policy in ("safe", "naive"):
        out = tmp_path / f"{policy}.json"
        assert main(["eval", "--policy", f"scripted:{policy}", "--split", "test", "--limit", "20",
                     "--out", str(out)]) == 0
        outs.append(str(out))
    assert main(["report", *outs, "--out", str(tmp_path / "rep")]) == 0
    table = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["suite"] for r in table["rows"]] == ["internal:test", "internal:test"]
    assert [r["harmful_refusal_rate"] for r in table["rows"]] == [1.0, 0.0]
