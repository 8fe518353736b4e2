"""[Real models] A run whose `model.path` is `s3://` on a two-node Ray cluster (two `ray start` nodes on this
machine, each with its own model cache, as two machines would have): every node resolves the model itself from
the S3 server into its own cache — no process depends on a directory of the driver's (before, the driver copied
the model to a temp dir of its own node and handed that path to actors on every node)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from mosaic_ray.benchmarks.chaos import LocalCluster

from mosaic_ray.models.base import shipped_base

pytestmark = pytest.mark.slow

FAST = ["warmstart.steps=2", "warmstart.num_demos=20", "warmstart.first_turn_steps=0", "train.iterations=1",
        "train.eval_size=4", "rollout.tasks_per_iteration=2", "protocol.max_steps=2", "protocol.max_new_tokens=16",
        "engine.num_engines=2", "engine.placement_strategy=STRICT_SPREAD"]


def test_an_s3_model_loads_on_both_nodes_from_their_own_caches(s3_server, tmp_path, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    uri = f"s3://{s3_server.bucket}/models/base-{os.getpid()}"
    fs, path = fsspec.core.url_to_fs(uri)
    for f in shipped_base().iterdir():
        if f.is_file():
            fs.put_file(str(f), f"{path}/{f.name}")
    caches = {n: tmp_path / f"cache-{n}" for n in ("head", "worker", "driver")}
    node_env = tuple({**s3_server.env, "MOSAIC_RAY_CACHE": str(caches[n])} for n in ("head", "worker"))
    before = set(glob.glob("/tmp/mosaic-model-*"))
    cluster = LocalCluster(num_cpus=2, node_env=node_env).start()
    try:
        env = {**os.environ, **s3_server.env, "MOSAIC_RAY_CACHE": str(caches["driver"]), "RAY_ADDRESS": cluster.address,
               "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
        cmd = [sys.executable, "-m", "mosaic_ray.cli", "train", "--config", "smoke", "--quiet", "--run-dir",
               str(tmp_path / "run"), "--set", f"model.path={uri}", *[a for s in FAST for a in ("--set", s)]]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        assert done.returncode == 0, (done.stdout[-2000:] + done.stderr[-4000:])
    finally:
        cluster.stop()
    for node in ("head", "worker", "driver"):
        entries = [p for p in (caches[node] / "models").glob("s3-*") if (p / ".mosaic-source.json").is_file()]
        assert len(entries) == 1, f"the {node} did not resolve the model into its own cache"
        assert (entries[0] / "model.safetensors").read_bytes() == (shipped_base() / "model.safetensors").read_bytes()
    assert set(glob.glob("/tmp/mosaic-model-*")) == before, "a driver-side temp copy of the model was made"
    assert (tmp_path / "run" / "report.json").is_file()
    assert Path(tmp_path / "run" / "checkpoints").is_dir()
