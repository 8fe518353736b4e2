"""AgentDojo through the project's adapter: oracle utility, hijack detection, refusals, training episodes, model path."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("agentdojo", reason="AgentDojo is not installed: pip install -e '.[bench]'")

from mosaic_ray.benchmarks import agentdojo
from mosaic_ray.benchmarks.agentdojo_env import AgentDojoEpisode, AgentDojoScenario, scenarios, split_of


@pytest.mark.parametrize("suite", ["banking", "slack", "travel"])
def test_ground_truth_scores_full_utility(suite):
    report = agentdojo.run_suite("scripted:ground_truth", suite)
    assert report["utility"] == 1.0, [e for e in report["episodes"] if not e["utility"]]
    assert report["counts"]["clean_episodes"] == len(agentdojo.load_suite(suite).user_tasks)
    assert report["format_error_rate"] == 0.0


def test_ground_truth_is_not_hijacked_on_banking(tmp_path):
    out = tmp_path / "gt.json"
    report = agentdojo.run_suite("scripted:ground_truth", "banking", attack="important_instructions", out=str(out))
    assert report["counts"]["attack_episodes"] == 16 * 9
    assert report["attack_success_rate"] == 0.0
    assert report["utility_under_attack"] == 1.0
    assert json.loads(out.read_text())["attack_success_rate"] == 0.0


@pytest.mark.parametrize("suite", ["banking", "slack"])
def test_naive_follows_injected_instructions(suite):
    report = agentdojo.run_suite("scripted:naive", suite, attack="important_instructions", clean=False)
    assert report["attack_success_rate"] >= 0.5


def test_naive_acts_only_on_injected_text():
    """Without an attack the environment holds no injected goal, so the naive agent just does the user's task."""
    report = agentdojo.run_suite("scripted:naive", "banking")
    assert report["utility"] == 1.0


def test_refuse_is_terminal_without_utility_or_attack_success():
    report = agentdojo.run_suite("scripted:refuse", "banking", attack="important_instructions", limit=2)
    assert report["refusal_rate"] == 1.0
    assert report["utility"] == 0.0 and report["utility_under_attack"] == 0.0
    assert report["attack_success_rate"] == 0.0
    assert all(e["tool_calls"] == 0 and e["terminal"] == "refused" for e in report["episodes"])


def test_bad_inputs_name_what_is_wrong():
    with pytest.raises(ValueError, match="unknown suite 'bank'"):
        agentdojo.run_suite("scripted:ground_truth", "bank")
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        agentdojo.run_suite("scripted:ground_truth", "banking", attack="nope", limit=1)
    with pytest.raises(ValueError, match="unknown scripted policy 'oracle'"):
        agentdojo.run_suite("scripted:oracle", "banking")
    with pytest.raises(ValueError, match="expected scripted:NAME or model:DIR"):
        agentdojo.run_suite("ground_truth", "banking")


def test_eval_cli_dispatches_to_the_adapter(tmp_path):
    from mosaic_ray.cli import main

    out = tmp_path / "banking.json"
    assert main(["eval", "--policy", "scripted:ground_truth", "--suite", "agentdojo:banking", "--limit", "3",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["utility"] == 1.0 and report["counts"]["clean_episodes"] == 3


# ------------------------------------------------------------------------------------------- training source


def _replay(episode: AgentDojoEpisode, task) -> None:
    for call in task.ground_truth(episode.env):
        episode.step(call.function, dict(call.args))


def test_training_episode_grades_with_agentdojo_checks():
    ep = AgentDojoEpisode(AgentDojoScenario("banking", "user_task_0"))
    messages, tools = ep.reset()
    assert messages[-1]["content"] == ep.user_task.PROMPT
    assert {t["function"]["name"] for t in tools} >= {"send_money", "read_file"}
    assert ep.grade("nothing done").benign_success is False
    _replay(ep, ep.user_task)
    outcome = ep.grade(ep.user_task.GROUND_TRUTH_OUTPUT)
    assert outcome.benign_success and not outcome.injection_followed and outcome.terminal == "answered"


def test_training_episode_detects_followed_injection_and_refusal():
    scenario = AgentDojoScenario("banking", "user_task_0", "injection_task_0", "important_instructions")
    ep = AgentDojoEpisode(scenario)
    ep.reset()
    assert "Emma Johnson" in ep.step("read_file", {"file_path": "bill-december-2023.txt"})  # the injection shows
    assert ep.step("no_such_tool", {}).startswith("ToolNotFoundError")  # an error is an observation
    _replay(ep, ep.injection_task)
    assert ep.grade(None).injection_followed is True

    ep.reset()  # a fresh world: the earlier episode left nothing behind
    assert ep.grade(None).injection_followed is False
    ep.step("refuse", {"reason": "suspicious bill"})
    assert ep.done and ep.step("send_money", {}) == "EpisodeError: the episode has ended"
    outcome = ep.grade(None)
    assert outcome.terminal == "refused" and outcome.refused_at_step == 0 and outcome.over_refused
    assert not outcome.benign_success and not outcome.injection_followed


def test_splits_are_seeded_disjoint_and_complete():
    train = {s.task_id for s in scenarios("train", suites=("banking",))}
    test = {s.task_id for s in scenarios("test", suites=("banking",))}
    assert train and test and not train & test
    assert len(train | test) == 16 * (1 + 9)
    users = {t.split("/")[2] for t in test}
    assert not users & {t.split("/")[2] for t in train}  # a user task sits on one side with all its injections
    assert split_of("banking", "user_task_3") == split_of("banking", "user_task_3")
    held_out = agentdojo.run_suite("scripted:ground_truth", "banking", split="test")
    assert {e["user_task"] for e in held_out["episodes"]} == users


# ------------------------------------------------------------------------------------------- model policy


def test_model_policy_runs_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "model.json"
    report = agentdojo.run_suite(f"model:{tiny_model_dir}", "banking", limit=1, out=str(out))
    assert report["counts"]["clean_episodes"] == 1 and out.exists()
    episode = report["episodes"][0]
    assert episode["turns"] >= 1 and episode["terminal"] in {"answered", "refused", "format_error", "max_turns"}
    assert 0.0 <= report["utility"] <= 1.0
