"""[Train driver] on a real cluster: `ray job submit` of the smoke preset to a `ray start --head` cluster started
here (private temp dir, explicit ports, venv on PATH, stopped by PID — never `ray stop`); the job succeeds and the
node's Prometheus endpoint exports the project's `ray_mosaic_*` metrics."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mosaic_ray.benchmarks.cluster import RayHead

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
FAST = ["warmstart.steps=2", "warmstart.num_demos=20", "train.iterations=1", "train.eval_size=4",
        "rollout.tasks_per_iteration=2", "protocol.max_steps=2", "protocol.max_new_tokens=16"]


_heads_started = itertools.count()


@contextmanager
def ray_head(name: str, env: dict[str, str] | None = None) -> Iterator[RayHead]:
    """A `ray start --head` cluster (2 CPUs) in a private short temp dir, stopped by PID and removed at the end.
    Its ports are free ones the OS picks, or 100 from MOSAIC_TEST_RAY_PORT_BASE on for each head of this session
    (on a machine where each user owns a port range)."""
    temp = f"/tmp/mr-{name}-{os.getpid()}"  # Ray's socket paths must stay short
    base = os.environ.get("MOSAIC_TEST_RAY_PORT_BASE")
    n = next(_heads_started)
    h = RayHead(temp_dir=temp, num_cpus=2, env=dict(env or {}), port_base=int(base) + 100 * n if base else None)
    h.start()
    try:
        yield h
    finally:
        h.stop()
        subprocess.run(["rm", "-rf", temp], check=False)


def submit_smoke(head: RayHead, run_dir: Path, submission_id: str, *, working_dir: Path = ROOT,
                 extra: tuple[str, ...] = ("--quiet",)) -> str:
    """`ray job submit --working-dir WORKING_DIR -- mosaic-ray train --config smoke` (FAST budget) to `head`;
    asserts the job succeeded and returns the client's output (the job's log, streamed)."""
    sets = [arg for s in FAST for arg in ("--set", s)]
    cmd = [RAY, "job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
           "--working-dir", str(working_dir), "--", "mosaic-ray", "train", "--config", "smoke", "--run-dir",
           str(run_dir), *extra, *sets]
    res = subprocess.run(cmd, env=head.process_env(), capture_output=True, text=True, timeout=1200, check=False)
    assert f"Job '{submission_id}' succeeded" in res.stdout, (res.stdout + res.stderr)[-3000:]
    assert (run_dir / "report.json").is_file()
    return res.stdout


@pytest.fixture(scope="module")
def head():
    with ray_head("job") as h:
        yield h


@pytest.mark.slow
def test_job_submit_succeeds_and_exports_metrics(head, tmp_path):
    submit_smoke(head, tmp_path / "run", "mosaic-test")

    deadline, found = time.time() + 60, []
    while time.time() < deadline and not found:  # metrics reach the endpoint within one export interval
        body = urllib.request.urlopen(f"http://127.0.0.1:{head.metrics_port}/metrics", timeout=10).read().decode()
        found = [line for line in body.splitlines() if line.startswith("ray_mosaic_")]
        time.sleep(2)
    names = {line.split("{")[0] for line in found}
    assert any(n.startswith("ray_mosaic_rollout") for n in names), sorted(names)[:20]
    assert "ray_mosaic_policy_version" in names, sorted(names)[:20]
