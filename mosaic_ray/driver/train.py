"""`mosaic-ray train`: the MOSAIC loop as timed phases — rollout → judge → update → sync — on Ray.

The driver is the control plane: it owns the run directory (local or `s3://`), the iteration counter, policy
versions, checkpoints and reports. Data moves on the data plane: trajectories stream from the rollout fleet into
the pair builder, which commits Parquet shards; the learner reads the committed shards of an iteration.

Resume: `state.json` names the next iteration and the checkpoint to restore. Trajectory and group ids are
deterministic (run/iteration/task/sample) and shards are committed idempotently, so an iteration whose groups
are already committed is read back, not re-generated: no iteration's data is used twice or skipped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mosaic_ray.config import MosaicConfig, to_yaml
from mosaic_ray.driver import report as reports
from mosaic_ray.storage import RunStorage

log = logging.getLogger("mosaic_ray.train")


@dataclass
class RunState:
    """What a resumed run needs; written to `state.json` after every iteration."""

    run_id: str
    next_iteration: int = 0
    policy_version: int = 0
    checkpoint: str | None = None
    """Relative path of the last checkpoint in the run dir."""
    checkpoint_iteration: int = -1
    wall_time_s: float = 0.0
    before: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def timed(metrics: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    metrics[f"time/{name}_s"] = round(time.perf_counter() - t0, 3)


def iteration_tasks(tasks: list[Any], iteration: int, n: int, seed: int, weights: dict[str, float]) -> list[Any]:
    """The tasks of one iteration: a deterministic function of (seed, iteration), weighted by category."""
    rng = random.Random(f"{seed}/{iteration}")
    if not weights:
        return rng.sample(tasks, min(n, len(tasks)))
    by_cat: dict[str, list[Any]] = {}
    for t in tasks:
        by_cat.setdefault(t.category, []).append(t)
    cats = sorted(c for c in by_cat if weights.get(c, 0) > 0)
    picked = rng.choices(cats, weights=[weights[c] for c in cats], k=n)
    out, used = [], set()
    for c in picked:
        pool = [t for t in by_cat[c] if t.task_id not in used] or by_cat[c]
        t = rng.choice(pool)
        used.add(t.task_id)
        out.append(t)
    return out


def rollout_rates(records: list[Any]) -> dict[str, float]:
    """Per-iteration rates on the training rollouts (same definitions as held-out evaluation)."""
    from mosaic_ray.evaluation import summarize

    summary = summarize([(r, r.outcome) for r in records])
    overall = summary.get("overall", summary)
    return {f"rollout/{k}": float(v) for k, v in overall.items() if isinstance(v, (int, float)) and v is not None}


class Trainer:
    """One training run. `run()` = setup → warm start → evaluate (before) → iterations → evaluate (after) → report."""

    def __init__(self, cfg: MosaicConfig, run_uri: str, *, resume: bool = False, progress: bool | None = None):
        self.cfg = cfg
        if "://" not in run_uri:
            run_uri = os.path.abspath(run_uri)  # actors do not share the driver's working directory
        self.storage = RunStorage(run_uri)
        self.resume = resume
        self.progress = progress
        self._replay: list[Any] | None = None
        self.t_start = time.time()
        if resume:
            if not self.storage.exists("state.json"):
                raise FileNotFoundError(f"--resume {run_uri}: no state.json (not a run directory, or it never "
                                        f"finished its first checkpoint)")
            self.state = RunState(**self.storage.get_json("state.json"))
        else:
            if self.storage.exists("state.json"):
                raise FileExistsError(f"{run_uri}: already holds a run; pass --resume to continue it or choose "
                                      f"another --run-dir")
            self.state = RunState(run_id=os.path.basename(run_uri.rstrip("/")) or "run")
        self.storage.put_text("config.yaml", to_yaml(cfg))

    # ----------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        import ray
        from transformers import AutoTokenizer

        from mosaic_ray.actors.engines.actor import start_engine_actors
        from mosaic_ray.actors.fleet import RolloutFleet
        from mosaic_ray.actors.pair_builder import remote_pair_builder
        from mosaic_ray.driver.metrics import DriverMetrics
        from mosaic_ray.evaluation import spread_over_categories
        from mosaic_ray.learners.group import LearnerGroup

        cfg = self.cfg
        self.model_dir = resolve_model_dir(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.train_tasks, test = scenario_splits(cfg)
        self.eval_tasks = spread_over_categories(test, cfg.train.eval_size) if cfg.train.eval_size else test
        self.learner = LearnerGroup(self.model_dir, cfg.learner)
        self.engines = start_engine_actors(cfg.engine, self.model_dir, dtype=cfg.model.dtype)
        self.fleet = RolloutFleet(cfg, model_dir=self.model_dir, engine_handles=self.engines,
                                  run_id=self.state.run_id)
        self.pairs = remote_pair_builder(self.storage.uri, cfg.rollout.group_size, cfg.judge,
                                         num_cpus=cfg.judge.num_cpus, runtime_env={"env_vars": _aws_env()})
        self.metrics = DriverMetrics(self.state.run_id)
        log.info("setup done: model %s, %d train / %d eval tasks, ray %s", self.model_dir, len(self.train_tasks),
                 len(self.eval_tasks), ray.get_runtime_context().get_node_id()[:8])

    # ---------------------------------------------------------------------------------------------- phases

    def warm_start(self) -> dict[str, float]:
        """SFT on scripted demonstrations with deliberate mistakes, so RL has something real to fix."""
        from mosaic_ray.warmstart import first_turn_samples, run_warmstart, warmstart_samples

        ws = self.cfg.warmstart
        seed, max_tokens = self.cfg.train.seed, self.cfg.protocol.max_episode_tokens

        def sft(title: str, samples: list[Any], cfg: Any) -> list[dict]:
            with self.bar(title, cfg.steps) as advance:
                return run_warmstart(self.learner, samples, cfg, seed=seed,
                                     on_step=lambda step, m: advance(f"loss {m.get('loss', float('nan')):.3f}"))

        if ws.first_turn_steps:
            sft("warm start: first turns (SFT)", first_turn_samples(ws, self.tokenizer, seed=seed, max_tokens=max_tokens),
                replace(ws, steps=ws.first_turn_steps))
        samples = warmstart_samples(ws, self.tokenizer, seed=seed, max_tokens=max_tokens)
        history = sft("warm start (SFT)", samples, ws)
        self.learner.reset_reference()
        losses = [h.get("loss", float("nan")) for h in history]
        return {"sft/steps": float(len(losses)), "sft/demos": float(len(samples)),
                "sft/loss_first": losses[0], "sft/loss_last": losses[-1]}

    def evaluate(self, tag: str) -> dict[str, Any]:
        """Held-out evaluation of the current policy through the same fleet (greedy by default)."""
        from mosaic_ray.evaluation import summarize

        records = list(self.fleet.evaluate(self.eval_tasks, temperature=self.cfg.train.eval_temperature,
                                           policy_version=self.state.policy_version, tag=tag))
        by_id = {t.task_id: t for t in self.eval_tasks}
        report = summarize([(by_id[r.task_id], r.outcome) for r in records])
        report.update({"policy_version": self.state.policy_version, "tag": tag})
        self.storage.put_json(f"eval/{tag}.json", report)
        return report

    def rollout(self, iteration: int, tasks: list[Any], m: dict[str, float]) -> None:
        """Generate G samples per task of this iteration and stream them into the pair builder."""
        import ray

        cfg = self.cfg
        done = set(ray.get(self.pairs.committed_groups.remote()))
        todo = [t for t in tasks if group_id(self.state.run_id, iteration, t.task_id) not in done]
        n = 0
        with timed(m, "rollout"), self.bar(f"iteration {iteration}: rollouts", len(todo) * cfg.rollout.group_size) as advance:
            for batch in self.fleet.stream(todo, group_size=cfg.rollout.group_size, iteration=iteration,
                                           policy_version=self.state.policy_version):
                ray.get(self.pairs.add.remote(batch))
                n += batch.num_rows
                advance(f"{n} episodes", batch.num_rows)
        m["rollout/episodes"] = float(n)
        m["rollout/reused_groups"] = float(len(tasks) - len(todo))
        m["rollout/episodes_per_s"] = n / max(m["time/rollout_s"], 1e-9)

    def judge(self, iteration: int, tasks: list[Any], m: dict[str, float]) -> tuple[Any, Any]:
        """Commit this iteration's groups (pairs + rewards) and read back only the shards holding them."""
        import ray

        groups = {group_id(self.state.run_id, iteration, t.task_id) for t in tasks}

        def ours(shard: Any) -> bool:
            return not groups.isdisjoint(shard.meta.get("groups", ()))

        with timed(m, "judge"):
            stats = ray.get(self.pairs.flush.remote())
            traj = self.storage.read_dataset("trajectories", shards=ours)
            rewards = self.storage.read_dataset("rewards", shards=ours)
        it = traj.filter(pc_equal(traj, "iteration", iteration))
        rw = rewards.filter(pc_isin(rewards, "traj_id", it.column("traj_id")))
        m["pairs/written"] = float(stats.get("pairs_written", 0))
        m["pairs/per_s"] = float(stats.get("pairs_per_s", 0.0))
        return it, rw

    def update(self, traj: Any, rewards: Any, m: dict[str, float]) -> None:
        from mosaic_ray.algorithms.batch import samples_and_stats
        from mosaic_ray.schema import TrajectoryRecord, from_arrow

        records = from_arrow(traj, TrajectoryRecord)
        m.update(rollout_rates(records))
        rw = rewards.to_pydict()
        m["reward/mean"] = sum(rw["reward"]) / max(1, len(rw["reward"]))
        m["reward/wins_mean"] = sum(rw["wins"]) / max(1, len(rw["wins"]))
        m["staleness/mean"] = sum(self.state.policy_version - r.policy_version for r in records) / max(1, len(records))
        samples, stats = samples_and_stats(traj, rewards)
        m["update/samples"] = float(len(samples))
        m["update/groups_without_signal"] = float(stats.zero_variance_groups)
        with timed(m, "update"):
            if samples:
                out = self.learner.update(samples, algorithm=self.cfg.learner.algorithm)
                m.update({k if "/" in k else f"learner/{k}": float(v) for k, v in out.items()
                          if isinstance(v, (int, float))})
            if self.cfg.warmstart.replay_coef > 0:
                m.update(self.replay(int(m["iteration"])))

    def replay(self, iteration: int) -> dict[str, float]:
        """One SFT step on benign demonstrations (see `WarmStartConfig.replay_coef`); seeded by iteration, so a
        resumed run replays the same batches."""
        from mosaic_ray.warmstart import replay_samples

        ws = self.cfg.warmstart
        if self._replay is None:
            self._replay = replay_samples(self.train_tasks, self.tokenizer, copy_weight=ws.copy_weight,
                                          max_tokens=self.cfg.protocol.max_episode_tokens)
        rng = random.Random(f"{self.cfg.train.seed}:replay:{iteration}")
        batch = rng.sample(self._replay, min(ws.replay_batch_size, len(self._replay)))
        out = self.learner.sft_update(batch, lr=ws.replay_coef * self.cfg.learner.lr)
        return {"replay/nll": float(out["learner/nll"]), "replay/samples": float(len(batch))}

    def sync(self, m: dict[str, float]) -> None:
        """Push the new weights to every engine with the next version (object-store path)."""
        import ray

        with timed(m, "weight_sync"):
            version = self.state.policy_version + 1
            ref = self.learner.weights_ref()
            ray.get([e.update_weights.remote(ref, version) for e in self.engines])
            self.state.policy_version = version
        m["policy_version"] = float(version)

    def checkpoint(self, iteration: int) -> None:
        rel = f"checkpoints/iter-{iteration:05d}"
        self.learner.save(self.storage.url(rel))
        self.state.checkpoint, self.state.checkpoint_iteration = rel, iteration

    # ------------------------------------------------------------------------------------------------ loop

    def collect(self, iteration: int) -> tuple[dict[str, float], Any, Any]:
        """Rollout + judge of one iteration: the data plane half, which async mode overlaps with updates."""
        m: dict[str, float] = {"iteration": float(iteration), "rollout/policy_version": float(self.state.policy_version)}
        cfg = self.cfg
        tasks = iteration_tasks(self.train_tasks, iteration, cfg.rollout.tasks_per_iteration, cfg.train.seed,
                                cfg.scenarios.category_weights)
        self.rollout(iteration, tasks, m)
        traj, rewards = self.judge(iteration, tasks, m)
        return m, traj, rewards

    def learn(self, m: dict[str, float], traj: Any, rewards: Any) -> dict[str, float]:
        """Update + weight sync: the learner half."""
        self.update(traj, rewards, m)
        self.sync(m)
        return m

    def finish_iteration(self, it: int, row: dict[str, float], t0: float) -> None:
        row["time/iteration_s"] = round(time.perf_counter() - t0, 3)
        self.state.rows.append(row)
        self.metrics.record(row)
        self.write_metrics()
        if (it + 1) % self.cfg.train.checkpoint_every == 0 or it + 1 == self.cfg.train.iterations:
            self.checkpoint(it)
            self.save_state(it)
        self.log_row(row)

    def run(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        self.setup()
        try:
            if st.checkpoint is not None:
                self.learner.restore(self.storage.url(st.checkpoint))
                self.sync_version(st.policy_version)
            else:
                if cfg.warmstart.enabled:
                    st.rows.append({"iteration": -1, **self.warm_start()})
                    self.sync_version(1)
                st.before = self.evaluate("before")
                self.print_eval("before (warm start)", st.before)
                self.checkpoint(-1)
                self.save_state(-1)
            schedule = AsyncSchedule if cfg.train.mode == "async" else SyncSchedule
            schedule(self).run(st.next_iteration, cfg.train.iterations)
            after = self.evaluate("after")
            self.print_eval("after", after)
            return self.write_report(after)
        except KeyboardInterrupt:
            log.warning("interrupted: the run directory holds the last checkpoint (%s); continue with --resume",
                        st.checkpoint)
            self.write_report(None)
            raise
        finally:
            self.shutdown()

    def sync_version(self, version: int) -> None:
        """Load the learner's current weights into the engines as `version` (start or resume). Version 0 is the
        model the engines started from, so there is nothing to send."""
        import ray

        if version == 0:
            return
        ref = self.learner.weights_ref()
        ray.get([e.update_weights.remote(ref, version) for e in self.engines])
        self.state.policy_version = version

    def save_state(self, iteration: int) -> None:
        """state.json describes the last checkpoint: a resume restarts right after it."""
        st = self.state
        st.next_iteration = iteration + 1
        st.wall_time_s = time.time() - self.t_start + (st.wall_time_s if self.resume else 0.0)
        snapshot = asdict(st)
        snapshot["rows"] = [r for r in st.rows if r["iteration"] <= iteration]
        self.storage.put_json("state.json", snapshot)

    def write_metrics(self) -> None:
        self.storage.put_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.state.rows
                                                       if r["iteration"] >= 0))

    def write_report(self, after: dict[str, Any] | None) -> dict[str, Any]:
        rows = [r for r in self.state.rows if r["iteration"] >= 0]
        wall = time.time() - self.t_start + (self.state.wall_time_s if self.resume else 0.0)
        rep = reports.build_report(config_name=self.cfg.name, before=self.state.before, after=after, rows=rows,
                                   wall_time_s=wall, extra={"run_id": self.state.run_id,
                                                            "policy_version": self.state.policy_version,
                                                            "complete": after is not None})
        self.storage.put_text("report.json", reports.dumps(rep))
        self.storage.put_text("report.md", reports.report_markdown(rep))
        if rows:
            self.storage.put_bytes("curves.png", reports.curves_png(rows))
        if rep["before"] and rep["after"]:
            self.storage.put_bytes("before_after.png", reports.before_after_png(rep))
        return rep

    def shutdown(self) -> None:
        """End every actor this run started (a shared cluster keeps no leftovers)."""
        import ray

        for name in ("fleet", "learner"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.shutdown()
        for handle in [*getattr(self, "engines", []), getattr(self, "pairs", None)]:
            if handle is not None:
                ray.kill(handle, no_restart=True)

    # -------------------------------------------------------------------------------------------- display

    @contextmanager
    def bar(self, title: str, total: int):
        """A rich progress bar on a TTY; one log line at the end otherwise."""
        import sys

        show = self.progress if self.progress is not None else sys.stderr.isatty()
        if not show:
            t0 = time.perf_counter()
            yield lambda desc="", n=1: None
            log.info("%s: done in %.1f s", title, time.perf_counter() - t0)
            return
        from rich.progress import Progress

        with Progress(transient=False) as prog:
            task = prog.add_task(title, total=total)
            yield lambda desc="", n=1: prog.update(task, advance=n, description=f"{title} {desc}")

    def print_eval(self, title: str, report: dict[str, Any]) -> None:
        h = reports.headline(report)
        log.info("eval %s: %s", title, ", ".join(f"{k}={v:.3f}" for k, v in h.items()))

    def log_row(self, row: dict[str, float]) -> None:
        keys = ("rollout/harmful_refusal_rate", "rollout/injection_success_rate", "rollout/benign_success_rate",
                "rollout/over_refusal_rate", "reward/mean", "learner/loss", "learner/approx_kl", "time/iteration_s")
        log.info("iteration %d: %s", int(row["iteration"]),
                 ", ".join(f"{k.split('/')[-1]}={row[k]:.3f}" for k in keys if k in row and row[k] is not None))


# ------------------------------------------------------------------------------------------------ schedules


class SyncSchedule:
    """Iteration k: rollouts with policy v_k → pairs → update → sync v_{k+1}."""

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer

    def run(self, start: int, end: int) -> None:
        for it in range(start, end):
            t0 = time.perf_counter()
            row = self.t.learn(*self.t.collect(it))
            self.t.finish_iteration(it, row, t0)


class AsyncSchedule:
    """Rollouts of iteration k+1 run while the learner trains on k.

    Staleness is bounded by admission, never by dropping samples: the rollouts of iteration j start only once the
    policy version is at least j - start - max_staleness versions past the first. Every trajectory carries the
    version that generated it (engines may be updated while an episode is in flight).
    """

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer

    def run(self, start: int, end: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if start >= end:
            return
        base = self.t.state.policy_version - start  # version == base + iteration, after that iteration's sync
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts") as pool:
            pending = pool.submit(self.t.collect, start)
            for it in range(start, end):
                t0 = time.perf_counter()
                m, traj, rewards = pending.result()
                nxt = it + 1
                admitted = nxt < end and self.t.state.policy_version >= base + nxt - self.t.cfg.train.max_staleness
                if admitted:
                    pending = pool.submit(self.t.collect, nxt)
                self.t.learn(m, traj, rewards)
                if nxt < end and not admitted:
                    pending = pool.submit(self.t.collect, nxt)
                self.t.finish_iteration(it, m, t0)


# -------------------------------------------------------------------------------------------------- helpers


def group_id(run_id: str, iteration: int, task_id: str) -> str:
    from mosaic_ray.schema import make_group_id

    return make_group_id(run_id, iteration, task_id)


def pc_equal(table: Any, column: str, value: Any) -> Any:
    import pyarrow.compute as pc

    return pc.equal(table.column(column), value)


def pc_isin(table: Any, column: str, values: Any) -> Any:
    import pyarrow.compute as pc

    return pc.is_in(table.column(column), value_set=values.combine_chunks())


def scenario_splits(cfg: MosaicConfig) -> tuple[list[Any], list[Any]]:
    """(train, test) tasks: the built-in suites, or a Parquet / JSONL task file split by its `split` column."""
    from mosaic_ray.scenarios import load_tasks, read_tasks

    sc = cfg.scenarios
    if sc.source == "builtin":
        return (load_tasks("train", size=sc.train_size, seed=sc.seed, domains=sc.domains, categories=sc.categories),
                load_tasks("test", size=sc.test_size, seed=sc.seed, domains=sc.domains, categories=sc.categories))

    def keep(t: Any) -> bool:
        return (not sc.domains or t.domain in sc.domains) and (not sc.categories or t.category in sc.categories)

    tasks = [t for t in read_tasks(sc.source) if keep(t)]
    train = [t for t in tasks if t.split == "train"][: sc.train_size]
    test = [t for t in tasks if t.split == "test"][: sc.test_size]
    if not train or not test:
        raise ValueError(f"scenarios.source={sc.source}: needs tasks of both splits (train: {len(train)}, "
                         f"test: {len(test)}) after the domain/category filters")
    return train, test


def resolve_model_dir(cfg: MosaicConfig) -> str:
    """The policy's HF directory: `model.path` (local or s3://, copied locally), else the cached tiny model."""
    if cfg.model.path is None:
        from mosaic_ray.models.tiny import cached_tiny_model

        return str(cached_tiny_model(cfg.model.tiny, cfg.model.cache_dir))
    if cfg.model.path.startswith("s3://"):
        import tempfile

        import fsspec

        local = tempfile.mkdtemp(prefix="mosaic-model-")
        fs, path = fsspec.core.url_to_fs(cfg.model.path)
        fs.get(path.rstrip("/") + "/", local, recursive=True)
        return local
    return cfg.model.path


def _aws_env() -> dict[str, str]:
    """S3 settings the driver has, passed on to actors (values are never logged)."""
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
            "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED")
    return {k: os.environ[k] for k in keys if k in os.environ}
