"""`judge.endpoint`: the LLM judge asks an external OpenAI-compatible server — here a real HTTP server the test
starts (the project's server over the tiny base model) that demands an API key. The key comes from the variable
`judge.api_key_env` names; without it, or with a wrong one, the error is clear and names no key; with it, the pair
builder commits pairs judged by the endpoint, and the key is in no file of the run directory."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from judge_server import judge_server
from mosaic_ray.actors.pair_builder import PairBuilder

from mosaic_ray.config import ConfigError, JudgeConfig, load_config
from mosaic_ray.judge import TaskBrief
from mosaic_ray.judge.llm import HTTPChat
from mosaic_ray.schema import example_trajectory
from mosaic_ray.storage import RunStorage
from mosaic_ray.types import Outcome

KEY_ENV = "MOSAIC_TEST_JUDGE_KEY"


@pytest.fixture(scope="module")
def endpoint():
    key = f"planted-judge-key-{uuid.uuid4().hex}"
    with judge_server(KEY_ENV, key) as url:
        yield url, key


def test_the_key_is_required_and_read_from_the_named_variable(endpoint, monkeypatch):
    url, key = endpoint
    conv = [[{"role": "system", "content": "judge"}, {"role": "user", "content": "A or B?"}]]
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(RuntimeError, match=f"{KEY_ENV} is not set") as unset:
        asyncio.run(HTTPChat(url, api_key_env=KEY_ENV).chat(conv, 4))
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(RuntimeError, match="HTTP 401") as wrong:
        asyncio.run(HTTPChat(url, api_key_env=KEY_ENV).chat(conv, 4))
    assert key not in str(unset.value) + str(wrong.value)
    monkeypatch.setenv(KEY_ENV, key)
    chat = HTTPChat(url, "tiny-judge", api_key_env=KEY_ENV)
    assert key not in repr(chat)
    [reply] = asyncio.run(chat.chat(conv, 6))
    assert isinstance(reply, str)


def test_pairs_judged_by_the_endpoint_and_the_key_stays_out_of_the_run_dir(endpoint, monkeypatch, tmp_path):
    url, key = endpoint
    monkeypatch.setenv(KEY_ENV, key)
    cfg = JudgeConfig(kind="llm", endpoint=url, model="tiny-judge", api_key_env=KEY_ENV, max_new_tokens=8)
    trajs = [example_trajectory("run", 0, "t0", i, Outcome("answered", benign_success=i == 0), category="benign",
                                num_steps=1 + i) for i in range(3)]
    builder = PairBuilder(str(tmp_path), 3, cfg, briefs={"t0": TaskBrief("Pay the water bill.")})
    builder.add(trajs)
    stats = builder.flush()
    pairs = RunStorage(str(tmp_path)).read_dataset("pairs")
    assert pairs.num_rows == 3 and set(pairs.column("judge").to_pylist()) == {"llm:tiny-judge"}
    assert stats["judge"]["compares"] == 3 and stats["judge"]["asked"] >= 6
    assert not [p for p in Path(tmp_path).rglob("*") if p.is_file() and key.encode() in p.read_bytes()]


def test_endpoint_choices_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match="judge.endpoint: must be an http"):
        load_config("smoke", ["judge.kind=llm", "judge.endpoint=ftp://x"])
    with pytest.raises(ConfigError, match="judge.kind: judge.model and judge.endpoint configure the LLM judge"):
        load_config("smoke", ["judge.endpoint=http://127.0.0.1:1/v1"])
    with pytest.raises(ConfigError, match="judge.api_key_env: names the API key of judge.endpoint"):
        load_config("smoke", ["judge.kind=llm", "judge.api_key_env=KEY"])
    with pytest.raises(ConfigError, match="judge.reward_mode: 'scalar' rewards the rubric grade"):
        load_config("smoke", ["judge.kind=llm", "judge.reward_mode=scalar"])
    with pytest.raises(ConfigError, match="judge.min_replicas: must be between 0 and max_replicas=1"):
        load_config("smoke", ["judge.kind=llm", "judge.min_replicas=2"])
