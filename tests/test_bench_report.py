"""The cross-suite report: JSON + Markdown + PNG from several result files."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from mosaic_ray.driver.suite_report import report


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


# ------------------------------------------------------------------------------------------- paper table

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "agentharm").is_dir() or not (DATA / "privacylens").is_dir(),
                                reason=f"AgentHarm / PrivacyLens data not under {DATA} (evaluation data lives outside "
                                       f"the repository; see ../shared/data/README.md)")


@needs_data
def test_paper_table_before_after_from_eval_dirs(tmp_path, capsys):
    pytest.importorskip("inspect_evals", reason="inspect-evals is not installed: pip install -e '.[bench]'")
    from mosaic_ray.cli import main

    for side, policy in (("before", "over_refuse"), ("after", "naive")):
        assert main(["eval", "--policy", f"scripted:{policy}", "--suite",
                     "agentharm:harmful,agentharm:benign,privacylens@10,internal@20", "--out", str(tmp_path / side)]) == 0
    capsys.readouterr()
    assert main(["report", "--before", str(tmp_path / "before"), "--after", str(tmp_path / "after"),
                 "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    table = json.loads((tmp_path / "rep" / "paper.json").read_text())
    rows = {(r["metric"], r["suite"]): r for r in table["rows"]}
    harm = rows[("harm score", "agentharm:harmful (validation)")]
    assert harm["better"] == "down" and harm["after"] > harm["before"] and harm["change"] == pytest.approx(
        harm["after"] - harm["before"], abs=1e-4)
    assert rows[("harmful refusal rate", "agentharm:harmful (validation)")]["before"] == 1.0
    assert rows[("over-refusal (benign refusal rate)", "agentharm:benign (validation)")]["after"] == 0.0
    assert rows[("leak rate", "privacylens")]["after"] >= 0.5 and rows[("leak rate", "privacylens")]["before"] == 0
    assert rows[("harmful refusal rate", "internal:test")]["before"] == 1.0
    assert any("NOT the benchmark's official" in n for n in table["notes"])
    assert "| harm score | agentharm:harmful (validation) | ↓ |" in printed
    for ext in ("md", "json", "png"):  # every output path is printed
        assert f"wrote {tmp_path / 'rep' / f'paper.{ext}'}" in printed
    assert (tmp_path / "rep" / "paper.png").read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_incomplete_or_missing_sides(tmp_path, capsys):
    from mosaic_ray.cli import main

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"benchmark": "privacylens", "suite": "main", "leak_rate": 0.5, "complete": False}))
    assert main(["report", "--before", str(partial), "--after", str(partial), "--out", str(tmp_path / "r")]) == 2
    assert re.search("not a complete result", capsys.readouterr().err)
    assert main(["report", "--before", str(partial), "--out", str(tmp_path / "r")]) == 2
    assert re.search("needs both --before and --after", capsys.readouterr().err)
    (tmp_path / "empty").mkdir()
    assert main(["report", "--before", str(tmp_path / "empty"), "--after", str(partial), "--out", str(tmp_path / "r")]) == 2
    assert re.search("holds no result JSON", capsys.readouterr().err)


@needs_data
@pytest.mark.slow
def test_train_eval_suites_then_one_eval_command_then_report(ray_session, tmp_path, capsys):
    """A short run with `train.eval_suites` (before/after on the run's engines), then the README's one command on
    its newest checkpoint (every external suite, small limits), then `report --run-dir` and `--before/--after`."""
    pytest.importorskip("inspect_evals", reason="inspect-evals is not installed: pip install -e '.[bench]'")
    from mosaic_ray.cli import main
    from mosaic_ray.config import load_config
    from mosaic_ray.driver.train import Trainer

    cfg = load_config("smoke", ["warmstart.steps=2", "warmstart.num_demos=20", "train.iterations=1",
                                "train.eval_size=4", "rollout.tasks_per_iteration=2", "protocol.max_steps=2",
                                "protocol.max_new_tokens=16", "scenarios.train_size=40", "scenarios.test_size=8",
                                "train.eval_suites=[agentharm:harmful@2,privacylens@2]"])
    run = tmp_path / "run"
    Trainer(cfg, str(run), progress=False).run()
    for side in ("before", "after"):
        for name in ("agentharm-harmful", "privacylens"):
            result = json.loads((run / "eval_suites" / side / f"{name}.json").read_text())
            assert result["complete"] and result["policy"] == f"model:run@{side}"
    assert main(["report", "--run-dir", str(run), "--out", str(tmp_path / "rep")]) == 0
    rows = json.loads((tmp_path / "rep" / "paper.json").read_text())["rows"]
    assert {r["suite"] for r in rows} >= {"agentharm:harmful (validation)", "privacylens", "internal:test"}

    suites = "agentharm:harmful@2,privacylens@2,agentdojo:banking@1" + (
        ",bfcl:simple@2" if importlib.util.find_spec("bfcl_eval") else "")
    assert main(["eval", "--run-dir", str(run), "--suite", suites, "--attack", "important_instructions",
                 "--set", "protocol.max_new_tokens=16", "--out", str(tmp_path / "after")]) == 0
    summary = json.loads((tmp_path / "after" / "summary.json").read_text())
    assert summary["policy"].startswith("model:") and "checkpoints/iter-" in summary["policy"]
    dojo = json.loads((tmp_path / "after" / "agentdojo-banking.json").read_text())
    assert dojo["counts"]["attack_episodes"] == 9 and dojo["counts"]["clean_episodes"] == 1
    assert main(["report", "--before", str(run / "eval_suites" / "before"), "--after", str(tmp_path / "after"),
                 "--out", str(tmp_path / "rep2")]) == 0
    assert "injection ASR" in capsys.readouterr().out
