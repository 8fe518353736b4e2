"""Chaos run: a `smoke` training run on a local two-node Ray cluster while a seeded fault injector kills a rollout
worker, an engine, the pair builder and a learner, and hangs an engine past its request deadline; then a checker
reads the run directory and proves nothing was lost or duplicated.

    python -m mosaic_ray.benchmarks.chaos --out chaos.json [--seed 0] [--iterations 6] [--port-base 24000]

The cluster: two `ray start` nodes on this machine (a head and a worker node, 4 logical CPUs each), ports from
`--port-base` (+0…+199; by default a free block below the host's ephemeral ports), a private temp dir,
`RAY_AUTH_MODE=disabled`; stopped at the end by the PIDs of the processes it started (never `ray stop`). The faults
are real: SIGKILL of the actor's process (rollout worker, engine, pair builder, learner rank) and SIGSTOP of an
engine for `--hang-s` (longer than its request deadline; SIGCONT after, if the supervisor has not killed it by
then). Each fault goes to its own iteration when there are enough (the seed picks which, and after how many of the
iteration's episodes have landed; the last iteration stays clean). A fault fires from the driver's own receipt
stream, between two receipts, so it always hits while the iteration's other episodes are in flight, however fast or
slow the machine.

The checker reads only the run directory:
- every (iteration, group) the driver scheduled is committed exactly once in each of `trajectories/`, `pairs/`
  and `rewards/` (manifest entries), with G trajectory rows, G(G-1)/2 pair rows and G reward rows, no id twice;
- every reward row belongs to a stored trajectory: the rubric's rewards recomputed from the stored trajectories
  (their token ids hashed, counted and graded) equal the stored reward rows;
- the policy version advanced exactly once per completed update (metrics rows), and every trajectory of an
  iteration carries the version its rollouts were generated with (no restarted engine served its base model);
- no file outside the manifests is counted: every manifest entry names an existing file with its row count,
  the datasets read through the manifests hold exactly the expected rows, and orphan files (a killed writer's
  in-flight shard) are listed, not read.

It prints faults injected / survived / records lost / records duplicated as a table, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mosaic_ray.hygiene import free_ports

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAULT_KINDS = ("rollout", "engine", "pair", "learner", "hang")
"""rollout worker killed, engine killed, pair builder killed, learner rank killed, engine hung past its deadline."""
DATASETS = ("trajectories", "pairs", "rewards")
RECOVERY_TIMEOUT_S = 600.0
SETTLE_S = 90.0
"""Longest wait for self-driven recoveries before the last iteration: a hang (`--hang-s` 30) is killed after
`engine.hung_after_s` (15), restarted and reloaded in well under this."""


# ------------------------------------------------------------------------------------------------ cluster


class LocalCluster:
    """Two `ray start` nodes on this machine on a block of 200 ports and a private temp dir; stopped by PID."""

    def __init__(self, port_base: int | None = None, num_cpus: int = 4,
                 node_env: tuple[dict[str, str], ...] = ({}, {})):
        """`port_base`: the first of the 200 ports the two nodes use (default: 200 free ones from
        `hygiene.quiet_ports()`). `node_env`: extra environment of the head's and the worker's processes (e.g. each
        node its own model cache, as two machines would have)."""
        self.port_base = free_ports(200) if port_base is None else port_base
        self.num_cpus = num_cpus
        self.node_env = node_env
        self.temp_dir = tempfile.mkdtemp(prefix=f"mrc{self.port_base}-", dir="/tmp")  # short: Ray's socket paths
        self.address = f"127.0.0.1:{self.port_base}"

    def _node_ports(self, base: int) -> list[str]:
        return ["--node-ip-address=127.0.0.1", f"--node-manager-port={base + 1}", f"--object-manager-port={base + 2}",
                f"--metrics-export-port={base + 3}", f"--runtime-env-agent-port={base + 4}",
                f"--dashboard-agent-listen-port={base + 5}", f"--dashboard-agent-grpc-port={base + 6}",
                f"--min-worker-port={base + 10}", f"--max-worker-port={base + 89}", f"--num-cpus={self.num_cpus}",
                f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]

    def start(self) -> LocalCluster:
        ray_bin = str(Path(sys.executable).with_name("ray"))
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        b = self.port_base
        head = [ray_bin, "start", "--head", f"--port={b}", f"--ray-client-server-port={b + 7}",
                "--include-dashboard=false", *self._node_ports(b)]
        worker = [ray_bin, "start", f"--address={self.address}", *self._node_ports(b + 100)]
        for cmd, extra in zip((head, worker), self.node_env):
            done = subprocess.run(cmd, check=False, env={**env, **extra}, capture_output=True, text=True,
                                  timeout=180)
            if done.returncode != 0:
                self.stop()
                raise RuntimeError(f"chaos: `{' '.join(cmd[:3])}` failed: {done.stderr.strip()[-600:]}")
        return self

    def pids(self) -> list[int]:
        """Every process whose command line names this cluster's temp dir (GCS, raylets, workers, agents), and
        its Ray client server (which names only its own port)."""
        mine = self.temp_dir.encode()
        client_server = f"--port={self.port_base + 7}".encode()
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        cmdline = f.read()
                except OSError:
                    continue
                if mine in cmdline or (b"ray.util.client.server" in cmdline and client_server + b"\0" in cmdline):
                    out.append(int(entry))
        return out

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.5)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(wait)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# -------------------------------------------------------------------------------------------- injector


@dataclass
class Fault:
    kind: str
    iteration: int
    after_episodes: int
    """It fires once this many of its iteration's episodes have landed in the pair builder (others in flight)."""
    injected_at_s: float | None = None
    target: str = ""
    recovered: bool = False
    recovery_s: float | None = None
    evidence: str = ""


def plan_faults(seed: int, iterations: int, episodes_per_iteration: int) -> list[Fault]:
    """One fault of each kind, each in its own iteration when there are enough (never the engine kill and the
    hang in the same one), after a seeded number of the iteration's episodes (at most half of them, so others
    are in flight). The last iteration stays clean, so every recovery is seen before the run ends."""
    rng = random.Random(seed)
    usable = max(1, iterations - 1)
    slots = list(range(usable)) * (len(FAULT_KINDS) // usable + 1)
    rng.shuffle(slots)
    its = dict(zip(FAULT_KINDS, slots))
    if its["engine"] == its["hang"] and usable > 1:
        its["hang"] = (its["engine"] + 1) % usable
    return [Fault(kind, its[kind], rng.randint(1, max(1, episodes_per_iteration // 2))) for kind in FAULT_KINDS]


class FaultInjector:
    """Fires `faults` at a live `Trainer` (its actors' processes) from its rollouts' receipt stream, and watches
    each recovery in the background."""

    def __init__(self, trainer: Any, faults: list[Fault], *, hang_s: float):
        self.t, self.faults, self.hang_s = trainer, faults, hang_s
        self.t0 = time.monotonic()
        self.finished = threading.Event()
        """Set by the caller when the training run returned: recoveries not seen by then never happened."""
        self.watchers: list[threading.Thread] = []
        self.errors: list[str] = []

    def install(self) -> None:
        """Wrap the trainer's `collect`: its fleet's `deliver` fires due faults between receipts (the fleet exists
        once the run set up), and the last iteration first waits for the recoveries (it stays fault-free and
        sees them through)."""
        collect, last = self.t.collect, self.t.cfg.train.iterations - 1

        def gated(iteration: int) -> Any:
            if not getattr(self.t.fleet.deliver, "chaos", False):
                self._wrap_deliver()
            if iteration == last:
                self.settle()
            return collect(iteration)

        self.t.collect = gated

    def _wrap_deliver(self) -> None:
        deliver = self.t.fleet.deliver

        def firing(*args: Any, **kwargs: Any) -> Any:
            landed = 0
            for receipts in deliver(*args, **kwargs):
                landed += len(receipts)
                self._fire_due(kwargs["iteration"], landed)
                yield receipts

        firing.chaos = True
        self.t.fleet.deliver = firing

    def _fire_due(self, iteration: int, landed: int) -> None:
        for fault in self.faults:
            if fault.injected_at_s is None and fault.iteration == iteration and landed >= fault.after_episodes:
                try:
                    self._inject(fault)
                except Exception as exc:  # noqa: BLE001 - reported in the result, never a silent stop
                    self.errors.append(f"{fault.kind}: {type(exc).__name__}: {exc}")

    def settle(self) -> None:
        """Before the run's last iteration: mark faults whose iteration passed without firing, then wait up to
        `SETTLE_S` for the recoveries that progress on their own (an engine restarted and reloaded by the
        supervisor, a pair builder restarted by Ray), so a fault late in the second-to-last iteration is not cut
        off by the end of the run. Recoveries noticed only when work is dispatched (a dead rollout worker) are
        not waited for here: the last iteration's own dispatch completes them."""
        for fault in self.faults:
            if fault.injected_at_s is None:
                fault.evidence = f"not injected: iteration {fault.iteration} ended before it could fire"
        deadline = time.monotonic() + SETTLE_S
        for watcher in list(self.watchers):
            watcher.join(timeout=max(0.0, deadline - time.monotonic()))

    def _inject(self, fault: Fault) -> None:
        import ray

        t = self.t
        fault.injected_at_s = round(time.monotonic() - self.t0, 2)
        if fault.kind == "rollout":
            busy = sorted(t.fleet.workers().items(), key=lambda kv: -kv[1]["in_flight"])
            wid = busy[0][0]
            handle = t.fleet.worker_handles()[wid]
            pid = ray.get(handle.__ray_call__.remote(lambda worker: os.getpid()), timeout=30)
            deaths = t.fleet.counters["worker_deaths"]
            os.kill(pid, signal.SIGKILL)
            fault.target = f"{wid} (pid {pid})"
            self._recovered(fault, lambda: t.fleet.counters["worker_deaths"] > deaths and t.fleet.num_workers > 0,
                            "the fleet marked it dead, re-queued its episodes and runs on a replacement")
        elif fault.kind in ("engine", "hang"):
            index = 0 if fault.kind == "engine" else 1
            engine = t.engines[index]
            pid = ray.get(engine.health.remote(), timeout=30)["pid"]
            fault.target = f"engine {index} (pid {pid})"
            if fault.kind == "engine":
                os.kill(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGSTOP)
                threading.Timer(self.hang_s, _continue, args=(pid,)).start()
            self._recovered(fault, lambda: _serving_again(engine, pid, t.state.policy_version),
                            "restarted in place (the hung one killed by the supervisor) and reloaded with the "
                            "current weights; requests meanwhile went to the other engine")
        elif fault.kind == "pair":
            pid = ray.get(t.pairs.__ray_call__.remote(lambda builder: os.getpid()), timeout=30)
            os.kill(pid, signal.SIGKILL)
            fault.target = f"pair builder (pid {pid})"
            self._recovered(fault, lambda: _pid_changed(t.pairs, pid),
                            "restarted from its manifests; lost calls retried, lost groups re-sent by the driver")
        elif fault.kind == "learner":
            reforms = t.learner.reforms
            pid = t.learner.pids[0]
            os.kill(pid, signal.SIGKILL)
            fault.target = f"learner rank 0 (pid {pid})"
            self._recovered(fault, lambda: t.learner.reforms > reforms,
                            "the group was torn down at the next step and re-formed from the last checkpoint")

    def _recovered(self, fault: Fault, check, evidence: str) -> None:
        """Watch for `check()` in the background (the next fault may fire meanwhile)."""
        watcher = threading.Thread(target=self._watch, args=(fault, check, evidence), daemon=True,
                                   name=f"chaos-watch-{fault.kind}")
        watcher.start()
        self.watchers.append(watcher)

    def _watch(self, fault: Fault, check, evidence: str) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < RECOVERY_TIMEOUT_S:
            try:
                if check():
                    fault.recovered, fault.recovery_s = True, round(time.monotonic() - t0, 2)
                    fault.evidence = evidence
                    return
            except Exception:  # noqa: BLE001, S110 - an actor still restarting; checked again
                pass
            if self.finished.is_set():
                break
            time.sleep(0.25)
        fault.evidence = f"no recovery seen within {time.monotonic() - t0:.0f} s"


def _continue(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _serving_again(engine: Any, old_pid: int, version: int) -> bool:
    import ray

    health = ray.get(engine.health.remote(), timeout=5)
    return health["pid"] != old_pid and health["serving"] and health["version"] >= version


def _pid_changed(handle: Any, old_pid: int) -> bool:
    import ray

    return ray.get(handle.__ray_call__.remote(lambda actor: os.getpid()), timeout=5) != old_pid


# --------------------------------------------------------------------------------------------- checker


def token_hash(rec: Any) -> str:
    return hashlib.sha1(json.dumps([rec.prompt_ids, rec.completion_ids]).encode()).hexdigest()[:16]


def check_run(run_uri: str, expected: dict[int, list[str]], group_size: int, judge_cfg: Any) -> dict[str, Any]:
    """Prove from the run directory alone what the module docstring lists; returns counts and problems."""
    import pyarrow.parquet as pq

    from mosaic_ray.judge import RubricJudge, judge_groups
    from mosaic_ray.rewards import group_rewards
    from mosaic_ray.schema import TrajectoryRecord, from_arrow
    from mosaic_ray.storage import RunStorage

    st = RunStorage(run_uri)
    G = group_size
    want_groups = Counter(g for groups in expected.values() for g in groups)
    problems: list[str] = []
    lost = duplicated = 0
    per_group_rows = {"trajectories": G, "pairs": G * (G - 1) // 2, "rewards": G}
    id_column = {"trajectories": "traj_id", "pairs": "pair_id", "rewards": "traj_id"}
    orphans: dict[str, list[str]] = {}
    tables = {}
    for ds in DATASETS:
        shards = st.committed_shards(ds)
        got = Counter(g for s in shards for g in s.meta.get("groups", []))
        for g, n in want_groups.items():
            if got[g] < n:
                lost += (n - got[g]) * per_group_rows[ds]
                problems.append(f"{ds}: group {g} committed {got[g]} times")
            elif got[g] > n:
                duplicated += (got[g] - n) * per_group_rows[ds]
                problems.append(f"{ds}: group {g} committed {got[g]} times")
        extra = sorted(set(got) - set(want_groups))
        if extra:
            problems.append(f"{ds}: {len(extra)} groups nobody scheduled (first {extra[0]})")
        listed = set()
        for s in shards:  # every manifest entry names an existing file with its rows
            path = st.path(ds, s.file)
            listed.add(path)
            rows = pq.ParquetFile(path, filesystem=st.filesystem).metadata.num_rows
            if rows != s.rows:
                problems.append(f"{ds}: {s.file} holds {rows} rows, the manifest says {s.rows}")
        st.filesystem.invalidate_cache()
        on_disk = {p for p in st.filesystem.find(st.path(ds)) if p.endswith(".parquet")}
        orphans[ds] = sorted(os.path.basename(p) for p in on_disk - listed)
        table = st.read_dataset(ds)
        tables[ds] = table
        ids = Counter(table.column(id_column[ds]).to_pylist())
        dup_ids = sum(n - 1 for n in ids.values() if n > 1)
        if dup_ids:
            duplicated += dup_ids
            problems.append(f"{ds}: {dup_ids} duplicated ids")
        want_rows = sum(want_groups.values()) * per_group_rows[ds]
        if len(ids) < want_rows:
            problems.append(f"{ds}: {len(ids)} distinct rows read through the manifests, {want_rows} expected")

    # rewards belong to the stored trajectories: recompute them from what is stored
    trajs = from_arrow(tables["trajectories"], TrajectoryRecord)
    by_group: dict[str, list[TrajectoryRecord]] = {}
    for rec in sorted(trajs, key=lambda r: r.sample_idx):
        by_group.setdefault(rec.group_id, []).append(rec)
    judge = RubricJudge(judge_cfg.tie_tolerance_tokens)
    expected_rewards = {}
    hashes = {r.traj_id: token_hash(r) for r in trajs}
    for recs in by_group.values():
        expected_rewards.update({r.traj_id: r for r in group_rewards(recs, judge_groups(judge, [recs])[0], judge_cfg)})
    mismatched = 0
    for row in tables["rewards"].to_pylist():
        want = expected_rewards.get(row["traj_id"])
        stored = want is not None and row["traj_id"] in hashes
        if not stored or abs(row["reward"] - want.reward) > 1e-5 or abs(row["advantage"] - want.advantage) > 1e-5:
            mismatched += 1
    if mismatched:
        problems.append(f"rewards: {mismatched} rows do not match the rewards of the stored trajectories")
    pair_refs = sum(1 for row in tables["pairs"].to_pylist() if row["a"] not in hashes or row["b"] not in hashes)
    if pair_refs:
        problems.append(f"pairs: {pair_refs} rows name a trajectory that is not stored")
    return {"lost": lost, "duplicated": duplicated, "reward_rows_checked": tables["rewards"].num_rows,
            "reward_rows_mismatched": mismatched, "trajectories_hashed": len(hashes),
            "orphan_files_not_counted": orphans, "problems": problems}


def check_versions(rows: list[dict[str, Any]], trajectories: Any, start_version: int) -> list[str]:
    """The policy version advanced once per completed update; each iteration's trajectories carry its version."""
    problems = []
    version = start_version
    by_it: dict[int, set[int]] = {}
    for it, v in zip(trajectories.column("iteration").to_pylist(), trajectories.column("policy_version").to_pylist()):
        by_it.setdefault(it, set()).add(v)
    for r in rows:
        it = int(r["iteration"])
        if by_it.get(it, set()) - {int(r["rollout/policy_version"])}:
            problems.append(f"iteration {it}: trajectories of versions {sorted(by_it[it])}, rollouts ran with "
                            f"{int(r['rollout/policy_version'])}")
        updated = r.get("update/samples", 0) > 0 or "replay/nll" in r
        version += int(updated)
        if int(r["policy_version"]) != version:
            problems.append(f"iteration {it}: policy_version {int(r['policy_version'])}, expected {version}")
    return problems


# ------------------------------------------------------------------------------------------------ main


def chaos_config(iterations: int, overrides: list[str]):
    from mosaic_ray.config import load_config

    return load_config("smoke", [
        f"train.iterations={iterations}", "train.checkpoint_every=1", "train.eval_size=8",
        "engine.num_engines=2", "engine.request_deadline_s=8", "engine.health_interval_s=1",
        "engine.hung_after_s=15", "rollout.min_workers=2", "rollout.max_workers=2", "rollout.autoscale=false",
        "rollout.tasks_per_iteration=6", "learner.num_learners=1", *overrides])


def run_chaos(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from mosaic_ray.driver.train import Trainer, iteration_tasks
    from mosaic_ray.schema import make_group_id

    cfg = chaos_config(args.iterations, args.set)
    faults = plan_faults(args.seed, args.iterations, cfg.rollout.tasks_per_iteration * cfg.rollout.group_size)
    cluster = LocalCluster(args.port_base).start()
    run_dir = Path(tempfile.mkdtemp(prefix="chaos-run-")) if args.run_dir is None else Path(args.run_dir)
    t0 = time.monotonic()
    try:
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                           "TOKENIZERS_PARALLELISM": "false"}})
        print(f"chaos: cluster of {len(ray.nodes())} nodes at {cluster.address}; run dir {run_dir}", flush=True)
        trainer = Trainer(cfg, str(run_dir / "run"), progress=False)
        injector = FaultInjector(trainer, faults, hang_s=args.hang_s)
        injector.install()
        error = None
        try:
            report = trainer.run()
        except Exception as exc:  # noqa: BLE001 - a failed run is the result, reported with its cause
            report, error = None, f"{type(exc).__name__}: {exc}"
        for watcher in injector.watchers:  # a last look at each recovery, then stop watching
            watcher.join(timeout=5)
        injector.finished.set()
        run_uri = trainer.storage.uri
        expected = {it: [make_group_id(trainer.state.run_id, it, t.task_id)
                         for t in iteration_tasks(trainer.train_tasks, it, cfg.rollout.tasks_per_iteration,
                                                  cfg.train.seed, cfg.scenarios.category_weights)]
                    for it in range(cfg.train.iterations)}
        check = check_run(run_uri, expected, cfg.rollout.group_size, cfg.judge)
        rows = [r for r in trainer.state.rows if r["iteration"] >= 0]
        check["problems"] += check_versions(rows, trainer.storage.read_dataset("trajectories"),
                                            start_version=1 if cfg.warmstart.enabled else 0)
        complete = report is not None and bool(report.get("complete"))
        for f in faults:
            f.recovered = f.recovered and complete and not check["problems"]
        result = {
            "seed": args.seed, "iterations": cfg.train.iterations, "nodes": 2, "run_complete": complete,
            "error": error, "injector_errors": injector.errors,
            "injected": sum(f.injected_at_s is not None for f in faults),
            "survived": sum(f.recovered for f in faults),
            "lost": check["lost"], "duplicated": check["duplicated"],
            "faults": [asdict(f) for f in faults],
            "fault_counters": {**{f"fleet/{k}": v for k, v in trainer.fleet.counters.items()
                                  if k in ("worker_deaths", "retries", "failed_episodes", "duplicates_dropped")},
                               **{f"engines/{k}": v for k, v in trainer.engine_supervisor.counters.items()},
                               "learner/reforms": trainer.learner.reforms,
                               **{k: sum(r.get(k, 0.0) for r in rows) for k in
                                  ("faults/pair_builder_calls_lost", "faults/groups_resent",
                                   "faults/learner_reforms")}},
            "policy_version": trainer.state.policy_version,
            "check": check, "wall_s": round(time.monotonic() - t0, 1),
        }
        return result
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()
        if args.run_dir is None and not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def print_table(result: dict[str, Any]) -> None:
    print(f"\nchaos run: seed {result['seed']}, {result['iterations']} iterations on {result['nodes']} nodes, "
          f"{result['wall_s']} s, run complete: {result['run_complete']}")
    print(f"{'fault':<10} {'iteration':>9} {'after':>5} {'at s':>7} {'target':<28} {'survived':>8} {'recovery s':>10}")
    for f in result["faults"]:
        at = "-" if f["injected_at_s"] is None else f"{f['injected_at_s']:.1f}"
        rec = "-" if f["recovery_s"] is None else f"{f['recovery_s']:.1f}"
        print(f"{f['kind']:<10} {f['iteration']:>9} {f['after_episodes']:>5} {at:>7} {f['target'][:28]:<28} "
              f"{f['recovered']!s:>8} {rec:>10}")
    print(f"\n| faults injected | survived | records lost | records duplicated |\n|---|---|---|---|\n"
          f"| {result['injected']} | {result['survived']} | {result['lost']} | {result['duplicated']} |")
    for p in result["check"]["problems"] + ([result["error"]] if result["error"] else []) + result["injector_errors"]:
        print(f"PROBLEM: {p}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the result as JSON here")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault plan (which iteration, how far in)")
    ap.add_argument("--iterations", type=int, default=6,
                    help="training iterations (6: one fault kind in each of the first five, the last clean)")
    ap.add_argument("--hang-s", type=float, default=40.0, help="how long the hung engine stays stopped")
    ap.add_argument("--port-base", type=int, default=None,
                    help="first of the 200 ports the two nodes use (default: 200 free ones below the ephemeral range)")
    ap.add_argument("--run-dir", help="keep the run here (default: a temp dir, deleted)")
    ap.add_argument("--keep", action="store_true", help="keep the temp run dir")
    ap.add_argument("--set", action="append", default=[], help="extra config override, key=value")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    result = run_chaos(args)
    print_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    ok = (result["run_complete"] and result["lost"] == 0 and result["duplicated"] == 0
          and result["survived"] == len(FAULT_KINDS) and not result["check"]["problems"])
    if not ok:
        print("chaos: FAILED", file=sys.stderr)
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(0 if res["run_complete"] and res["lost"] == 0 and res["duplicated"] == 0
             and res["survived"] == len(FAULT_KINDS) and not res["check"]["problems"] else 1)
