"""[Fault tolerance] The chaos run on a smaller budget: a real training run on a two-node local Ray cluster survives
a SIGKILL of a rollout worker, an engine, the pair builder and a learner, and an engine hung past its request
deadline, with nothing lost or duplicated in the run directory (benchmarks/chaos.py does the checking)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# the random-init tiny model: its longer, messier episodes keep every fault's iteration busy long enough to fire
# in three iterations (the shipped base finishes episodes so fast that a fault's window can close)
SMALL = ["model.path=null", "warmstart.steps=6", "warmstart.num_demos=60", "warmstart.first_turn_steps=2", "train.eval_size=4",
         "rollout.tasks_per_iteration=4", "protocol.max_steps=3", "protocol.max_new_tokens=32",
         "scenarios.train_size=100", "scenarios.test_size=40"]


@pytest.mark.slow
def test_chaos_run_survives_every_fault_kind_with_nothing_lost(tmp_path):
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, "-m", "mosaic_ray.benchmarks.chaos", "--out", str(out), "--iterations", "3",
           "--seed", "1", "--hang-s", "30", "--port-base", "33500", *[a for s in SMALL for a in ("--set", s)]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, check=False)
    assert out.is_file(), done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["run_complete"], result["error"]
    assert result["check"]["problems"] == [] and result["injector_errors"] == []
    assert result["lost"] == 0 and result["duplicated"] == 0
    kinds = {f["kind"]: f for f in result["faults"]}
    assert set(kinds) == {"rollout", "engine", "pair", "learner", "hang"}
    assert all(f["injected_at_s"] is not None and f["recovered"] for f in kinds.values()), kinds
    assert result["fault_counters"]["learner/reforms"] >= 1
    assert result["fault_counters"]["engines/hung_engines_killed"] + result["fault_counters"]["engines/engine_restarts"] >= 2
    assert result["check"]["reward_rows_checked"] == result["check"]["trajectories_hashed"] == 3 * 4 * 4
    assert done.returncode == 0 and "| faults injected | survived | records lost | records duplicated |" in done.stdout
