"""[Fault tolerance] The chaos run on a smaller budget: a real training run on a two-node local Ray cluster survives
a SIGKILL of a rollout worker, an engine, the pair builder and a learner, and an engine hung past its request
deadline, with nothing lost or duplicated in the run directory (benchmarks/chaos.py does the checking)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mosaic_ray.hygiene import free_ports

# a small run: the random-init tiny model, three iterations of four tasks (the faults fill the first two)
SMALL = ["model.path=null", "warmstart.steps=6", "warmstart.num_demos=60", "warmstart.first_turn_steps=2", "train.eval_size=4",
         "rollout.tasks_per_iteration=4", "protocol.max_steps=3", "protocol.max_new_tokens=32",
         "scenarios.train_size=100", "scenarios.test_size=40"]


def _chaos_run(tmp_path) -> tuple[dict, subprocess.CompletedProcess]:
    out, port_base = tmp_path / "chaos.json", free_ports(200)
    cmd = [sys.executable, "-m", "mosaic_ray.benchmarks.chaos", "--out", str(out), "--iterations", "3",
           "--seed", "1", "--hang-s", "30", "--port-base", str(port_base),
           *[a for s in SMALL for a in ("--set", s)]]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, check=False)
    finally:  # a benchmark killed on timeout never stops its `ray start` nodes: they would hold the ports
        _kill_cluster(f"/tmp/mrc{port_base}-")
    assert out.is_file(), done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done


def _kill_cluster(temp_prefix: str) -> None:
    """SIGKILL every process whose command line names the cluster's temp dir (`LocalCluster`: GCS, raylets,
    workers, agents); nothing else is touched."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if temp_prefix.encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_chaos_run_survives_every_fault_kind_with_nothing_lost(tmp_path):
    # every fault fires from the driver's receipt stream while its iteration's other episodes are in flight
    result, done = _chaos_run(tmp_path)
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
