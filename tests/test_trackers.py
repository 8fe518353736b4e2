"""[Ops & ecosystem] Trackers: `train.loggers` writes the same metrics rows, the config and the report files to
TensorBoard, MLflow (sqlite) and W&B (offline), each read back with its own library: TensorBoard's
EventAccumulator, MlflowClient, and W&B's protobuf records of the offline run file. No network."""

from __future__ import annotations

import glob
import json
import re
import struct
from pathlib import Path

import pytest

from mosaic_ray.config import ConfigError, load_config
from mosaic_ray.driver import report as reports
from mosaic_ray.driver.trackers import open_trackers
from mosaic_ray.storage import RunStorage

ALL = "train.loggers=[console,jsonl,tensorboard,mlflow,wandb]"
ROWS = [{"iteration": 0, "rollout/harmful_refusal_rate": 0.25, "reward/mean": 1.5, "learner/loss": 0.5,
         "time/iteration_s": 3.0, "learner/note": None},
        {"iteration": 1, "rollout/harmful_refusal_rate": 0.5, "reward/mean": 1.75, "learner/loss": 0.25,
         "time/iteration_s": 2.5},
        {"iteration": 2, "rollout/harmful_refusal_rate": 0.75, "reward/mean": 2.0, "time/iteration_s": 2.0}]


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    """W&B offline, with its settings and caches in the test's temp dir (nothing in ~, nothing on the network)."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)


def report_files(rows: list[dict]) -> dict[str, bytes]:
    rep = reports.build_report(config_name="smoke", before={"harmful_refusal_rate": 0.2},
                               after={"harmful_refusal_rate": 0.6}, rows=rows, wall_time_s=1.0)
    return {"report.md": reports.report_markdown(rep).encode(), "report.json": reports.dumps(rep).encode(),
            "curves.png": reports.curves_png(rows)}


# ------------------------------------------------------------------------------------------------ readers


def tensorboard_events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def mlflow_runs(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mosaic-ray")
    return client, client.search_runs([exp.experiment_id])


def wandb_records(run_dir: Path) -> list:
    """Every record of the offline run file(s) under `run_dir/wandb`: W&B's block log format (32 KiB blocks,
    7-byte record headers: crc32, length, type FULL/FIRST/MIDDLE/LAST) holding `wandb_internal.Record` protos."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert files, f"no offline W&B run file under {run_dir / 'wandb'}"
    out = []
    for path in files:
        data = Path(path).read_bytes()
        assert data[:4] == b":W&B", data[:7]
        pos, chunk = 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or (n == 0 and kind == 0):  # block trailer / zero padding
                pos += left
                continue
            chunk += data[pos + 7:pos + 7 + n]
            pos += 7 + n
            if kind in (1, 4):  # FULL or LAST: one whole record
                rec = pb.Record()
                rec.ParseFromString(chunk)
                out.append(rec)
                chunk = b""
    return out


def wandb_history(records: list) -> list[dict]:
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def numeric(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ------------------------------------------------------------------------------------------------- config


def test_loggers_parse_from_set_and_default():
    assert load_config("smoke").train.loggers == ("console", "jsonl")
    cfg = load_config("smoke", ["train.loggers=[console,tensorboard,mlflow]"])
    assert cfg.train.loggers == ("console", "tensorboard", "mlflow")


@pytest.mark.parametrize("value, needle", [("[console,neptune]", "train.loggers[1]"),
                                           ("[jsonl,jsonl]", "train.loggers: names a logger twice")])
def test_bad_loggers_fail_at_config_load(value, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config("smoke", [f"train.loggers={value}"])


def test_logger_whose_package_is_missing_fails_naming_key_and_extra(monkeypatch):
    from mosaic_ray import config

    monkeypatch.setitem(config.LOGGER_MODULES, "wandb", ("wandb_is_not_installed_here",))
    with pytest.raises(ConfigError) as err:
        load_config("smoke", ["train.loggers=[console,wandb]"])
    msg = str(err.value)
    assert msg.startswith("train.loggers: 'wandb' needs wandb_is_not_installed_here (not installed)"), msg
    assert "pip install 'mosaic-ray[wandb]'" in msg


# ---------------------------------------------------------------------------------------- every backend


def test_every_backend_reads_back_rows_config_and_reports(tmp_path):
    cfg = load_config("smoke", [ALL])
    run = tmp_path / "run"
    storage = RunStorage(str(run))
    trackers = open_trackers(cfg, storage, "run")
    for row in ROWS:
        trackers.log_metrics(row)
    files = report_files(ROWS)
    trackers.log_artifacts(files)
    trackers.close()

    # jsonl: the rows as logged
    assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] == ROWS

    # TensorBoard: every numeric key a scalar series over the iterations; config + reports as text; plot as image
    acc = tensorboard_events(run / "tensorboard")
    for key in ("rollout/harmful_refusal_rate", "reward/mean", "learner/loss", "time/iteration_s"):
        expect = [(r["iteration"], r[key]) for r in ROWS if r.get(key) is not None]
        assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars(key)] == expect, key
    assert "learner/note" not in acc.Tags()["scalars"]
    text = {tag: acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}
    assert "name: smoke" in text["config/text_summary"]
    assert text["report.md/text_summary"] == files["report.md"].decode()
    assert json.loads(text["report.json/text_summary"].strip("`json\n"))["config"] == "smoke"
    assert acc.Images("curves.png")[-1].encoded_image_string == files["curves.png"]

    # MLflow: one finished run with the config as params, the rows as metric histories, the files as artifacts
    client, runs = mlflow_runs(run)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert runs[0].data.params["learner.lr"] == str(cfg.learner.lr)
    assert runs[0].data.params["train.loggers"] == json.dumps(list(cfg.train.loggers))
    history = client.get_metric_history(run_id, "reward/mean")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.5), (1, 1.75), (2, 2.0)]
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "report.md", "report.json", "curves.png"} <= arts
    local = Path(client.download_artifacts(run_id, "report.md", str(tmp_path / "dl")))
    assert local.read_bytes() == files["report.md"]

    # W&B offline: the config in the run record, one history step per row, the report files as run files
    records = wandb_records(run)
    run_rec = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run_rec.config.update}
    assert config["learner"]["lr"] == cfg.learner.lr
    steps = wandb_history(records)
    assert [h["_step"] for h in steps] == [0, 1, 2]
    for h, row in zip(steps, ROWS):
        assert {k: h[k] for k in numeric(row)} == pytest.approx(numeric(row))
    saved = glob.glob(str(run / "wandb" / "offline-run-*" / "files" / "report.md"))
    assert saved and Path(saved[0]).read_bytes() == files["report.md"]
    exit_rec = next(r.exit for r in records if r.WhichOneof("record_type") == "exit")
    assert exit_rec.exit_code == 0


def test_resume_appends_to_the_same_runs_and_a_failure_marks_them(tmp_path):
    cfg = load_config("smoke", ["train.loggers=[jsonl,mlflow,wandb]"])
    run = tmp_path / "run"
    storage = RunStorage(str(run))
    first = open_trackers(cfg, storage, "run")
    first.log_metrics(ROWS[0])
    first.close()

    second = open_trackers(cfg, storage, "run", resume=True, history=ROWS[:1])
    with pytest.raises(RuntimeError):
        try:
            second.log_metrics(ROWS[1])
            raise RuntimeError("the run crashed")
        finally:
            second.close()  # as Trainer.shutdown does, inside a finally

    assert [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    client, runs = mlflow_runs(run)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "reward/mean")] == [0, 1]
    # offline-run-<YYYYMMDD_HHMMSS>-<run id>[-N]: W&B adds -N when two sessions of a run start in the same second
    ids = {re.match(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)", Path(p).name).group(1)
           for p in glob.glob(str(run / "wandb" / "offline-run-*"))}
    assert len(ids) == 1, ids  # both W&B sessions write the same run id (`wandb sync` merges them)
    exits = [r.exit.exit_code for r in wandb_records(run) if r.WhichOneof("record_type") == "exit"]
    assert sorted(exits) == [0, 1]


def test_stores_of_an_s3_run_go_to_loggers_dir(tmp_path):
    from mosaic_ray.driver.trackers import tracker_dir

    cfg = load_config("smoke", [f"train.loggers_dir={tmp_path / 'stores'}"])
    assert tracker_dir(cfg, RunStorage(str(tmp_path / "run")), "run") == str(tmp_path / "stores")
    assert tracker_dir(load_config("smoke"), RunStorage(str(tmp_path / "run")), "run") == str(tmp_path / "run")


# ------------------------------------------------------------------------------------------ real training


FAST = ["warmstart.steps=2", "warmstart.num_demos=20", "warmstart.first_turn_steps=0", "train.iterations=2",
        "train.eval_size=4", "rollout.tasks_per_iteration=2", "protocol.max_steps=2", "protocol.max_new_tokens=16"]


@pytest.mark.slow
def test_smoke_training_logs_the_jsonl_rows_to_every_tracker(ray_session, tmp_path):
    from mosaic_ray.driver.train import Trainer

    cfg = load_config("smoke", [*FAST, ALL])
    run = tmp_path / "run"
    Trainer(cfg, str(run), progress=False).run()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    keys = sorted(set().union(*(numeric(r) for r in rows)))
    assert "rollout/harmful_refusal_rate" in keys and "time/weight_sync_s" in keys

    acc = tensorboard_events(run / "tensorboard")
    for key in keys:
        assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars(key)] == \
            [(r["iteration"], r[key]) for r in rows if key in numeric(r)], key
    assert acc.Images("curves.png") and acc.Images("before_after.png")

    client, runs = mlflow_runs(run)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert set(runs[0].data.metrics) == set(keys)
    for key in keys:
        got = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key))
        assert got == [(r["iteration"], pytest.approx(r[key])) for r in rows if key in numeric(r)], key
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"config.yaml", "report.md", "report.json", "curves.png", "before_after.png"} <= arts

    steps = wandb_history(wandb_records(run))
    assert len(steps) == len(rows)
    for h, row in zip(steps, rows):
        assert {k: h[k] for k in numeric(row)} == pytest.approx(numeric(row))
