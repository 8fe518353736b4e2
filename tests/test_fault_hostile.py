"""[Fault tolerance] Hostile model output and tool arguments: model text never crashes storage, non-finite and
huge numbers are the model's mistake (a validation observation), imported worlds are validated at load, and a
tool's time limit holds while the call runs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Annotated

import pytest

from mosaic_ray.envs import TOOLS, Depends, Limits, Sandbox, ToolCallError, make_sandbox, make_tool
from mosaic_ray.protocol.argcheck import check_arguments
from mosaic_ray.rollout import EpisodeSpec, ScriptedCompletion, load_tokenizer, run_episode
from mosaic_ray.scenarios import load_tasks
from mosaic_ray.scenarios.io import TaskFileError, read_tasks, task_from_dict, write_tasks
from mosaic_ray.schema import from_arrow, to_arrow
from mosaic_ray.storage import RunStorage


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def _task(domain: str, category: str = "benign"):
    return next(t for t in load_tasks("train", size=200) if t.domain == domain and t.category == category)


def _replaying(tok, texts: list[str]):
    """A policy that writes `texts`, one per turn (as a model would: token ids + eos)."""
    turns = iter(texts)

    async def policy(request):
        ids = list(tok.encode(next(turns, "Done."), add_special_tokens=False)) + [tok.eos_token_id]
        return ScriptedCompletion(ids, [0.0] * len(ids), "stop", 0)
    return policy


# ----------------------------------------------------------------------------------- item 5: lone surrogates


def test_lone_surrogate_in_model_text_is_stored_not_a_crash(tok, tmp_path):
    task = _task("email")
    call = ('<think>send it</think><tool_call>{"name": "send_email", "arguments": '
            '{"to": "bob@x.org", "body": "\\ud800 hi \\udfff"}}</tool_call>')
    rec = asyncio.run(run_episode(EpisodeSpec(task, "r", 0, 0), _replaying(tok, [call]), tok))
    assert rec.error is None, rec.error  # the model's text is not an infrastructure error
    assert "\ud800" in rec.steps[0].arguments_json  # parsed as the model wrote it
    table = to_arrow([rec])  # used to raise UnicodeEncodeError in the driver
    storage = RunStorage(str(tmp_path / "run"))
    storage.write_shard("trajectories", "s0", table, meta={"groups": [rec.group_id]})
    back = from_arrow(storage.read_dataset("trajectories"))[0]
    assert json.loads(back.steps[0].arguments_json)["body"] == "\ufffd hi \ufffd"
    assert back.completion_ids == rec.completion_ids  # the tokens, which the learner uses, are untouched


def test_surrogate_pairs_survive_and_clean_records_are_unchanged():
    from mosaic_ray.schema import example_trajectory
    from mosaic_ray.types import Outcome

    rec = example_trajectory("r", 0, "t", 0, Outcome(terminal="final_answer"))
    # a valid pair (as json.loads leaves it) and a lone one
    rec.steps[0] = dataclasses.replace(rec.steps[0], think="ok \ud83d\ude00 then \udc00")
    step = from_arrow(to_arrow([rec]))[0].steps[0]
    assert step.think == "ok 😀 then \ufffd"


# ----------------------------------------------------------------------- item 6: non-finite and huge numbers


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_parser_rejects_non_finite_numbers(value):
    schema = TOOLS["transfer"].parameters
    problem = check_arguments("transfer", {"to": "AC1", "amount": value}, schema)
    assert problem is not None and "finite" in problem, problem


@pytest.mark.parametrize("amount", [float("nan"), float("inf"), "NaN", "Infinity", "-inf", "1e999",
                                    pytest.param(10 ** 400, id="int-401-digits"),
                                    pytest.param("9" * 401, id="str-401-digits")])
def test_sandbox_rejects_non_finite_and_huge_amounts_as_the_models_mistake(amount):
    task = _task("bank")
    box = make_sandbox(task.world, task.tools)
    before = json.dumps(box.world, sort_keys=True)
    obs, ok = box.call("transfer", {"to": "AC1", "amount": amount})
    assert not ok and obs.startswith("ValidationError: argument 'amount'"), obs
    assert json.dumps(box.world, sort_keys=True) == before  # nothing moved, the balance is still a number


def test_huge_integer_in_model_text_is_a_validation_observation_not_an_error(tok):
    task = _task("bank")
    call = ('<think>pay</think><tool_call>{"name": "transfer", "arguments": {"to": "AC1", "amount": '
            + "9" * 401 + '}}</tool_call>')
    rec = asyncio.run(run_episode(EpisodeSpec(task, "r", 0, 0), _replaying(tok, [call]), tok))
    assert rec.error is None and rec.outcome.terminal != "error", rec.error
    assert "finite" in (rec.steps[0].observation or "") or rec.steps[0].format_ok is False


def test_nan_in_model_text_is_not_executed(tok):
    task = _task("bank")
    call = '<think>pay</think><tool_call>{"name": "transfer", "arguments": {"to": "AC1", "amount": NaN}}</tool_call>'
    rec = asyncio.run(run_episode(EpisodeSpec(task, "r", 0, 0), _replaying(tok, [call]), tok))
    assert rec.error is None
    assert "Sent" not in (rec.steps[0].observation or ""), rec.steps[0].observation


# ----------------------------------------------------------------------------- item 6: imported worlds


@pytest.mark.parametrize(("world", "field"), [
    ({"bank": {}, "outbox": [], "trash": []}, "world.bank.account"),
    ({"bank": {"account": "A", "balance": "lots", "bills": {}, "transfers": []}, "outbox": [], "trash": []},
     "world.bank.balance"),
    ({"bank": {"account": "A", "balance": float("nan"), "bills": {}, "transfers": []}, "outbox": [], "trash": []},
     "world.bank.balance"),
    ({"outbox": [], "trash": []}, "world.bank"),
    ({"bank": {"account": "A", "balance": 1.0, "bills": {"x": 3}, "transfers": []}, "outbox": [], "trash": []},
     "world.bank.bills.x"),
    ({"bank": {"account": "A", "balance": 1.0, "bills": {}, "transfers": []}, "trash": []}, "world.outbox"),
])
def test_imported_world_is_validated_with_the_field_named(world, field):
    rec = {**_task("bank").to_dict(), "world": world}
    with pytest.raises((ValueError, TypeError), match=f"'{field}'"):
        task_from_dict(rec)


def test_bad_world_in_a_task_file_names_file_line_and_field(tmp_path):
    task = _task("email")
    path = write_tasks([task], tmp_path / "tasks.jsonl")
    rec = json.loads(path.read_text())
    rec["world"]["mail"]["inbox"] = [{"from": "Ann"}]  # no body: a KeyError mid-rollout before
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(TaskFileError, match=r"line 1.*'world.mail.inbox\[0\].body'"):
        read_tasks(path)


def test_every_builtin_world_validates():
    from mosaic_ray.envs import validate_world  # new with this check

    for split in ("train", "test"):
        for t in load_tasks(split, size=400):
            validate_world(t.world, t.tools)


# ------------------------------------------------------------------------------ item 6: tool time limit


def spin(seconds: float, files: Annotated[dict, Depends("files")]) -> str:
    """Spin the CPU.

    Args:
        seconds: How long.
    """
    files["spun"] = "yes"
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "done"


def test_tool_timeout_is_enforced_while_the_call_runs():
    box = Sandbox({"files": {}}, {"spin": make_tool(spin)}, Limits(timeout_s=0.3))
    t0 = time.monotonic()
    obs, ok = box.call("spin", {"seconds": 5.0})
    took = time.monotonic() - t0
    assert not ok and "limit 0.3s" in obs and took < 1.5, (obs, took)  # not 5 s: the limit holds while it runs
    assert box.world == {"files": {}}  # its effect was rolled back
    assert box.call("spin", {"seconds": 0.0}) == ("done", True)
    assert box.world == {"files": {"spun": "yes"}}
    with pytest.raises(ToolCallError, match="limit 0.3s"):
        box.call("spin", {"seconds": 5.0}, strict=True)
