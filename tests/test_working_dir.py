"""[Ops & ecosystem] Ship code with the job: `ray job submit --working-dir DIR -- mosaic-ray train` runs DIR's source
tree (driver, rollout workers, learners), not the installed copy.

The mechanism is the layout shim in `mosaic_ray/__init__.py`: Ray puts the unpacked working dir first on every
job process's path, so `mosaic_ray` comes from it; the shim then maps `mosaic_ray.actors` / `.learners` /
`.benchmarks` to the same tree's `actors/`, `learners/`, `benchmarks/` (pyproject's package-dir layout).
The test copies the tree, plants markers that only the copy has, and finds them in the job's log, printed by
the driver and by Ray worker processes (Ray prefixes a worker's output with its pid).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_job_submit import ROOT, ray_head, submit_smoke

SOURCE_ROOTS = ("mosaic_ray", "actors", "learners", "benchmarks")


def source_copy(dst: Path, marker: str) -> Path:
    """The package's source tree copied to `dst`, with a print of `marker` at import of three modules: the CLI
    (the driver), the rollout worker and the learner (imported by the worker processes of their actors)."""
    for name in SOURCE_ROOTS:
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    for rel, where in (("mosaic_ray/cli.py", "cli"), ("actors/rollout_worker.py", "actors"),
                       ("learners/learner.py", "learners")):
        with open(dst / rel, "a") as fh:
            fh.write(f"\nprint('{marker}-{where}', flush=True)\n")
    return dst


def test_a_source_tree_on_the_path_supplies_every_subpackage(tmp_path):
    tree = source_copy(tmp_path / "tree", "COPY")
    code = ("import mosaic_ray.actors.fleet, mosaic_ray.learners.group, mosaic_ray.benchmarks.cluster as r; "
            "print(mosaic_ray.__file__, mosaic_ray.actors.fleet.__file__, mosaic_ray.learners.group.__file__, "
            "r.__file__)")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tree)},
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    *markers, files = res.stdout.splitlines()
    assert markers == ["COPY-actors", "COPY-learners"]
    assert len(files.split()) == 4 and all(f.startswith(str(tree)) for f in files.split()), files


@pytest.mark.slow
def test_job_submit_runs_the_submitted_tree(tmp_path):
    marker = f"MOSAIC_WD_{uuid.uuid4().hex[:10]}"
    tree = source_copy(tmp_path / "tree", marker)
    with ray_head("wd") as head:
        log = submit_smoke(head, tmp_path / "run", "mosaic-wd", working_dir=tree,
                           extra=("--set", "warmstart.first_turn_steps=0"))
    assert re.search(rf"^{marker}-cli$", log, re.MULTILINE), log[-3000:]
    for where in ("actors", "learners"):  # printed by a Ray worker process: Ray prefixes its lines with (pid=N)
        assert re.search(rf"\((\w+ )?pid=\d+\)(\x1b\[[0-9;]*m)* {marker}-{where}$", log, re.MULTILINE), log[-3000:]
    # the learner-update progress line (non-TTY: one line per update)
    assert re.search(r"iteration 0: learner update: done in", log), log[-3000:]
