"""`mosaic-ray train`: the MOSAIC loop as timed phases — rollout → judge → update → sync — on Ray.

The driver is the control plane: it owns the run directory (local or `s3://`), the iteration counter, policy
versions, checkpoints and reports. Data moves on the data plane: trajectories stream from the rollout fleet into
the pair builder, which commits Parquet shards; the learner reads the committed shards of an iteration.

Resume: `state.json` names the next iteration and the checkpoint to restore. Trajectory and group ids are
deterministic (run/iteration/task/sample) and shards are committed idempotently, so an iteration whose groups
are already committed is read back, not re-generated: no iteration's data is used twice or skipped.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from mosaic_ray.config import ConfigError, MosaicConfig, to_yaml
from mosaic_ray.driver import report as reports
from mosaic_ray.storage import RunStorage

if TYPE_CHECKING:
    from mosaic_ray.scenarios.tasks import Task

log = logging.getLogger("mosaic_ray.train")
PAIRS_CALL_ATTEMPTS = 5
"""Tries of one pair-builder call across its restarts (Ray restarts it `max_restarts` times)."""
RESEND_ROUNDS = 3
"""Re-sends of an iteration's uncommitted groups before the run stops with an error."""
LEARNER_REFORMS = 2
"""Times one iteration's learner step is retried on a re-formed learner group."""

UPDATE_PROGRESS_KEYS = ("learner/loss", "learner/pg_loss", "learner/kl_ref", "learner/clipfrac")
"""Learner metrics shown on the update's progress line, when the algorithm reports them."""


@dataclass
class RunState:
    """What a resumed run needs; written to `state.json` after every iteration."""

    run_id: str
    next_iteration: int = 0
    policy_version: int = 0
    checkpoint: str | None = None
    """Relative path of the last checkpoint in the run dir."""
    checkpoint_iteration: int = -1
    checkpoint_version: int = -1
    """The policy version the last checkpoint holds."""
    wall_time_s: float = 0.0
    before: dict[str, dict[str, Any]] | None = None
    """The warm start's evaluation, per split (`train.eval_splits`)."""
    rows: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def timed(metrics: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    metrics[f"time/{name}_s"] = round(time.perf_counter() - t0, 3)


def iteration_tasks(tasks: list[Task], iteration: int, n: int, seed: int, weights: dict[str, float]) -> list[Task]:
    """The tasks of one iteration: a deterministic function of (seed, iteration), weighted by category."""
    rng = random.Random(f"{seed}/{iteration}")
    if not weights:
        return rng.sample(tasks, min(n, len(tasks)))
    by_cat: dict[str, list[Task]] = {}
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
        self._push_reforms: dict[int, int] = {}
        """Learner re-formations started by an engine reload, per policy version (at most `LEARNER_REFORMS`)."""
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

        from mosaic_ray.actors.engines.supervisor import EngineSupervisor
        from mosaic_ray.actors.fleet import RolloutFleet
        from mosaic_ray.actors.pair_builder import remote_pair_builder
        from mosaic_ray.actors.resources import check_run_fits, reserve
        from mosaic_ray.actors.rollout_worker import rollout_engine_options, start_rollout_engines
        from mosaic_ray.driver.metrics import DriverMetrics
        from mosaic_ray.driver.trackers import open_trackers
        from mosaic_ray.driver.weight_sync import make_weight_sync
        from mosaic_ray.learners.group import LearnerGroup
        from mosaic_ray.models.source import policy_source, resolve_model
        from mosaic_ray.rollout import load_tokenizer

        cfg = self.cfg
        check_run_fits(cfg)   # before any actor: a cluster too small for the run fails now, naming the shortfall
        self.trackers = open_trackers(cfg, self.storage, self.state.run_id, resume=self.resume,
                                      history=[r for r in self.state.rows if r["iteration"] >= 0])
        # every actor resolves the source itself, on its own node; the driver only for its tokenizer
        self.model_source = policy_source(cfg.model)
        self.model_dir = resolve_model(self.model_source, cfg.model.cache_dir)
        self.tokenizer = load_tokenizer(self.model_dir, cfg.model.chat_template)
        self.train_tasks, self.eval_sets = scenario_splits(cfg)
        self.learner = LearnerGroup(self.model_source, cfg.learner, cache_dir=cfg.model.cache_dir,
                                    chat_template=cfg.model.chat_template)
        # engine actors, or colocated rollout workers that host the engines (`rollout.colocate_engine`)
        self.engine_pg = reserve("engine", rollout_engine_options(cfg), cfg.engine.num_engines,
                                 strategy=cfg.engine.placement_strategy, timeout_s=cfg.engine.placement_timeout_s)
        self.engines = start_rollout_engines(cfg, self.model_source, placement_group=self.engine_pg)
        self.weight_sync = make_weight_sync(cfg.learner, self.learner)
        # health checks, hung engines killed, restarted ones reloaded; every weight push goes through it
        self.engine_supervisor = EngineSupervisor(self.engines, cfg.engine, self.push_weights)
        self.fleet = RolloutFleet(cfg, model_dir=self.model_source, engine_handles=self.engines,
                                  run_id=self.state.run_id)
        self.pairs = remote_pair_builder(self.storage.uri, cfg.rollout.group_size, cfg.judge,
                                         num_cpus=cfg.judge.num_cpus, **self.start_judge())
        self.metrics = DriverMetrics(self.state.run_id)
        log.info("setup done: model %s, %d train tasks, eval %s, ray %s", self.model_dir, len(self.train_tasks),
                 ", ".join(f"{k} {len(v)}" for k, v in self.eval_sets.items()),
                 ray.get_runtime_context().get_node_id()[:8])

    def start_judge(self) -> dict[str, Any]:
        """`judge.kind: llm`: deploy the `mosaic-judge` Serve app (unless `judge.endpoint` names a server) and
        give the pair builder its backend and the task briefs; record what judges in `judge.json`."""
        jc = self.cfg.judge
        self.judge_counts: dict[str, Any] = {}
        if jc.kind != "llm":
            return {}
        from mosaic_ray.judge import TaskBrief
        from mosaic_ray.judge.llm import PROMPT_VERSION

        backend = None
        if jc.endpoint is None:
            from mosaic_ray.actors.judge_service import JUDGE_APP, start_judge_service
            from mosaic_ray.judge.llm import ServeChat

            source = jc.model or self.model_source
            name = jc.model or self.cfg.model.path or "tiny"
            self.judge_started_serve = start_judge_service(jc, self.cfg.engine, source, name,
                                                           dtype=self.cfg.model.dtype,
                                                           cache_dir=self.cfg.model.cache_dir)
            self.judge_app = JUDGE_APP
            backend = ServeChat(JUDGE_APP, name)
        self.judge_record = {"kind": "llm", "model": backend.model if backend else (jc.model or "default"),
                             "served_by": f"ray serve app {self.judge_app}" if backend else jc.endpoint,
                             "prompt_version": PROMPT_VERSION}
        if self.resume and self.storage.exists("judge.json"):  # the totals go on from the interrupted run's
            self.judge_record["totals"] = self.storage.get_json("judge.json").get("totals", {})
        self.storage.put_json("judge.json", self.judge_record)
        return {"judge_backend": backend, "briefs": {t.task_id: TaskBrief.of(t) for t in self.train_tasks}}

    def judge_metrics(self, stats: dict[str, Any], m: dict[str, float]) -> None:
        """The LLM judge's counters of this iteration (differences of the pair builder's running totals; a
        restarted pair builder starts its totals at zero) into the row, and the run's totals into judge.json."""
        counts = stats.get("judge") or {}
        if "compares" not in counts:
            return
        keys = ("compares", "asked", "retries", "parse_failures", "position_inconsistent", "ties", "cache_hits",
                "latency_s")
        prev = self.judge_counts if self.judge_counts.get("compares", 0) <= counts["compares"] else {}
        delta = {k: float(counts[k]) - float(prev.get(k, 0)) for k in keys}
        self.judge_counts = counts
        for k in keys[1:]:
            m[f"judge/{k}"] = delta[k]
        m["judge/pairs"] = delta["compares"]
        m["judge/latency_s_per_request"] = delta["latency_s"] / max(delta["asked"], 1.0)
        m["judge/pairs_per_s"] = delta["compares"] / max(m.get("time/judge_s", 0.0), 1e-9)
        totals = self.judge_record.setdefault("totals", {})
        for k in keys:
            totals[k] = round(totals.get(k, 0.0) + delta[k], 4)
        self.storage.put_json("judge.json", self.judge_record)

    # ---------------------------------------------------------------------------------------------- phases

    def warm_start(self) -> dict[str, float]:
        """SFT on scripted demonstrations with deliberate mistakes, so RL has something real to fix."""
        from mosaic_ray.warmstart import first_turn_samples, run_warmstart, warmstart_samples

        ws = self.cfg.warmstart
        seed, max_tokens = self.cfg.train.seed, self.cfg.protocol.max_episode_tokens
        domains = training_domains(self.cfg)

        def sft(title: str, samples: list[Any], cfg: Any) -> list[dict]:
            with self.bar(title, cfg.steps) as advance:
                return run_warmstart(self.learner, samples, cfg, seed=seed,
                                     on_step=lambda step, m: advance(f"loss {m.get('loss', float('nan')):.3f}"))

        if ws.first_turn_steps:
            sft("warm start: first turns (SFT)", first_turn_samples(ws, self.tokenizer, seed=seed, max_tokens=max_tokens,
                                                                   domains=domains),
                replace(ws, steps=ws.first_turn_steps))
        samples = warmstart_samples(ws, self.tokenizer, seed=seed, max_tokens=max_tokens, domains=domains)
        history = sft("warm start (SFT)", samples, ws)
        self.learner.reset_reference()
        losses = [h.get("loss", float("nan")) for h in history]
        return {"sft/steps": float(len(losses)), "sft/demos": float(len(samples)),
                "sft/loss_first": losses[0], "sft/loss_last": losses[-1]}

    def evaluate(self, tag: str) -> dict[str, dict[str, Any]]:
        """Held-out evaluation of the current policy on every split, through the same fleet in one pass (greedy
        by default): {split: summary}, also written to `eval/<tag>.json` (templates) and `eval/<tag>-<split>.json`."""
        from mosaic_ray.evaluation import summarize

        tasks = [t for split in self.eval_sets.values() for t in split]
        records = list(self.fleet.evaluate(tasks, temperature=self.cfg.train.eval_temperature,
                                           policy_version=self.state.policy_version, tag=tag))
        outcomes = {r.task_id: r.outcome for r in records}
        reports_by_split = {}
        for split, split_tasks in self.eval_sets.items():
            report = summarize([(t, outcomes[t.task_id]) for t in split_tasks])
            report.update({"policy_version": self.state.policy_version, "tag": tag, "split": split})
            self.storage.put_json(f"eval/{tag}.json" if split == "templates" else f"eval/{tag}-{split}.json", report)
            reports_by_split[split] = report
        return reports_by_split

    def eval_due(self, it: int) -> bool:
        """`train.eval_every`: whether the held-out splits are evaluated after iteration `it` (never after the
        last: `run` evaluates then)."""
        every = self.cfg.train.eval_every
        return every > 0 and (it + 1) % every == 0 and it + 1 < self.cfg.train.iterations

    def evaluate_between(self, it: int, row: dict[str, float]) -> None:
        """The evaluation after iteration `it` (`eval/iter-NNNNN*.json`); its headline metrics go into the
        iteration's row as `eval/<split>/<metric>`."""
        by_split = self.evaluate(f"iter-{it:05d}")
        self.print_eval(f"after iteration {it}", by_split)
        for split, report in by_split.items():
            row.update({f"eval/{split}/{k}": float(v) for k, v in reports.headline(report).items()})

    def eval_suites(self, tag: str) -> None:
        """`train.eval_suites` (external benchmarks) on the current policy's engines, into eval_suites/<tag>/."""
        if not self.cfg.train.eval_suites:
            return
        import tempfile
        from pathlib import Path

        from mosaic_ray.driver.agent import EngineAgent
        from mosaic_ray.driver.evaluate import run_eval_suites

        agent = EngineAgent(self.cfg, self.model_dir, self.engine_supervisor.engines, self.tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            out = tmp if self.storage.is_s3 else self.storage.path("eval_suites", tag)
            run_eval_suites(self.cfg.train.eval_suites, agent, out, label=f"model:{self.state.run_id}@{tag}")
            for f in Path(tmp).iterdir() if self.storage.is_s3 else ():
                self.storage.put_bytes(f"eval_suites/{tag}/{f.name}", f.read_bytes())

    def rollout(self, iteration: int, tasks: list[Task], m: dict[str, float]) -> None:
        """Generate G samples per task of this iteration; the workers hand them to the pair builder themselves
        (the driver sees receipts)."""
        cfg = self.cfg
        done = set(self.pairs_call("committed_groups", m=m))
        todo = [t for t in tasks if group_id(self.state.run_id, iteration, t.task_id) not in done]
        n, versions = 0, []
        version = self.state.policy_version   # the learner thread may sync meanwhile (async mode)
        with timed(m, "rollout"), self.bar(f"iteration {iteration}: rollouts", len(todo) * cfg.rollout.group_size) as advance:
            for receipts in self.fleet.deliver(todo, sink=self.pairs, group_size=cfg.rollout.group_size,
                                               iteration=iteration, policy_version=version):
                n += len(receipts)
                versions += [r.policy_version for r in receipts if not r.failed]
                advance(f"{n} episodes", len(receipts))
        # the versions that generated the episodes, as the engines stamped them (one iteration's may span a sync)
        m["rollout/policy_version"] = float(min(versions, default=version))
        m["rollout/policy_version_max"] = float(max(versions, default=version))
        m["rollout/episodes"] = float(n)
        m["rollout/reused_groups"] = float(len(tasks) - len(todo))
        m["rollout/episodes_per_s"] = n / max(m["time/rollout_s"], 1e-9)

    def judge(self, iteration: int, tasks: list[Task], m: dict[str, float]) -> list[str]:
        """Have the pair builder commit every group of this iteration (pairs + rewards); their group ids."""
        with timed(m, "judge"):
            stats = self.commit_every_group(iteration, tasks, m)
        m["pairs/written"] = float(stats.get("pairs_written", 0))
        m["pairs/per_s"] = float(stats.get("pairs_per_s", 0.0))
        self.judge_metrics(stats, m)
        return sorted(group_id(self.state.run_id, iteration, t.task_id) for t in tasks)

    def pairs_call(self, method: str, *args: Any, m: dict[str, float]) -> Any:
        """Call the pair builder. A call lost to its crash (RayActorError) is sent again to the restarted
        process; what the crash lost from its buffer `commit_every_group` finds and re-sends."""
        from ray.exceptions import RayActorError

        from mosaic_ray.actors.pair_builder import call_pair_builder

        def lost(attempt: int, exc: BaseException) -> None:
            m["faults/pair_builder_calls_lost"] = m.get("faults/pair_builder_calls_lost", 0.0) + 1
            if attempt + 1 < PAIRS_CALL_ATTEMPTS:
                log.warning("pair builder died during %s; retrying on its restarted process", method)

        try:
            return call_pair_builder(self.pairs, method, *args, attempts=PAIRS_CALL_ATTEMPTS, on_lost=lost)
        except RayActorError as exc:
            raise RuntimeError(f"pair builder: {method} failed {PAIRS_CALL_ATTEMPTS} times (the actor is gone, "
                               f"restarts exhausted?): {exc}") from exc

    def commit_every_group(self, iteration: int, tasks: list[Task], m: dict[str, float]) -> dict[str, Any]:
        """Flush the pair builder and check that every group of the iteration is committed; re-generate and
        re-send the groups a pair-builder crash lost (same trajectory ids, so nothing lands twice)."""
        by_group = {group_id(self.state.run_id, iteration, t.task_id): t for t in tasks}
        for attempt in range(RESEND_ROUNDS + 1):
            stats = self.pairs_call("flush", m=m)
            missing = sorted(set(by_group) - set(self.pairs_call("committed_groups", m=m)))
            if not missing:
                return stats
            if attempt == RESEND_ROUNDS:
                break
            log.warning("iteration %d: %d group(s) not committed (pair builder restarted?); re-sending them",
                        iteration, len(missing))
            m["faults/groups_resent"] = m.get("faults/groups_resent", 0.0) + len(missing)
            for _ in self.fleet.deliver([by_group[g] for g in missing], sink=self.pairs,
                                        group_size=self.cfg.rollout.group_size, iteration=iteration,
                                        policy_version=self.state.policy_version):
                pass
        raise RuntimeError(f"iteration {iteration}: {len(missing)} group(s) still not committed after "
                           f"{RESEND_ROUNDS} re-sends (first: {missing[0]}); the pair builder keeps failing")

    def update(self, groups: list[str], m: dict[str, float]) -> bool:
        """The learner update (and helpfulness replay) of one iteration; whether the weights changed. The learners
        read the committed groups from the run's storage themselves (`LearnerGroup.update_iteration`)."""
        from mosaic_ray.algorithms.batch import IterationData

        it = int(m["iteration"])
        data = IterationData(self.storage.uri, it, tuple(groups), self.state.policy_version)
        replay = self.cfg.warmstart.replay_coef > 0
        with timed(m, "update"), self.bar(f"iteration {it}: learner update", 1 + replay) as advance:
            out = self.learner.update_iteration(data, algorithm=self.cfg.learner.algorithm)
            m.update({k if "/" in k else f"learner/{k}": float(v) for k, v in out.items()
                      if isinstance(v, (int, float))})
            advance(", ".join(f"{k.split('/')[1]} {m[k]:.4f}" for k in UPDATE_PROGRESS_KEYS if k in m))
            if replay:
                m.update(self.replay(it))
                advance(f"replay nll {m['replay/nll']:.3f}")
        return m["update/samples"] > 0 or replay

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

    def sync(self, version: int, m: dict[str, float] | None = None) -> None:
        """Load the learner's weights into every engine as `version` (`learner.weight_sync`, in buckets): after an
        update (`m` gets the sync's metrics), at the start or on resume. Version 0 is the model the engines
        started from: nothing to send."""
        if version == 0:
            return
        t0 = time.perf_counter()
        out = self.engine_supervisor.push(version)
        self.state.policy_version = version
        if m is not None:
            m.update(out)
            m["time/weight_sync_s"] = round(time.perf_counter() - t0, 3)
            m["policy_version"] = float(version)

    def push_weights(self, engines: list[Any], version: int) -> dict[str, float]:
        """The weight sync (`learner.weight_sync`) of the learner's weights into `engines` as `version`, for the
        engine supervisor. A learner group lost since its last step (found by this push: an engine reload while
        rollouts run) is re-formed at once from the last checkpoint when that checkpoint holds exactly `version`:
        otherwise restarted engines would wait, serving nothing, until the next update found the loss."""
        from mosaic_ray.learners.group import LearnerFailure

        try:
            return self.weight_sync.push(engines, version)
        except LearnerFailure as exc:
            st = self.state
            tries = self._push_reforms.get(version, 0)
            if st.checkpoint is None or st.checkpoint_version != version or tries >= LEARNER_REFORMS:
                raise
            self._push_reforms[version] = tries + 1
            log.warning("%s; re-forming the learner group from %s (version %d) to reload the engines", exc,
                        st.checkpoint, version)
            self.learner.reform(self.storage.url(st.checkpoint))
            return self.weight_sync.push(engines, version)

    def checkpoint(self, iteration: int) -> None:
        """`checkpoints/iter-N` (`checkpoints/warmstart` for the warm start): an HF model directory plus its
        `trainer_state/`; then all but the newest `checkpoint.keep_last` iteration checkpoints are deleted (the warm
        start's and the one just written are always kept)."""
        from mosaic_ray.learners.checkpoint import prune_checkpoints

        rel = "checkpoints/warmstart" if iteration < 0 else f"checkpoints/iter-{iteration:05d}"
        ck = self.cfg.checkpoint
        self.learner.save(self.storage.url(rel), max_shard_bytes=ck.max_shard_mb << 20)
        self.state.checkpoint, self.state.checkpoint_iteration = rel, iteration
        self.state.checkpoint_version = self.state.policy_version
        if iteration >= 0:
            deleted = prune_checkpoints(self.storage.url("checkpoints"), ck.keep_last, keep=[rel])
            if deleted:
                log.info("checkpoints: kept the newest %d, deleted %s", ck.keep_last, ", ".join(deleted))

    # ------------------------------------------------------------------------------------------------ loop

    def collect(self, iteration: int) -> tuple[dict[str, float], list[str]]:
        """Rollout + judge of one iteration: the data plane half, which async mode overlaps with updates."""
        m: dict[str, float] = {"iteration": float(iteration)}
        cfg = self.cfg
        tasks = iteration_tasks(self.train_tasks, iteration, cfg.rollout.tasks_per_iteration, cfg.train.seed,
                                cfg.scenarios.category_weights)
        self.rollout(iteration, tasks, m)
        return m, self.judge(iteration, tasks, m)

    def learn(self, m: dict[str, float], groups: list[str]) -> dict[str, float]:
        """Update + weight sync: the learner half. The policy version advances only when the weights changed.

        A learner rank lost during the step: the group is re-formed from the checkpoint taken right before this
        iteration and the step runs again; without such a checkpoint the run stops with the error."""
        from mosaic_ray.learners.group import LearnerFailure

        for attempt in range(LEARNER_REFORMS + 1):
            try:
                with self.engine_supervisor.weights_changing():  # no engine reload between update and sync
                    if self.update(groups, m):
                        self.sync(self.state.policy_version + 1, m)
                    else:
                        m["policy_version"] = float(self.state.policy_version)
                return m
            except LearnerFailure as exc:
                with self.engine_supervisor.weights_changing():  # no engine reload from a half-formed group
                    self.reform_learner(int(m["iteration"]), exc, last=attempt == LEARNER_REFORMS)
                m["faults/learner_reforms"] = m.get("faults/learner_reforms", 0.0) + 1
        raise AssertionError("unreachable")

    def reform_learner(self, iteration: int, exc: Exception, *, last: bool) -> None:
        """Re-form the learner group from the checkpoint of iteration - 1, or raise a clear error."""
        st = self.state
        if last or st.checkpoint is None or st.checkpoint_iteration != iteration - 1:
            raise RuntimeError(f"iteration {iteration}: {exc}; the last checkpoint is iteration "
                               f"{st.checkpoint_iteration} ({st.checkpoint}), so the step cannot be retried here: "
                               f"continue with `mosaic-ray train --resume {self.storage.uri}`") from exc
        log.warning("iteration %d: %s; re-forming the learner group from %s and retrying the step", iteration, exc,
                    st.checkpoint)
        self.learner.reform(self.storage.url(st.checkpoint))

    def finish_iteration(self, it: int, row: dict[str, float], t0: float) -> None:
        row["time/iteration_s"] = round(time.perf_counter() - t0, 3)
        self.state.rows.append(row)
        self.metrics.record(row)
        self.trackers.log_metrics(row)
        if (it + 1) % self.cfg.train.checkpoint_every == 0 or it + 1 == self.cfg.train.iterations:
            self.checkpoint(it)
            self.save_state(it)

    def run(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        self.setup()
        try:
            if st.checkpoint is not None:
                self.learner.restore(self.storage.url(st.checkpoint))
                self.sync(st.policy_version)
            else:
                if cfg.warmstart.enabled:
                    st.rows.append({"iteration": -1, **self.warm_start()})
                    self.sync(1)
                st.before = self.evaluate("before")
                self.eval_suites("before")
                self.print_eval("before (warm start)", st.before)
                self.checkpoint(-1)
                self.save_state(-1)
            schedule = AsyncSchedule if cfg.train.mode == "async" else SyncSchedule
            schedule(self).run(st.next_iteration, cfg.train.iterations)
            after = self.evaluate("after")
            self.eval_suites("after")
            self.print_eval("after", after)
            return self.write_report(after)
        except KeyboardInterrupt:
            log.warning("interrupted: the run directory holds the last checkpoint (%s); continue with --resume",
                        st.checkpoint)
            self.write_report(None)
            raise
        finally:
            self.shutdown()

    def save_state(self, iteration: int) -> None:
        """state.json describes the last checkpoint: a resume restarts right after it."""
        st = self.state
        st.next_iteration = iteration + 1
        st.wall_time_s = time.time() - self.t_start + (st.wall_time_s if self.resume else 0.0)
        snapshot = asdict(st)
        snapshot["rows"] = [r for r in st.rows if r["iteration"] <= iteration]
        self.storage.put_json("state.json", snapshot)

    def write_report(self, after: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
        rows = [r for r in self.state.rows if r["iteration"] >= 0]
        wall = time.time() - self.t_start + (self.state.wall_time_s if self.resume else 0.0)
        before, after = self.state.before or {}, after or {}
        splits = {k: {"before": before.get(k), "after": after.get(k)} for k in self.eval_sets if k != "templates"}
        rep = reports.build_report(config_name=self.cfg.name, before=before.get("templates"),
                                   after=after.get("templates"), rows=rows, wall_time_s=wall, splits=splits,
                                   extra={"run_id": self.state.run_id,
                                                            "policy_version": self.state.policy_version,
                                                            "complete": bool(after)})
        files = {"report.json": reports.dumps(rep).encode(), "report.md": reports.report_markdown(rep).encode()}
        if rows:
            files["curves.png"] = reports.curves_png(rows)
        if rep["before"] and rep["after"]:
            files["before_after.png"] = reports.before_after_png(rep)
        for name, data in files.items():
            self.storage.put_bytes(name, data)
        self.trackers.log_artifacts(files)
        return rep

    def shutdown(self) -> None:
        """End every actor this run started (a shared cluster keeps no leftovers), and the trackers' runs."""
        import ray

        if getattr(self, "trackers", None) is not None:
            self.trackers.close()
        if getattr(self, "engine_supervisor", None) is not None:
            self.engine_supervisor.stop()
        for name in ("fleet", "learner"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.shutdown()
        for handle in [*getattr(self, "engines", []), getattr(self, "pairs", None)]:
            if handle is not None:
                ray.kill(handle, no_restart=True)
        if getattr(self, "engine_pg", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.engine_pg)
        if getattr(self, "judge_app", None) is not None:
            from mosaic_ray.actors.judge_service import stop_judge_service

            stop_judge_service(self.judge_started_serve)

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

    def print_eval(self, title: str, by_split: dict[str, dict[str, Any]]) -> None:
        for split, report in by_split.items():
            h = reports.headline(report)
            log.info("eval %s, %s: %s", title, split, ", ".join(f"{k}={v:.3f}" for k, v in h.items()))


# ------------------------------------------------------------------------------------------------ schedules


class SyncSchedule:
    """Iteration k: rollouts with policy v_k → pairs → update → sync v_{k+1}."""

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer

    def run(self, start: int, end: int) -> None:
        for it in range(start, end):
            t0 = time.perf_counter()
            row = self.t.learn(*self.t.collect(it))
            if self.t.eval_due(it):
                self.t.evaluate_between(it, row)
            self.t.finish_iteration(it, row, t0)


class AsyncSchedule:
    """Rollouts of iterations k+1 … k+max_staleness run (one after another) while the learner trains on k.

    Staleness is bounded by admission, never by dropping samples: the rollouts of iteration j are admitted only once
    the policy version is at least j - start - max_staleness versions past the first (or when the learner waits for
    them), so no episode starts on weights older than that; they may run on newer ones. Every trajectory carries the
    version that generated it (engines may be updated while an episode is in flight). No rollouts run across an
    evaluation, which uses the fleet.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer

    def run(self, start: int, end: int) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        if start >= end:
            return
        t, bound = self.t, self.t.cfg.train.max_staleness
        base = t.state.policy_version - start  # version == base + iteration, after that iteration's sync
        pending: dict[int, Future] = {}
        nxt = start
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts") as pool:

            def admit(it: int) -> None:
                """Queue the rollouts of every iteration the bound admits now, from `it` on (the learner's next)."""
                nonlocal nxt
                while nxt < end and (nxt == it or (t.state.policy_version >= base + nxt - bound
                                                   and not any(t.eval_due(e) for e in range(it, nxt)))):
                    pending[nxt] = pool.submit(t.collect, nxt)
                    nxt += 1

            try:
                for it in range(start, end):
                    t0 = time.perf_counter()
                    admit(it)
                    m, groups = pending.pop(it).result()
                    t.learn(m, groups)
                    if t.eval_due(it):   # nothing of a later iteration was admitted across it
                        t.evaluate_between(it, m)
                    t.finish_iteration(it, m, t0)
            finally:   # interrupted: the rollouts already running finish (and commit), the queued ones never start
                for future in pending.values():
                    future.cancel()


# -------------------------------------------------------------------------------------------------- helpers


def group_id(run_id: str, iteration: int, task_id: str) -> str:
    from mosaic_ray.schema import make_group_id

    return make_group_id(run_id, iteration, task_id)


def training_domains(cfg: MosaicConfig) -> tuple[str, ...]:
    """The domains training may draw from: `scenarios.domains` (or all) minus `scenarios.heldout_domains`."""
    from mosaic_ray.envs import DOMAINS

    sc = cfg.scenarios
    return tuple(d for d in (sc.domains or DOMAINS) if d not in sc.heldout_domains)


def scenario_splits(cfg: MosaicConfig) -> tuple[list[Task], dict[str, list[Task]]]:
    """(train tasks, {evaluation split: tasks}): the built-in suites, or a Parquet / JSONL task file split by its
    `split` column. Training and the `templates` split use the training domains; `domains` is the test tasks of
    the held-out domains; `phrasing` the hand-written held-out phrasing set (`train.eval_splits`)."""
    from mosaic_ray.evaluation import spread_over_categories
    from mosaic_ray.scenarios import load_phrasing_tasks, load_tasks, read_tasks

    sc, splits = cfg.scenarios, cfg.train.eval_splits
    train_domains = training_domains(cfg)
    if sc.source == "builtin":
        train = load_tasks("train", size=sc.train_size, seed=sc.seed, domains=train_domains,
                           categories=sc.categories)
        evals = {"templates": load_tasks("test", size=sc.test_size, seed=sc.seed, domains=train_domains,
                                         categories=sc.categories)}
        if "domains" in splits:
            evals["domains"] = load_tasks("test", size=sc.test_size, seed=sc.seed, domains=sc.heldout_domains,
                                          categories=sc.categories)
    else:
        def keep(t: Task, domains: tuple[str, ...]) -> bool:
            return t.domain in domains and (not sc.categories or t.category in sc.categories)

        tasks = read_tasks(sc.source)
        train = [t for t in tasks if t.split == "train" and keep(t, train_domains)][: sc.train_size]
        evals = {"templates": [t for t in tasks if t.split == "test" and keep(t, train_domains)][: sc.test_size]}
        if "domains" in splits:
            evals["domains"] = [t for t in tasks if t.split == "test"
                                and keep(t, sc.heldout_domains)][: sc.test_size]
        if not train or not evals["templates"]:
            raise ConfigError(f"scenarios.source={sc.source}: needs tasks of both splits (train: {len(train)}, "
                              f"test: {len(evals['templates'])}) after the domain/category filters")
    if "domains" in evals and not evals["domains"]:
        raise ConfigError(f"scenarios.heldout_domains={list(sc.heldout_domains)}: no test tasks in those domains")
    if "phrasing" in splits:
        evals["phrasing"] = [t for t in load_phrasing_tasks(seed=sc.seed)
                             if t.domain in train_domains and (not sc.categories or t.category in sc.categories)]
    size = cfg.train.eval_size
    return train, {k: spread_over_categories(v, size) if size else v for k, v in evals.items() if v}