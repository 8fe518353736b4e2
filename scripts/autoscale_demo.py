"""Elasticity on Ray's real autoscaler, on one machine: demand beyond the head adds nodes, idle nodes go away.

A head is started with Ray's fake multi-node provider (`RAY_FAKE_CLUSTER=1`, `provider.type: fake_multinode`):
the real autoscaler monitor runs unchanged and "launches" worker nodes as extra raylets on this host. The
node type carries the rollout custom resource (`mosaic_ray.actors.resources.ROLLOUT_RESOURCE`), exactly as
the rollout groups in `clusters/` do, and the demand is created with `actor_options("rollout", cfg)`, so this
exercises the same resource matching a real cluster relies on.

Why by hand: `ray.cluster_utils.AutoscalingCluster` is broken in Ray 2.60 (its YAML is not in the wheel) and
runs `ray stop --force`, which kills every Ray process on the host. Here the YAML is generated into a private
temp dir, every head port is explicit, `provider.gcs_address` points at this head (otherwise the fake nodes
join whatever listens on 6379), and the cluster is stopped by PID through an environment marker.

    python scripts/autoscale_demo.py [--actors 4] [--work-s 3] [--json-out result.json]

Prints a timeline, a timing table and one JSON line. The workload (`run_demand`) is the real rollout fleet with
`rollout.request_autoscaler`: it asks the autoscaler for worker resources, grows onto the nodes that join, and
after the run clears its request so the idle nodes are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mosaic_ray.actors.resources import (
    CLUSTER_RESOURCES_ENV,
    NODE_RESOURCE_AMOUNT,
    ROLLOUT_RESOURCE,
    actor_options,
)
from mosaic_ray.benchmarks.cluster import RayHead

from mosaic_ray.config import MosaicConfig, load_config
from mosaic_ray.hygiene import set_torch_threads

WORKER_NODE_TYPE = "mosaic.rollout.cpu"
HEAD_NODE_TYPE = "ray.head.default"  # the fake provider names its head node type this way
NODE_OBJECT_STORE_BYTES = 100 * 1024 * 1024


# ------------------------------------------------------------------------------------------- cluster


def fake_autoscaling_config(gcs_address: str, *, cpus_per_node: int, max_nodes: int,
                            idle_timeout_minutes: float) -> dict[str, Any]:
    """A `ray up`-shaped config for the fake multi-node provider with one rollout worker node type."""
    return {
        "cluster_name": "mosaic-fake",
        "max_workers": max_nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            HEAD_NODE_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            WORKER_NODE_TYPE: {
                "resources": {"CPU": cpus_per_node, ROLLOUT_RESOURCE: NODE_RESOURCE_AMOUNT,
                              "object_store_memory": NODE_OBJECT_STORE_BYTES},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_nodes,
            },
        },
        "head_node_type": HEAD_NODE_TYPE,
        "auth": {},
        "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def start_fake_cluster(temp_dir: str, *, cpus_per_node: int, max_nodes: int, idle_timeout_minutes: float,
                       attempts: int = 2) -> RayHead:
    """Write the YAML into `temp_dir` and start a 1-CPU head whose autoscaler uses the fake provider.

    A second attempt (fresh ports) because `ray start` gives the raylet a fixed 30 s to register, which a
    2-core machine under load sometimes misses; a failed start has already been stopped by PID.
    """
    import ray

    def configured_head() -> RayHead:
        head = RayHead(temp_dir=temp_dir, num_cpus=1,
                       env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        # `--node-ip-address=127.0.0.1` is replaced by the host's address; the fake nodes must dial that one.
        gcs_address = f"{ray.util.get_node_ip_address()}:{head.port}"
        config_path = Path(temp_dir) / "fake_autoscale.yaml"
        config_path.write_text(yaml.safe_dump(fake_autoscaling_config(
            gcs_address, cpus_per_node=cpus_per_node, max_nodes=max_nodes,
            idle_timeout_minutes=idle_timeout_minutes)))
        head.extra_args = (f"--autoscaling-config={config_path}", "--include-dashboard=false",
                           f"--object-store-memory={NODE_OBJECT_STORE_BYTES}")
        return head

    for _ in range(attempts - 1):
        try:
            return configured_head().start()
        except RuntimeError as e:
            print(f"head start failed, retrying: {str(e)[-200:]}", file=sys.stderr)
    return configured_head().start()


# ------------------------------------------------------------------------------------------ watching


@dataclass
class NodeEvent:
    t: float
    """Seconds since the driver connected."""
    node_id: str
    event: str
    """`added` or `removed`."""


@dataclass
class NodeWatcher:
    """Polls `ray.nodes()` in a thread and records when worker nodes (not the head) appear and vanish."""

    head_node_id: str
    t0: float
    interval_s: float = 0.25
    events: list[NodeEvent] = field(default_factory=list)
    alive: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> NodeWatcher:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        import ray

        while not self._stop.is_set():
            now = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - {self.head_node_id}
            t = time.monotonic() - self.t0
            self.events += [NodeEvent(t, nid, "added") for nid in sorted(now - self.alive)]
            self.events += [NodeEvent(t, nid, "removed") for nid in sorted(self.alive - now)]
            self.alive = now
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()

    def wait_until(self, cond, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cond(self):
                return True
            time.sleep(0.2)
        return cond(self)

    def times(self, event: str) -> list[float]:
        return [e.t for e in self.events if e.event == event]


# ------------------------------------------------------------------------------------------ workload


@dataclass
class ActorRun:
    """One rollout worker of the fleet: where it ran and when its first and last episodes finished."""

    actor: int
    node_id: str
    started_s: float
    finished_s: float
    episodes: int = 0


def run_demand(cfg: MosaicConfig, *, num_actors: int, work_s: float, t0: float) -> list[ActorRun]:
    """A real rollout run that the head cannot hold: the rollout fleet (scripted policy, `work_s` of simulated
    generation per turn) with `rollout.request_autoscaler` asks Ray's autoscaler for up to `num_actors` workers'
    resources, grows onto the nodes that join, and streams every trajectory back exactly once."""
    from mosaic_ray.actors.fleet import RolloutFleet

    from mosaic_ray.models.tiny import cached_tiny_model
    from mosaic_ray.scenarios import load_tasks

    model_dir = cached_tiny_model(cfg.model.tiny)  # the workers' tokenizer
    fleet_cfg = load_config("tiny-cpu", [
        "rollout.colocate_engine=false", "rollout.autoscale=true", f"rollout.num_cpus_per_worker={cfg.rollout.num_cpus_per_worker}", "rollout.min_workers=1",
        f"rollout.max_workers={num_actors}", "rollout.request_autoscaler=true", "rollout.max_in_flight_per_worker=1",
        "rollout.scale_up_queue_per_worker=1", "rollout.idle_scale_down_s=1"])
    tasks = load_tasks("train", size=3 * num_actors, categories=("benign",))
    seen: dict[str, ActorRun] = {}
    fleet = RolloutFleet(fleet_cfg, model_dir=str(model_dir), scripted="naive", scripted_delay_s=work_s,
                         run_id="autoscale-demo")
    try:
        n = 0
        for batch in fleet.stream(tasks, group_size=2, iteration=0):
            now = round(time.monotonic() - t0, 2)
            nodes = {wid: info["node_id"] for wid, info in fleet.workers().items()}
            for wid in batch.column("worker_id").to_pylist():
                run = seen.setdefault(wid, ActorRun(len(seen), nodes.get(wid, "?"), now, now))
                run.finished_s, run.episodes = now, run.episodes + 1
                n += 1
        if n != 2 * len(tasks):
            raise RuntimeError(f"autoscale demo: {n} trajectories for {2 * len(tasks)} episodes")
    finally:
        fleet.shutdown()  # workers end; the autoscaler request is cleared, so idle nodes can go
    return list(seen.values())


# ---------------------------------------------------------------------------------------------- main


def run(num_actors: int = 4, work_s: float = 0.5, cpus_per_node: int = 1, max_nodes: int = 2,
        idle_timeout_minutes: float = 0.05, scale_down_timeout_s: float = 60.0) -> dict[str, Any]:
    """Start the fake cluster, run the demand, wait for scale-down, stop everything; return the record."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # What every config in clusters/ declares for its driver: the node types below advertise this resource.
    os.environ[CLUSTER_RESOURCES_ENV] = ROLLOUT_RESOURCE
    cfg = load_config("tiny-cpu", ["rollout.num_cpus_per_worker=0.5"])
    temp_dir = tempfile.mkdtemp(prefix="mosaic-as-", dir="/tmp")  # short: unix socket paths are limited
    timings: dict[str, float] = {}
    t_start = time.monotonic()
    head = None
    try:
        head = start_fake_cluster(temp_dir, cpus_per_node=cpus_per_node, max_nodes=max_nodes,
                                  idle_timeout_minutes=idle_timeout_minutes)
        timings["head_start_s"] = time.monotonic() - t_start
        ray.init(address=head.address, log_to_driver=False)
        t0 = time.monotonic()
        watcher = NodeWatcher(ray.get_runtime_context().get_node_id(), t0).start()
        options = actor_options("rollout", cfg)
        runs = run_demand(cfg, num_actors=num_actors, work_s=work_s, t0=t0)
        timings["demand_done_s"] = time.monotonic() - t0
        added = len(watcher.times("added"))
        watcher.wait_until(lambda w: not w.alive and len(w.times("removed")) >= added, scale_down_timeout_s)
        timings["scaled_down_s"] = time.monotonic() - t0
        watcher.stop()
    finally:
        ray.shutdown()
        t_stop = time.monotonic()
        stopped = head.stop() if head is not None else 0
        timings["stop_s"] = time.monotonic() - t_stop
        shutil.rmtree(temp_dir, ignore_errors=True)
    worker_nodes = sorted({e.node_id for e in watcher.events})
    timings["total_s"] = time.monotonic() - t_start
    return {
        "actor_options": options,
        "num_actors": len(runs),
        "max_workers": num_actors,
        "work_s": work_s,
        "nodes_added": len(watcher.times("added")),
        "nodes_removed": len(watcher.times("removed")),
        "node_added_at_s": [round(t, 2) for t in watcher.times("added")],
        "node_removed_at_s": [round(t, 2) for t in watcher.times("removed")],
        "worker_node_ids": worker_nodes,
        "node_events": [{"t": round(e.t, 2), "node_id": e.node_id, "event": e.event} for e in watcher.events],
        "actors": [asdict(r) for r in runs],
        "actors_on_worker_nodes": sum(r.node_id in worker_nodes for r in runs),
        "processes_stopped": stopped,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }


def _short(node_id: str) -> str:
    return f"…{node_id[-6:]}"  # fake node ids differ only in their tail


def print_report(rec: dict[str, Any]) -> None:
    print(f"actor options: {rec['actor_options']}")
    lines = [(e["t"], f"worker node {_short(e['node_id'])} {e['event']}") for e in rec["node_events"]]
    for a in rec["actors"]:
        span = f"{a['started_s']:.2f}..{a['finished_s']:.2f}s"
        lines.append((a["started_s"], f"actor {a['actor']} ran {span} on node {_short(a['node_id'])}"))
    for t, text in sorted(lines):
        print(f"  t={t:6.2f}s  {text}")
    print(f"\n{'phase':<28}{'seconds':>10}")
    rows = [("head start (ray start)", rec["timings_s"]["head_start_s"])]
    rows += [(f"node {i + 1} joined", t) for i, t in enumerate(rec["node_added_at_s"])]
    rows += [("demand finished", rec["timings_s"]["demand_done_s"])]
    rows += [(f"node {i + 1} removed", t) for i, t in enumerate(rec["node_removed_at_s"])]
    rows += [("stop by PID", rec["timings_s"]["stop_s"]), ("total wall", rec["timings_s"]["total_s"])]
    for name, sec in rows:
        print(f"{name:<28}{sec:>10.2f}")
    print(f"(times after 'head start' are from the driver's connect; {rec['actors_on_worker_nodes']}/"
          f"{rec['num_actors']} actors ran on autoscaled nodes)")
    print(json.dumps(rec))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actors", type=int, default=4, help="max rollout workers the fleet may grow to")
    parser.add_argument("--work-s", type=float, default=0.5, help="simulated generation seconds per turn")
    parser.add_argument("--cpus-per-node", type=int, default=1, help="CPUs of one fake worker node")
    parser.add_argument("--max-nodes", type=int, default=2, help="max worker nodes the autoscaler may add")
    parser.add_argument("--json-out", type=Path, help="also write the JSON record here")
    args = parser.parse_args(argv)
    set_torch_threads(1)
    rec = run(num_actors=args.actors, work_s=args.work_s, cpus_per_node=args.cpus_per_node,
              max_nodes=args.max_nodes)
    print_report(rec)
    if args.json_out:
        args.json_out.write_text(json.dumps(rec, indent=1))
    ok = rec["nodes_added"] >= 1 and rec["nodes_removed"] == rec["nodes_added"] and \
        rec["actors_on_worker_nodes"] == rec["num_actors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
