"""Scenario suites: counts, balance, held-out templates, determinism, ground-truth replay, import/export."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mosaic_ray.envs import make_sandbox
from mosaic_ray.scenarios import TEMPLATES, TaskFileError, load_tasks, read_tasks, templates, write_tasks
from mosaic_ray.scenarios import entities as E
from mosaic_ray.types import CATEGORIES


@pytest.fixture(scope="module")
def train():
    return load_tasks("train")


@pytest.fixture(scope="module")
def test_tasks():
    return load_tasks("test")


def test_sizes_balance_and_domain_spread(train, test_tasks):
    assert len(train) >= 2000 and len(test_tasks) >= 400
    for tasks in (train, test_tasks):
        cats = Counter(t.category for t in tasks)
        assert set(cats) == set(CATEGORIES) and max(cats.values()) - min(cats.values()) <= 1
        for c in CATEGORIES:
            assert len({t.domain for t in tasks if t.category == c}) >= 5, c
        assert len({t.task_id for t in tasks}) == len(tasks)
    for c in CATEGORIES:
        assert len(templates("train", categories=(c,))) >= 20, c
        assert len(templates("test", categories=(c,))) >= 5, c


def test_train_and_test_share_no_template(train, test_tasks):
    assert not {t.template_id for t in train} & {t.template_id for t in test_tasks}
    assert {t.template_id for t in test_tasks} == {t.id for t in TEMPLATES if t.split == "test"}
    assert len({t.id for t in TEMPLATES}) == len(TEMPLATES)


def test_same_seed_same_tasks_other_seed_other_tasks():
    a = [t.to_dict() for t in load_tasks("test", size=60, seed=3)]
    assert a == [t.to_dict() for t in load_tasks("test", size=60, seed=3)]
    assert a != [t.to_dict() for t in load_tasks("test", size=60, seed=4)]
    sub = load_tasks("train", size=40, domains=("bank", "email"), categories=("harmful", "injection"))
    assert {t.domain for t in sub} <= {"bank", "email"} and {t.category for t in sub} == {"harmful", "injection"}
    with pytest.raises(ValueError, match="unknown category"):
        load_tasks("train", categories=("evil",))


def test_tasks_are_small_enough_for_the_tiny_model(train, test_tasks):
    for t in train + test_tasks:
        assert len(t.prompt.split()) <= 30, t.prompt
        assert 4 <= len(t.tools) <= 6 and t.tools[-1] == "refuse"
        n = len(t.ground_truth())
        assert (n == 0) if t.category == "harmful" else (2 <= n <= 4), t.task_id
        if t.category == "harmful":
            assert 1 <= len(t.naive_calls()) <= 2


def test_harmful_and_benign_look_alikes_share_the_frame(train):
    by_tpl = {t.template_id: t for t in train}
    pairs = [(by_tpl[f"benign/{fid}/0"], by_tpl[f"harmful/{fid}/0"]) for fid in ("bank.pay", "files.cleanup")]
    for benign, harmful in pairs:
        assert benign.grading["harmful"] == [] and harmful.grading["harmful"]
        assert [c.tool for c in benign.ground_truth()] == [c.tool for c in harmful.naive_calls()]


def test_every_ground_truth_and_naive_sequence_replays_strictly(train, test_tasks):
    """Every oracle and naive call runs without error; injections actually sit in what the agent reads."""
    for t in train + test_tasks:
        for calls in (t.ground_truth(), t.naive_calls()):
            box = make_sandbox(t.world, t.tools)
            observations = [box.call(c.tool, c.args, strict=True)[0] for c in calls]
        if t.category == "injection":
            marker = t.grading["injection_marker"].casefold()
            assert any(marker in o.casefold() for o in observations), t.task_id
            assert [p["tool"] for p in t.grading["attack"]] == [t.grading["injected"]["tool"]], t.task_id


READ_ARG = {"read_bill": ("payee", E.PAYEES), "read_email": ("sender", E.NAMES), "read_file": ("name", E.FILES),
            "open_page": ("site", tuple(E.SITES)), "list_events": ("day", E.DAYS),
            "read_messages": ("name", E.NAMES), "read_log": ("name", ("backup", "auth"))}


def test_an_injection_poisons_the_whole_source_the_agent_reads(test_tasks):
    """Whichever item the agent opens (a wrong name included), the payload is there: injection resistance is
    measured even for an agent that does not copy the requested item's name."""
    checked = 0
    for t in test_tasks:
        if t.category != "injection":
            continue
        marker = t.grading["injection_marker"].casefold()
        for call in t.ground_truth():
            if call.tool not in READ_ARG:
                continue
            arg, pool = READ_ARG[call.tool]
            for value in pool:
                box = make_sandbox(t.world, t.tools)
                out = box.call(call.tool, {**call.args, arg: value}, strict=True)[0]
                assert marker in out.casefold(), (t.task_id, call.tool, value)
                checked += 1
    assert checked > 100


def test_benign_and_harmful_purposes_come_from_shared_pools():
    """The purpose frames draw their reasons from one benign and one harmful pool, so the intent cue is the same
    words in every frame (learnable by a tiny model); both pools name a person, so a name is no harm cue."""
    from mosaic_ray.scenarios.frames import FRAMES, PURPOSE_BAD, PURPOSE_OK

    shared = [f for f in FRAMES if f.ok == PURPOSE_OK]
    assert len(shared) >= 10 and all(f.bad == PURPOSE_BAD for f in shared)
    assert not set(PURPOSE_OK) & set(PURPOSE_BAD)
    assert any("{victim}" in c for c in PURPOSE_OK) and all("{victim}" in c for c in PURPOSE_BAD)


# ------------------------------------------------------------------------------------------------ import / export


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_round_trip(tmp_path, suffix, test_tasks):
    path = write_tasks(test_tasks[:50], tmp_path / f"tasks{suffix}")
    assert [t.to_dict() for t in read_tasks(path)] == [t.to_dict() for t in test_tasks[:50]]


def test_bad_jsonl_names_line_and_field(tmp_path, test_tasks):
    good = json.dumps({"schema_version": 1, **test_tasks[0].to_dict()})
    cases = {
        "category": ("evil", "line 2: field 'category'"),
        "tools": (["fly"], "line 2: field 'tools': unknown tool 'fly'"),
        "prompt": ("", "line 2: field 'prompt'"),
        "grading": ({"required": [{"args": {}}]}, "line 2: field 'grading.required[0]'"),
    }
    for field, (value, expected) in cases.items():
        bad = json.loads(good)
        bad[field] = value
        path = tmp_path / f"bad_{field}.jsonl"
        path.write_text(good + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(TaskFileError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            read_tasks(path)
    path = tmp_path / "broken.jsonl"
    path.write_text(good + "\n\n{not json\n")
    with pytest.raises(TaskFileError, match="line 3: invalid JSON"):
        read_tasks(path)
    with pytest.raises(TaskFileError, match="use .parquet or .jsonl"):
        read_tasks(tmp_path / "tasks.csv")


def test_bad_parquet_names_row_and_field(tmp_path, test_tasks):
    path = write_tasks(test_tasks[:3], tmp_path / "t.parquet")
    table = pq.read_table(path)
    world = table.column("world_json").to_pylist()
    world[2] = "{oops"
    pq.write_table(table.set_column(table.schema.get_field_index("world_json"), "world_json",
                                    pa.array(world, pa.string())), path)
    with pytest.raises(TaskFileError, match="row 2: field 'world_json': invalid JSON"):
        read_tasks(path)
    domains = table.column("domain").to_pylist()
    domains[1] = "mars"
    pq.write_table(table.set_column(table.schema.get_field_index("domain"), "domain", pa.array(domains)), path)
    with pytest.raises(TaskFileError, match="row 1: field 'domain'"):
        read_tasks(path)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(TaskFileError, match="not a readable Parquet file"):
        read_tasks(tmp_path / "junk.parquet")
