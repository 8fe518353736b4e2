"""Training with the paper's LLM judge served by Ray Serve (`judge.kind: llm`), end to end through the CLI.

The smoke run's pairs come from the `mosaic-judge` Serve app (the shipped tiny base model as the judge: its
verdicts are mostly unparseable, which is measured, not hidden); the run dir records the judge model, the prompt
version and the verdict counts; the per-iteration judge metrics are in `metrics.jsonl`. Then the run is put back
to the state of a crash after iteration 1's trajectories were committed but before its pairs were: the resumed
run completes the iteration from the stored trajectories and the verdict cache, and asks the judge nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mosaic_ray.storage import RunStorage

pytestmark = pytest.mark.slow
SMALL = ["warmstart.steps=4", "warmstart.num_demos=20", "warmstart.first_turn_steps=0", "train.eval_size=4",
         "protocol.max_steps=3"]
"""smoke with a shorter warm start and evaluation: still two iterations of four groups judged by the served judge"""


def train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "mosaic_ray.cli", "train", "--quiet", *args], capture_output=True,
                       text=True, timeout=900, env=env, check=False)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


def crash_after_trajectories(run: Path, iteration: int) -> None:
    """Back to the checkpoint of `iteration - 1`, with `iteration`'s pairs and rewards never committed."""
    state = json.loads((run / "state.json").read_text())
    prev = next(r for r in state["rows"] if r["iteration"] == iteration - 1)
    state.update(next_iteration=iteration, checkpoint=f"checkpoints/iter-{iteration - 1:05d}",
                 checkpoint_iteration=iteration - 1, policy_version=int(prev["policy_version"]),
                 rows=[r for r in state["rows"] if r["iteration"] < iteration])
    (run / "state.json").write_text(json.dumps(state))
    for ds in ("pairs", "rewards"):
        path = run / ds / "_manifest.json"
        manifest = json.loads(path.read_text())
        manifest["shards"] = [s for s in manifest["shards"] if not s["name"].startswith(f"it{iteration:06d}-")]
        path.write_text(json.dumps(manifest))


def test_smoke_trains_with_the_served_llm_judge_and_a_resume_asks_nothing_twice(tmp_path):
    run = tmp_path / "run"
    train("--config", "smoke", "--set", "judge.kind=llm", "--run-dir", str(run), *[a for s in SMALL for a in ("--set", s)])
    store = RunStorage(str(run))
    pairs = store.read_dataset("pairs")
    assert pairs.num_rows > 0 and set(pairs.column("judge").to_pylist()) == {"llm:builtin:tiny-base"}
    record = json.loads((run / "judge.json").read_text())
    assert record["model"] == "builtin:tiny-base" and record["served_by"] == "ray serve app mosaic-judge"
    assert record["prompt_version"].startswith("mosaic-judge-")
    totals = record["totals"]
    assert totals["compares"] == pairs.num_rows
    assert totals["asked"] + totals["cache_hits"] >= 2 * totals["compares"]
    assert totals["asked"] == 2 * totals["compares"] - totals["cache_hits"] + totals["retries"]
    assert store.read_dataset("verdicts").num_rows == totals["asked"] - totals["retries"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    it_rows = [r for r in rows if r.get("iteration", -1) >= 0 and "judge/pairs" in r]
    assert len(it_rows) == 2
    for key in ("judge/pairs_per_s", "judge/parse_failures", "judge/position_inconsistent",
                "judge/latency_s_per_request", "judge/cache_hits"):
        assert all(key in r for r in it_rows), key
    assert sum(r["judge/pairs"] for r in it_rows) == totals["compares"]

    crash_after_trajectories(run, 1)
    train("--resume", str(run))
    after = json.loads((run / "judge.json").read_text())["totals"]
    assert after["asked"] == totals["asked"], "the resumed run asked the judge again"
    assert after["cache_hits"] > totals["cache_hits"]
    repaired = RunStorage(str(run)).read_dataset("pairs")
    assert repaired.num_rows == pairs.num_rows
    assert sorted(repaired.column("pair_id").to_pylist()) == sorted(pairs.column("pair_id").to_pylist())
