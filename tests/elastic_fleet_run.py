"""Elastic rollout fleet on a real two-node Ray cluster (run in a subprocess by tests/test_fleet_elastic.py).

    python tests/elastic_fleet_run.py MODEL_DIR [--tasks 60] [--group-size 4] [--delay-s 0.2]

Starts its own `ray.cluster_utils.Cluster` (private RAY_TMPDIR, explicit head ports, no dashboard), whose head
has room for 2 rollout workers, and streams tasks × G scripted episodes through a RolloutFleet (min 1, max 4
workers, 1 CPU each). Mid-run it adds a 2-CPU node and waits until the fleet has workers there (the consumer
pauses; the fleet's control thread scales on its own), resumes until a new-node worker has delivered
episodes and holds episodes in flight, then removes that node, and streams to the end.

Prints one JSON line (last line of stdout) with what the test asserts: counts of trajectory ids, the new
node id, the worker node ids seen at each phase, and the fleet's counters.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def wait_for(cond, timeout_s: float, what: str) -> float:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)
    return time.time() - t0


def stop_processes_under(path: str) -> None:
    """SIGKILL the processes whose command line names `path` (the Ray processes this script started there)."""
    import signal

    for proc in os.listdir("/proc"):
        if not proc.isdigit() or int(proc) == os.getpid():
            continue
        try:
            with open(f"/proc/{proc}/cmdline", "rb") as f:
                if path.encode() in f.read():
                    os.kill(int(proc), signal.SIGKILL)
        except OSError:
            pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--tasks", type=int, default=60)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--delay-s", type=float, default=0.2)
    ap.add_argument("--join-timeout-s", type=float, default=240.0)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="mre-", dir="/tmp")  # short: Ray's socket paths must stay short
    os.environ["RAY_TMPDIR"] = tmp  # Cluster writes ray_current_cluster here, not in the shared /tmp/ray

    import ray
    from mosaic_ray.actors.fleet import RolloutFleet
    from ray.cluster_utils import Cluster

    from mosaic_ray.config import load_config
    from mosaic_ray.hygiene import free_port, set_torch_threads
    from mosaic_ray.scenarios import load_tasks

    set_torch_threads(1)
    t_start = time.time()
    head_args = {"num_cpus": 2, "include_dashboard": False, "gcs_server_port": free_port(),
                 "metrics_agent_port": free_port(), "node_manager_port": free_port(),
                 "object_manager_port": free_port(), "dashboard_agent_listen_port": free_port(),
                 "runtime_env_agent_port": free_port(), "object_store_memory": 200 * 1024 * 1024}
    try:
        cluster = Cluster(initialize_head=True, head_node_args=head_args)
    except Exception:  # noqa: BLE001 - on an overloaded host the head can miss Ray's fixed 30 s registration window: once more
        stop_processes_under(tmp)
        try:
            cluster = Cluster(initialize_head=True, head_node_args=head_args)
        except BaseException:
            stop_processes_under(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    fleet = None
    result: dict = {}
    try:
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                           "TOKENIZERS_PARALLELISM": "false"}})
        head_node = ray.get_runtime_context().get_node_id()
        cfg = load_config("tiny-cpu", [
            "rollout.colocate_engine=false", "rollout.autoscale=true", "rollout.min_workers=1", "rollout.max_workers=4", "rollout.num_cpus_per_worker=1",
            "rollout.episodes_per_worker=4", "rollout.scale_up_queue_per_worker=2",
            "rollout.idle_scale_down_s=600", "rollout.control_interval_s=0.25", "rollout.max_episode_retries=3"])
        fleet = RolloutFleet(cfg, model_dir=args.model_dir, scripted="naive", scripted_delay_s=args.delay_s,
                             run_id="elastic", num_workers=2)
        tasks = load_tasks("train", size=args.tasks)
        counts: collections.Counter = collections.Counter()
        by_worker: collections.Counter = collections.Counter()
        phase = "before_add"
        new_node = None
        new_workers: set[str] = set()
        nodes_seen: dict[str, list[str]] = {}
        timeline: dict[str, float] = {"cluster_up_s": time.time() - t_start}
        for batch in fleet.stream(tasks, group_size=args.group_size, iteration=0, policy_version=0):
            timeline.setdefault("first_batch_s", time.time() - t_start)
            counts.update(batch.column("traj_id").to_pylist())
            by_worker.update(batch.column("worker_id").to_pylist())
            if phase == "before_add":
                nodes_seen["before_add"] = sorted(set(fleet.worker_nodes()))
                t0 = time.time()
                node = cluster.add_node(num_cpus=2)
                new_node = node.node_id
                timeline["add_node_s"] = time.time() - t0
                timeline["fleet_on_new_node_s"] = wait_for(
                    lambda nid=new_node: nid in fleet.worker_nodes(), args.join_timeout_s,
                    "a fleet worker on the new node")
                phase = "grown"
            if phase == "grown":
                workers_now = fleet.workers()
                new_workers |= {wid for wid, w in workers_now.items() if w["node_id"] == new_node}
                in_flight_there = sum(w["in_flight"] for w in workers_now.values() if w["node_id"] == new_node)
                # remove the node only once its workers have delivered AND hold episodes right now: a batch can
                # carry every episode a worker had, leaving it empty until the next dispatch
                if any(by_worker[w] for w in new_workers) and in_flight_there > 0:
                    nodes_seen["grown"] = sorted(set(fleet.worker_nodes()))
                    result["workers_at_peak"] = fleet.num_workers
                    result["in_flight_on_new_node_at_removal"] = in_flight_there
                    t0 = time.time()
                    cluster.remove_node(node)
                    timeline["remove_node_s"] = time.time() - t0
                    phase = "removed"
        nodes_seen["end"] = sorted(set(fleet.worker_nodes()))
        timeline["total_s"] = time.time() - t_start
        result.update({
            "expected": len(tasks) * args.group_size, "rows": sum(counts.values()), "unique": len(counts),
            "max_per_id": max(counts.values()) if counts else 0, "head_node": head_node, "new_node": new_node,
            "phase": phase, "nodes_seen": nodes_seen, "workers_at_end": fleet.num_workers,
            "episodes_by_new_node_workers": sum(by_worker[w] for w in new_workers),
            "stats": fleet.stats(), "timeline": timeline})
    finally:
        if fleet is not None:
            fleet.shutdown()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
