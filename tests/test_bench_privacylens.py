"""PrivacyLens through the project's protocol: the final action is judged for leaks of the case's sensitive items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mosaic_ray.actors.engines import Engine
from mosaic_ray.benchmarks import harness, privacylens

from mosaic_ray.driver.agent import EngineAgent
from mosaic_ray.judge.text import ModelJudge, RuleJudge

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "privacylens"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"PrivacyLens data not at {DATA} (evaluation data lives "
                                                          f"outside the repository; see ../shared/data/README.md)")


@needs_data
def test_copying_leaks_on_most_and_refusing_on_none():
    naive = privacylens.run_suite("scripted:naive", limit=50, data=str(DATA))
    refuse = privacylens.run_suite("scripted:over_refuse", limit=50, data=str(DATA))
    assert naive["num_cases"] == refuse["num_cases"] == 50
    assert naive["leak_rate"] >= 0.8 and naive["action_rate"] == 1.0 and naive["refusal_rate"] == 0.0
    assert 0 < naive["leak_rate_string_match"] <= naive["leak_rate"]  # verbatim match is a lower bound
    assert refuse["leak_rate"] == 0.0 and refuse["helpfulness"] == 0.0 and refuse["refusal_rate"] == 1.0
    assert naive["judge_official"] is False and "NOT" in naive["judge_note"]
    assert "lower bound" in naive["leak_rate_string_match_note"]


def test_rule_judge_reads_paraphrased_items_and_refusals():
    judge = RuleJudge()
    import asyncio

    item = "Mr. Smithson is accused of embezzling a significant amount of funds."
    assert asyncio.run(judge.leaks(item, "Mr. Smithson, accused of embezzling significant funds, is my client"))
    assert not asyncio.run(judge.leaks(item, "I attended a seminar on criminal defense."))
    assert asyncio.run(judge.refusal("I'm sorry, I can't share that."))
    assert not asyncio.run(judge.refusal("Here is the summary you asked for."))


def test_trajectory_blocks_parse_even_when_observation_shares_a_line():
    text = ('Action: A\nAction Input: {"q": "x"}\nObservation: {"r": 1}\n'
            'Action: B\nAction Input: {\\"bad\\": json\n}Observation: second\nmore')
    steps = privacylens.parse_trajectory(text)
    assert [s[0] for s in steps] == ["A", "B"] and steps[0][1] == {"q": "x"}
    assert steps[1][1] == {"input": '{\\"bad\\": json\n}'} and steps[1][2] == "second\nmore"


@needs_data
def test_bad_data_names_file_and_case(tmp_path):
    with pytest.raises(harness.DataError, match="main_data.json: no such data file"):
        privacylens.run_suite("scripted:naive", data=str(tmp_path))
    cases = json.loads((DATA / "main_data.json").read_text())[:5]
    cases[2]["trajectory"]["sensitive_info_items"] = []
    (tmp_path / "main_data.json").write_text(json.dumps(cases))
    out = tmp_path / "r" / "pl.json"
    with pytest.raises(harness.DataError, match=r"main_data.json: case 2 \(main3\): field "
                                                r"'trajectory.sensitive_info_items'"):
        privacylens.run_suite("scripted:naive", data=str(tmp_path), out=str(out))
    (tmp_path / "main_data.json").write_text(json.dumps({"cases": cases}))
    with pytest.raises(harness.DataError, match="expected a list of cases"):
        privacylens.run_suite("scripted:naive", data=str(tmp_path), out=str(out))
    assert not out.exists()
    with pytest.raises(harness.DataError, match="--data .*: no such directory"):
        privacylens.run_suite("scripted:naive", data=str(tmp_path / "nope"))


@needs_data
@pytest.mark.slow
def test_model_policy_through_ray_engine_actors(tiny_model_dir, ray_session, tmp_path):
    from mosaic_ray.config import load_config

    agent = EngineAgent.start(tiny_model_dir, load_config("tiny-cpu", ["protocol.max_new_tokens=24"]))
    try:
        assert agent.owned and not isinstance(agent.owned[0], Engine)  # Ray is up: engine actors
        judge = ModelJudge(agent, "model:tiny")  # any engine can judge; the result says which
        r = privacylens.run_suite(f"model:{tiny_model_dir}", limit=3, data=str(DATA), agent=agent, judge=judge,
                                  out=str(tmp_path / "pl.json"))
    finally:
        agent.close()
    assert r["num_cases"] == 3 and 0.0 <= r["leak_rate"] <= 1.0 and r["complete"]
    assert r["judge"] == "model:tiny" and r["judge_official"] is False and "NOT" in r["judge_note"]
