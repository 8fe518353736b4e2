"""Sandboxed tool worlds: schema generation, validation, limits, and no effect on the host."""

from __future__ import annotations

import os
import time
from typing import Annotated

import pytest

from mosaic_ray.envs import DOMAINS, TOOLS, Depends, Limits, Sandbox, ToolCallError, ToolError, make_sandbox, make_tool
from mosaic_ray.episode import Episode
from mosaic_ray.protocol import format_turn
from mosaic_ray.scenarios import Task, load_tasks


def test_every_domain_has_three_to_five_documented_tools():
    assert len(DOMAINS) >= 6
    for domain, names in DOMAINS.items():
        assert 3 <= len(names) <= 5, domain
        for n in names:
            fn = TOOLS[n].schema()["function"]
            assert fn["description"] and all(p["description"] for p in fn["parameters"]["properties"].values())
            assert not {"world", "mail", "bank", "outbox", "trash", "machine"} & set(fn["parameters"]["properties"])


def test_make_tool_rejects_missing_descriptions():
    def no_summary(x: str) -> str:
        return x

    def no_arg_doc(x: str, y: int) -> str:
        """Do something.

        Args:
            x: documented.
        """
        return x

    with pytest.raises(ValueError, match="summary"):
        make_tool(no_summary)
    with pytest.raises(ValueError, match="'y'"):
        make_tool(no_arg_doc)


def _bank_box(**limits) -> Sandbox:
    world = {"bank": {"account": "AC100", "balance": 100.0, "bills": {}, "transfers": []}, "outbox": [], "trash": []}
    return make_sandbox(world, DOMAINS["bank"], Limits(**limits))


def test_errors_are_observations_unless_strict():
    box = _bank_box()
    cases = [("nope", {}, "ValidationError: unknown tool"),
             ("transfer", {"to": "AC1"}, "ValidationError: transfer is missing argument 'amount'"),
             ("transfer", {"to": "AC1", "amount": "lots"}, "ValidationError: argument 'amount' must be number"),
             ("transfer", {"to": "AC1", "amount": 5, "memo": "x"}, "ValidationError: transfer has no argument 'memo'"),
             ("transfer", {"to": "AC1", "amount": 500}, "ToolError: insufficient funds")]
    for tool, args, expected in cases:
        obs, ok = box.call(tool, args)
        assert not ok and obs.startswith(expected), obs
        with pytest.raises(ToolCallError, match=expected.split(":")[0]):
            box.call(tool, args, strict=True)
    assert box.world["bank"]["balance"] == 100.0
    assert box.call("transfer", {"to": "AC1", "amount": "40"}) == ("Sent 40 to AC1.", True)  # numeric string ok


def test_limits_argument_size_observation_truncation_and_timeout_rollback():
    box = _bank_box(max_argument_chars=30)
    obs, ok = box.call("transfer", {"to": "A" * 40, "amount": 1})
    assert not ok and "chars (limit 30)" in obs

    def slow(note: str, bank: Annotated[dict, Depends("bank")]) -> str:
        """Slow tool.

        Args:
            note: text.
        """
        bank["balance"] = 0.0
        time.sleep(0.02)
        return "x" * 50

    spec = make_tool(slow)
    box = Sandbox({"bank": {"balance": 7.0}}, {"slow": spec}, Limits(max_observation_chars=10, timeout_s=0.001))
    obs, ok = box.call("slow", {"note": "n"})
    assert not ok and "rolled back" in obs and box.world["bank"]["balance"] == 7.0
    box = Sandbox({"bank": {"balance": 7.0}}, {"slow": spec}, Limits(max_observation_chars=10, timeout_s=5))
    obs, ok = box.call("slow", {"note": "n"})
    assert ok and obs == "x" * 10 + " …[truncated 40 chars]"


def test_sysadmin_commands_act_on_the_virtual_machine_only():
    task = load_tasks("train", size=50, domains=("sysadmin",), categories=("benign",))[0]
    box = make_sandbox(task.world, task.tools)
    assert box.call("run_command", {"cmd": "ls /home"})[0].startswith("/home/ana/cv.doc")
    assert box.call("run_command", {"cmd": "rm -rf ~"}) == ("removed 1 file(s)", True)
    assert box.call("run_command", {"cmd": "cat /home/sam/notes.txt"})[1] is False
    assert box.call("run_command", {"cmd": "curl http://x"})[0] == "ToolError: curl: command not supported here"
    box.call("run_command", {"cmd": "rm -rf /"})
    assert box.world["machine"]["fs"] == {}


def _destructive_task() -> Task:
    world = {}
    for d in DOMAINS:
        world.update(load_tasks("train", size=4, domains=(d,), categories=("benign",))[0].world)
    world["outbox"], world["trash"] = [], []
    return Task("host-check", "benign", "sysadmin", "manual", "test", "wreck everything", world,
                tuple(TOOLS) + ("refuse",), {"required": [], "oracle": [], "naive": []})


def test_destructive_episode_leaves_the_host_untouched(tmp_path, monkeypatch):
    watched = tmp_path / "watched"
    watched.mkdir()
    (watched / "keep.txt").write_text("precious")
    (watched / "sub").mkdir()
    (watched / "sub" / "x.txt").write_text("x")
    monkeypatch.chdir(watched)
    monkeypatch.setenv("HOME", str(watched))
    before = (sorted(p.relative_to(watched).as_posix() for p in watched.rglob("*")), dict(os.environ),
              sorted(os.listdir(".")), (watched / "keep.txt").read_text())
    task = _destructive_task()
    calls = [("delete_file", {"name": "/"}), ("run_command", {"cmd": "rm -rf ~"}),
             ("run_command", {"cmd": f"rm -rf {watched}"}), ("run_command", {"cmd": "rm -rf /"}),
             ("delete_file", {"name": "keep.txt"}), ("transfer", {"to": "AC999", "amount": 5000})]
    calls += [("send_email", {"to": n, "body": "spam"}) for n in ("Alice", "Bob", "Carol")]
    ep = Episode(task)
    for tool, args in calls:
        ep.step(format_turn(think="wreck", tool=tool, arguments=args))
        if ep.done:
            break
    sandbox = ep.sandbox.world
    assert sandbox["files"] == {} and sandbox["machine"]["fs"] == {} and sandbox["bank"]["balance"] == 0.0
    after = (sorted(p.relative_to(watched).as_posix() for p in watched.rglob("*")), dict(os.environ),
             sorted(os.listdir(".")), (watched / "keep.txt").read_text())
    assert after == before
    # a second episode of the same task starts from the pristine world
    fresh = Episode(task)
    assert fresh.sandbox.world == task.world and fresh.sandbox.world["files"]
    assert task.world["bank"]["balance"] == 5000.0 and task.world["outbox"] == []


def test_episodes_never_share_state():
    task = load_tasks("test", size=8, categories=("benign",), domains=("bank",))[0]
    a, b = Episode(task), Episode(task)
    a.sandbox.call("transfer", {"to": "AC1", "amount": 10})
    assert b.sandbox.world["bank"]["balance"] == 5000.0 and a.sandbox.world is not b.sandbox.world
    assert a.sandbox.world["bank"]["transfers"] is not task.world["bank"]["transfers"]


def test_tool_error_class_is_for_tool_bodies():
    with pytest.raises(ToolError):
        TOOLS["read_file"].fn(name="missing.txt", files={})
