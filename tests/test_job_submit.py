"""[Train driver] on a real cluster: `ray job submit` of the smoke preset to a `ray start --head` cluster started
here (private temp dir, explicit ports, venv on PATH, stopped by PID — never `ray stop`); the job succeeds and the
node's Prometheus endpoint exports the project's `ray_mosaic_*` metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mosaic_ray.hygiene import RayHead

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
FAST = ["warmstart.steps=2", "warmstart.num_demos=20", "train.iterations=1", "train.eval_size=4",
        "rollout.tasks_per_iteration=2", "protocol.max_steps=2", "protocol.max_new_tokens=16"]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    temp = f"/tmp/mr-job-{os.getpid()}"  # Ray's socket paths must stay short
    h = RayHead(temp_dir=temp, num_cpus=2)
    h.start()
    yield h
    h.stop()
    subprocess.run(["rm", "-rf", temp], check=False)


@pytest.mark.slow
def test_job_submit_succeeds_and_exports_metrics(head, tmp_path):
    run_dir = tmp_path / "run"
    sets = [arg for s in FAST for arg in ("--set", s)]
    cmd = [RAY, "job", "submit", "--address", head.dashboard_url, "--submission-id", "mosaic-test",
           "--working-dir", str(ROOT), "--", "mosaic-ray", "train", "--config", "smoke", "--run-dir", str(run_dir),
           "--quiet", *sets]
    res = subprocess.run(cmd, env=head.process_env(), capture_output=True, text=True, timeout=1200)
    assert "Job 'mosaic-test' succeeded" in res.stdout, (res.stdout + res.stderr)[-3000:]
    assert (run_dir / "report.json").is_file()

    deadline, found = time.time() + 60, []
    while time.time() < deadline and not found:  # metrics reach the endpoint within one export interval
        body = urllib.request.urlopen(f"http://127.0.0.1:{head.metrics_port}/metrics", timeout=10).read().decode()
        found = [line for line in body.splitlines() if line.startswith("ray_mosaic_")]
        time.sleep(2)
    names = {line.split("{")[0] for line in found}
    assert any(n.startswith("ray_mosaic_rollout") for n in names), sorted(names)[:20]
    assert "ray_mosaic_policy_version" in names, sorted(names)[:20]
