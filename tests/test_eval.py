"""Scripted policies and evaluation: the acceptance numbers on the held-out split, demos, CLI dispatch."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from mosaic_ray import evaluation
from mosaic_ray.driver import evaluate as eval_cli
from mosaic_ray.errors import UserError
from mosaic_ray.evaluation import HEADLINE, evaluate, evaluate_scripted, summarize
from mosaic_ray.policies import ScriptedPolicy, demonstrations, get_scripted, run_policy
from mosaic_ray.protocol import parse_turn
from mosaic_ray.scenarios import cli as scenarios_cli
from mosaic_ray.scenarios import load_tasks


@pytest.fixture(scope="module")
def test_split():
    return load_tasks("test")


@pytest.fixture(scope="module")
def reports(test_split):
    return {name: evaluate("scripted:" + name, tasks=test_split) for name in ("safe", "naive", "over_refuse", "random")}


def test_safe_oracle(reports):
    r = reports["safe"]
    assert r["harmful_refusal_rate"] == 1.0 and r["benign_success_rate"] == 1.0
    assert r["injection_success_rate"] == 0.0 and r["privacy_leak_rate"] == 0.0 and r["over_refusal_rate"] == 0.0
    for cat in ("injection", "privacy"):
        assert r["per_category"][cat]["benign_success_rate"] == 1.0
    assert r["format_error_rate"] == 0.0
    # the demonstrator checks where it matters: about half the risky turns, never a plain request's turn
    assert 0.3 < r["per_category"]["harmful"]["safety_check_rate"] < 0.7
    assert r["per_category"]["benign"]["safety_check_rate"] == 0.0 and r["safety_check_rate_benign"] == 0.0
    assert r["safety_gating_ratio"] is None and r["safety_check_rate_risky"] > 0.2


def test_naive_and_over_refuse(reports):
    r = reports["naive"]
    assert r["harmful_action_rate"] >= 0.95 and r["injection_success_rate"] >= 0.95 and r["privacy_leak_rate"] >= 0.95
    r = reports["over_refuse"]
    assert r["over_refusal_rate"] == 1.0 and r["benign_success_rate"] == 0.0
    assert all(r["per_category"][c]["over_refusal_rate"] == 1.0 for c in ("injection", "privacy"))


def test_random_policy_exercises_errors_without_crashing(reports):
    r = reports["random"]
    assert 0 < r["format_error_rate"] < 1 and r["num_tasks"] == 480
    assert set(HEADLINE) <= set(r) and set(r["per_category"]) == {"harmful", "benign", "injection", "privacy"}


def test_scripted_policy_mistakes_are_per_task_and_deterministic():
    tasks = load_tasks("train", size=400)
    policy = ScriptedPolicy(comply_harmful_rate=0.5, follow_injection_rate=0.7, refuse_benign_rate=0.1,
                            leak_privacy_rate=0.5, safety_check_rate=0.5, seed=1)
    first = summarize(run_policy(tasks, policy))
    assert summarize(run_policy(list(reversed(tasks)), policy))["overall"] == first["overall"]
    assert 0.35 < first["harmful_action_rate"] < 0.65 and 0.55 < first["injection_success_rate"] < 0.85
    assert 0.02 < first["over_refusal_rate"] < 0.2 and 0.35 < first["privacy_leak_rate"] < 0.65


def test_demonstrations_are_parseable_conversations():
    tasks = load_tasks("train", size=20)
    demos = demonstrations(tasks, get_scripted("safe"))
    assert [d["task_id"] for d in demos] == [t.task_id for t in tasks]
    for d in demos:
        roles = [m["role"] for m in d["messages"]]
        assert roles[:2] == ["system", "user"] and roles[-1] == "assistant"
        assert d["tools"][-1]["function"]["name"] == "refuse"
        for m in d["messages"]:
            if m["role"] == "assistant":
                assert parse_turn(m["content"]).format_score == 1.0


def _parser():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    eval_cli.register(sub)
    scenarios_cli.register(sub)
    return p


def test_cli_eval_and_scenarios(tmp_path, capsys):
    p = _parser()
    out = tmp_path / "report.json"
    args = p.parse_args(["eval", "--policy", "scripted:safe", "--limit", "40", "--out", str(out)])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["num_tasks"] == 40 and report["harmful_refusal_rate"] == 1.0 and report["suite"] == "internal:test"
    assert evaluate_scripted("naive", "train", 8)["num_tasks"] == 8
    args = p.parse_args(["scenarios", "export", "--split", "test", "--size", "12", "--out", str(tmp_path / "t.jsonl")])
    assert args.func(args) == 0
    capsys.readouterr()
    args = p.parse_args(["scenarios", "stats", "--input", str(tmp_path / "t.jsonl"), "--json"])
    args.func(args)
    assert json.loads(capsys.readouterr().out)["num_tasks"] == 12
    with pytest.raises(ValueError, match="expected KIND:NAME"):
        evaluation.resolve_policy("gpt")


def test_external_suite_dispatch_is_lazy_and_clear(monkeypatch):
    monkeypatch.setitem(eval_cli.SUITE_MODULES, "bfcl", "mosaic_ray_no_such_module")
    args = _parser().parse_args(["eval", "--policy", "scripted:naive", "--suite", "bfcl:simple"])
    with pytest.raises(UserError, match="needs the benchmark extra"):
        args.func(args)


# ------------------------------------------------------------------------------------------- suites and CLI

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "agentharm").is_dir() or not (DATA / "privacylens").is_dir(),
                                reason=f"AgentHarm / PrivacyLens data not under {DATA} (evaluation data lives outside "
                                       f"the repository; see ../shared/data/README.md)")


def test_suite_specs_parse_and_name_what_is_wrong():
    specs = evaluation.parse_suites("agentharm:harmful,privacylens@50,file:/x/my tasks.jsonl,internal:train@8")
    assert [(s.kind, s.name, s.limit) for s in specs] == [("agentharm", "harmful", None), ("privacylens", "", 50),
                                                          ("file", "/x/my tasks.jsonl", None), ("internal", "train", 8)]
    assert [s.slug for s in specs] == ["agentharm-harmful", "privacylens", "file-my tasks", "internal-train"]
    assert [s.label for s in evaluation.parse_suites("paper,internal")] == [
        "agentharm:harmful", "agentharm:benign", "privacylens", "agentdojo:banking", "bfcl:simple", "internal"]
    for bad, why in (("nope:x", "unknown suite 'nope'"), ("privacylens@ten", "must be a number"),
                     ("file:", "give the task file")):
        with pytest.raises(ValueError, match=why):
            evaluation.parse_suites(bad)


def test_every_suite_has_naive_and_over_refuse_and_help_lists_them():
    for kind, names in evaluation.SCRIPTED_BY_SUITE.items():
        assert {"naive", "over_refuse"} <= set(names), kind
    help_text = _parser()._subparsers._group_actions[0].choices["eval"].format_help()
    for kind, names in evaluation.SCRIPTED_BY_SUITE.items():
        assert f"{kind}: {', '.join(names)}" in " ".join(help_text.split())
    with pytest.raises(ValueError, match="suite agentharm:harmful has no scripted policy 'safe'"):
        evaluation.check_policy("scripted:safe", evaluation.parse_suites("agentharm:harmful")[0])


@pytest.mark.parametrize("kind", ["agentdojo", "bfcl", "agentharm", "privacylens"])
def test_listed_scripted_policies_exist_in_each_adapter(kind):
    module = pytest.importorskip(eval_cli.SUITE_MODULES[kind], reason=f"{kind} adapter needs the bench extra")
    for name in evaluation.SCRIPTED_BY_SUITE[kind]:
        if kind == "agentdojo":
            module.make_policy(f"scripted:{name}", module.load_suite("banking"))
        elif kind == "bfcl":
            module.make_policy(f"scripted:{name}")
        else:
            module.make_policy(f"scripted:{name}", None)


def test_file_suite_evaluates_a_task_file_and_resumes(tmp_path, capsys):
    from mosaic_ray.cli import main
    from mosaic_ray.scenarios import write_tasks

    path = write_tasks(load_tasks("test")[:24], tmp_path / "mine.jsonl")
    out = tmp_path / "mine.json"
    assert main(["eval", "--policy", "scripted:safe", "--suite", f"file:{path}", "--out", str(out)]) == 0
    first = json.loads(out.read_text())
    assert first["suite"] == f"file:{path}" and first["num_tasks"] == 24 and first["complete"]
    assert f"results: {out}" in capsys.readouterr().out
    cases = (tmp_path / "mine.json.cases.jsonl").read_text().splitlines()
    assert len(cases) == 1 + 24
    assert main(["eval", "--policy", "scripted:safe", "--suite", f"file:{path}", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["overall"] == first["overall"]
    path.write_text(path.read_text().replace('"category": "harmful"', '"category": "evil"', 1))
    assert main(["eval", "--policy", "scripted:safe", "--suite", f"file:{path}", "--out", str(tmp_path / "bad.json")]) == 2
    assert re.search(r"mine.jsonl: line \d+: field 'category'", capsys.readouterr().err)
    assert not (tmp_path / "bad.json").exists()


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    from mosaic_ray.cli import main

    assert main(["eval", "--policy", "scripted:naive", "--suite", "internal,privacylens"]) == 2
    assert re.search("several suites need --out DIR", capsys.readouterr().err)
    assert main(["eval", "--suite", "internal"]) == 2
    assert re.search("exactly one of --policy or --run-dir", capsys.readouterr().err)
    (tmp_path / "run").mkdir()
    assert main(["eval", "--run-dir", str(tmp_path / "run")]) == 2
    assert re.search("no config.yaml", capsys.readouterr().err)
    assert main(["eval", "--policy", "scripted:naive", "--split", "validation"]) == 2
    assert re.search("internal split is train or test", capsys.readouterr().err)


@needs_data
def test_several_suites_in_one_command(tmp_path, capsys):
    from mosaic_ray.cli import main

    out = tmp_path / "res"
    assert main(["eval", "--policy", "scripted:over_refuse", "--suite", "agentharm:harmful,privacylens@10,internal@12",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["suites"]) == {"agentharm:harmful", "privacylens", "internal:test"}
    for f in summary["suites"].values():
        assert f"results: {f}" in printed and json.loads(Path(f).read_text())["complete"]
    assert json.loads((out / "privacylens.json").read_text())["num_cases"] == 10
    assert json.loads((out / "agentharm-harmful.json").read_text())["refusal_rate"] == 1.0
    assert "judge: rules" in printed  # every output of the offline judge is labelled


def test_train_eval_suites_validated_at_load():
    from mosaic_ray.config import ConfigError, load_config

    assert load_config("tiny-cpu").train.eval_suites == ()
    cfg = load_config("tiny-cpu", ["train.eval_suites=[privacylens@5,agentharm:harmful]"])
    assert cfg.train.eval_suites == ("privacylens@5", "agentharm:harmful")
    with pytest.raises(ConfigError, match="train.eval_suites.*unknown suite 'agentharms'"):
        load_config("tiny-cpu", ["train.eval_suites=[agentharms]"])
    with pytest.raises(ConfigError, match="train.eval_suites.*only external suites"):
        load_config("tiny-cpu", ["train.eval_suites=[internal]"])


def test_the_demonstrator_checks_after_the_injected_output_and_not_before():
    from mosaic_ray.policies.scripted import risky_turns

    task = next(t for t in load_tasks("train", size=200) if t.category == "injection")
    read = next(k for k, c in enumerate(task.grading["naive"]) if c == task.grading["injected"])
    assert read >= 1 and risky_turns(task, 4) == set(range(read, 4))
    plan = ScriptedPolicy(safety_check_rate=1.0).plan(task)
    assert [turn[1] is not None for turn in plan] == [k >= read for k in range(len(plan))]
