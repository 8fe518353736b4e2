"""[Fault tolerance & security] item 7: credentials never travel through Ray's runtime env, so none is logged.

A secret is planted in the environment of a `ray start` cluster and of the `ray job submit` client (as an AWS
key and session token would be on a node), and is also the API key of the run's LLM judge: the job judges its
pairs through `judge.endpoint`, a real OpenAI-compatible server (the tiny base model) that refuses requests
without that key, read from `judge.api_key_env` on the node. After the short `smoke` training job, the secret is
in no file under the cluster's temp dir (every Ray log, the runtime-env and dashboard state), no run-dir file,
not in the job's log and not in the dashboard's job API. Before the fix the driver copied AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN into the job's and the pair builder's `runtime_env`, which Ray logs and serves.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

import pytest
from judge_server import judge_server
from test_job_submit import ray_head, submit_smoke

from mosaic_ray.hygiene import marked_pids
from mosaic_ray.storage import RunStorage


def files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(str(path.relative_to(root)))
            except OSError:  # a socket or a file removed while we walk
                continue
    return hits


@pytest.mark.slow
def test_a_planted_secret_reaches_no_log_run_file_or_dashboard_response(tmp_path):
    secret = f"planted-secret-{uuid.uuid4().hex}-do-not-log"
    env = {"AWS_ACCESS_KEY_ID": "planted-id", "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": secret,
           "MOSAIC_JUDGE_KEY": secret}
    run_dir = tmp_path / "run"
    with judge_server("MOSAIC_JUDGE_KEY", secret) as judge_url, ray_head("sec", env=env) as head:
        # the secret really is in the cluster's environment (the raylet's and so every worker's)
        assert any(secret.encode() in Path(f"/proc/{pid}/environ").read_bytes() for pid in marked_pids(head.marker))
        judge = ("--set", "judge.kind=llm", "--set", f"judge.endpoint={judge_url}", "--set", "judge.model=tiny-judge",
                 "--set", "judge.api_key_env=MOSAIC_JUDGE_KEY")
        log = submit_smoke(head, run_dir, "mosaic-secret",
                           extra=("--quiet", "--set", "warmstart.first_turn_steps=0", *judge))
        api = {url: urllib.request.urlopen(url, timeout=30).read().decode()
               for url in (f"{head.dashboard_url}/api/jobs/", f"{head.dashboard_url}/api/jobs/mosaic-secret")}
        assert "mosaic-secret" in api[f"{head.dashboard_url}/api/jobs/"]
        assert json.loads(api[f"{head.dashboard_url}/api/jobs/mosaic-secret"])["status"] == "SUCCEEDED"
        ray_files = files_containing(Path(head.temp_dir), secret.encode())
    assert secret not in log, "the job's log shows the secret"
    assert not [url for url, body in api.items() if secret in body], "the dashboard's job API serves the secret"
    assert not ray_files, f"Ray's temp dir holds the secret in: {ray_files[:10]}"
    assert (run_dir / "config.yaml").is_file()
    pairs = RunStorage(str(run_dir)).read_dataset("pairs")  # judged through the keyed endpoint
    assert pairs.num_rows > 0 and set(pairs.column("judge").to_pylist()) == {"llm:tiny-judge"}
    assert json.loads((run_dir / "judge.json").read_text())["served_by"] == judge_url
    assert not files_containing(run_dir, secret.encode()), "a run-dir file holds the secret"
