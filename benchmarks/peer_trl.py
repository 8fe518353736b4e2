"""Side by side with TRL: one RL step of ours vs one step of TRL's `GRPOTrainer` on the same work, in one run.

The work of one step: N single-turn act-or-refuse prompts (the scenario generator's training tasks, rendered into
the first-turn prompt exactly as our agent loop renders it) × G samples × T new tokens at temperature 1, a
reward for every sample from our rubric judge, and one optimizer step on all N×G samples. Both sides load the
same weights (the shipped base model of the default run, `builtin:tiny-base`) and run on the CPU with the same
torch thread count, in this process, never at the same time: by default the steps alternate (TRL's step k, then
ours), so a shared machine's drifting load falls on both alike; `--sequential` runs all of ours, then all of TRL's.

- ours: `run_episodes` (the agent loop, one turn: `protocol.max_steps=1`) over an in-process `HFEngine`
  (`await engine.generate([GenerationRequest])`, per-turn seeds) → the `RubricJudge` pairwise over each group
  (`judge_groups`) and `rewards.group_rewards` (wins + format − length, group-normalised advantages), as the
  pair builder does → `PolicySample`s → one `Learner.update` (MOSAIC-GRPO loss, KL to the reference, AdamW),
  the `Learner` built directly, no Ray → the new weights loaded into the engine (`update_weights`, what the
  weight sync does).
- TRL: `GRPOTrainer.train()` with a reward function that replays each completion through the same agent loop
  (`run_episodes`, so the same sandbox grades it) and the same judge and reward code; `num_generations=G`,
  `max_completion_length=T`, one optimizer step = N×G samples, `use_cpu=True`, fp32, no gradient
  checkpointing, no logging, no saving; `beta`, `epsilon`, learning rate, betas, weight decay, gradient clip and
  token-level loss (`dapo`) set to our learner's values.

Equal work: by default every sample generates exactly T tokens on both sides (ours: `ignore_eos`; TRL:
`min_new_tokens=T`), and our update takes every sample, also those of groups whose rewards are all equal (our
training loop would skip those groups; TRL trains on them). Ours runs one epoch per update (the tiny preset runs
two) to match TRL's `num_iterations=1`. `--natural-stop` lets both stop at eos instead.
Each side runs `--warmup` untimed steps, then `--steps` timed ones: mean seconds per step, generated tokens per
second, and `ratio = ours / TRL` (target ≤ 1.0). Ours is timed from the rollout's start to the weight load's end
(engine, learner and judge are built before); TRL's from the trainer's `on_step_begin` to its `on_step_end`
(trainer construction and model loading excluded likewise). Also the mean seconds per phase: ours rollout, judge
(judging, rewards, samples), update, weight load; TRL generate (`model.generate`), reward (the reward function)
and the rest (reference log-probs, loss forward/backward, optimizer, the trainer's own work). Prints a table, the
phases and one JSON line.

    python -m mosaic_ray.benchmarks.peer_trl [--prompts 12] [--group-size 4] [--new-tokens 128] [--steps 3]
           [--warmup 1] [--threads 2] [--sequential] [--natural-stop] [--json out.json]

Needs the bench extra (`pip install -e '.[bench]'`, TRL 1.16).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Setup:
    """What both sides share: config, model, tokenizer, tasks and their rendered prompts."""

    cfg: Any
    model_dir: str
    tasks: list
    prompt_ids: list[list[int]]
    prompts: list[str]
    protocol_cfg: Any
    judge_cfg: Any
    learner_cfg: Any
    group_size: int
    new_tokens: int
    forced: bool
    threads: int


def make_setup(args: argparse.Namespace) -> Setup:
    from mosaic_ray import protocol
    from mosaic_ray.config import load_config
    from mosaic_ray.episode import Episode
    from mosaic_ray.models.source import policy_source, resolve_model
    from mosaic_ray.rollout import load_tokenizer
    from mosaic_ray.scenarios import load_tasks

    cfg = load_config(args.config)
    model_dir = args.model or resolve_model(policy_source(cfg.model), cfg.model.cache_dir)
    # single turn: the episode ends after the first assistant turn, whatever it does
    pcfg = dataclasses.replace(cfg.protocol, max_steps=1, max_new_tokens=args.new_tokens)
    tok = load_tokenizer(model_dir, cfg.model.chat_template)
    tasks = load_tasks("train", size=args.prompts, seed=cfg.scenarios.seed)
    if len(tasks) != args.prompts:
        raise ValueError(f"the scenario generator gave {len(tasks)} tasks, asked for {args.prompts}")
    prompt_ids = []
    for t in tasks:   # what run_episode renders as the first prompt
        ep = Episode(t, protocol_cfg=pcfg, family=cfg.model.family)
        prompt_ids.append(protocol.render_prompt_ids(tok, ep.messages, ep.tool_schemas))
    prompts = [tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) for ids in prompt_ids]
    # TRL tokenizes a text prompt with `processing_class(text=prompts)`: it must give exactly our prompt ids
    retok = tok(text=prompts)["input_ids"]
    bad = [t.task_id for t, a, b in zip(tasks, retok, prompt_ids) if list(a) != list(b)]
    if bad:
        raise RuntimeError(f"TRL would see other prompt tokens than ours for {len(bad)} task(s), e.g. {bad[0]!r}")
    # the episode budget must not cut a turn short of T tokens (the runner caps a turn at what is left of it)
    need = max(len(ids) for ids in prompt_ids) + args.new_tokens
    pcfg = dataclasses.replace(pcfg, max_episode_tokens=max(pcfg.max_episode_tokens, need + 1))
    lcfg = dataclasses.replace(cfg.learner, num_learners=0, epochs_per_iteration=1, cpu_threads=args.threads)
    return Setup(cfg, model_dir, tasks, prompt_ids, prompts, pcfg, cfg.judge, lcfg, args.group_size,
                 args.new_tokens, not args.natural_stop, args.threads)


def judge_and_reward(records: list, judge: Any, judge_cfg: Any) -> dict[str, Any]:
    """The pair builder's judging and rewarding of complete groups, without storage: every pair of each group
    by `judge` (`judge_groups`), then `group_rewards`. Returns traj_id → RewardRecord."""
    from mosaic_ray.judge import judge_groups
    from mosaic_ray.rewards import group_rewards

    groups: dict[str, list] = {}
    for r in records:
        groups.setdefault(r.group_id, []).append(r)
    trajs = [sorted(g, key=lambda r: r.sample_idx) for g in groups.values()]
    out = {}
    for members, pairs in zip(trajs, judge_groups(judge, trajs)):
        for row in group_rewards(members, pairs, judge_cfg):
            out[row.traj_id] = row
    return out


def _flat_groups(rewards: dict[str, Any]) -> int:
    """Groups whose advantages are all zero (no signal)."""
    by: dict[str, list[float]] = {}
    for row in rewards.values():
        by.setdefault(row.group_id, []).append(row.advantage)
    return sum(all(a == 0.0 for a in advs) for advs in by.values())


def _check(records: list) -> None:
    failed = [r for r in records if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} episode(s) failed, e.g. {failed[0].traj_id}: {failed[0].error}")


# ------------------------------------------------------------------------------------------------- ours


OURS_PHASES = ("rollout_s", "judge_s", "update_s", "weight_load_s")


class OursStepper:
    """Our step, one call at a time: rollout → judge → update → weight load. Builds the engine, the learner and
    the judge once (not timed); `step(it)` appends the step's seconds and phases to `rows`."""

    def __init__(self, s: Setup):
        from mosaic_ray.actors.engines import EngineRouter
        from mosaic_ray.actors.engines.hf import HFEngine
        from mosaic_ray.actors.rollout_worker import EnginePolicy
        from mosaic_ray.learners import Learner

        from mosaic_ray.judge import RubricJudge
        from mosaic_ray.rollout import load_tokenizer

        e = s.cfg.engine
        self.s = s
        self.tok = load_tokenizer(s.model_dir, s.cfg.model.chat_template)
        self.learner = Learner(s.model_dir, s.learner_cfg, chat_template=s.cfg.model.chat_template)
        self.judge = RubricJudge(s.judge_cfg.tie_tolerance_tokens)
        self.engine = HFEngine(s.model_dir, max_batch_size=max(e.max_batch_size, len(s.tasks) * s.group_size),
                               max_wait_ms=e.max_wait_ms, dtype=s.cfg.model.dtype, device="cpu",
                               max_model_len=e.max_model_len, seed=e.seed, cpu_threads=s.threads,
                               prefix_cache_mb=e.prefix_cache_mb)
        self.policy = EnginePolicy(EngineRouter([self.engine]), e, ignore_eos=s.forced)
        self.loop = asyncio.new_event_loop()   # the engine settles its futures on the loop that awaits them
        self.rows: list[dict[str, float]] = []

    def step(self, it: int) -> None:
        self.rows.append(self.loop.run_until_complete(self._step(it)))

    async def _step(self, it: int) -> dict[str, float]:
        from mosaic_ray.algorithms.batch import _sample_from_row
        from mosaic_ray.rollout import episode_specs, run_episodes

        s, engine, learner = self.s, self.engine, self.learner
        specs = episode_specs(s.tasks, group_size=s.group_size, run_id="peer-ours", iteration=it,
                              policy_version=engine.version)
        t0 = time.perf_counter()
        records = await run_episodes(specs, lambda spec: self.policy, self.tok, concurrency=len(specs),
                                     protocol_cfg=s.protocol_cfg, family=s.cfg.model.family)
        _check(records)
        t1 = time.perf_counter()
        rewards = judge_and_reward(records, self.judge, s.judge_cfg)
        samples = [_sample_from_row({"traj_id": r.traj_id, "prompt_ids": r.prompt_ids,
                                     "completion_ids": r.completion_ids, "loss_mask": r.loss_mask,
                                     "behavior_logprobs": r.behavior_logprobs},
                                    rewards[r.traj_id].advantage) for r in records]
        t2 = time.perf_counter()
        learner.update(samples)
        t3 = time.perf_counter()
        weights = [nt for bucket in learner.iter_weight_buckets(s.cfg.learner.sync_bucket_mb << 20) for nt in bucket]
        engine.update_weights(weights, engine.version + 1)
        t4 = time.perf_counter()
        return {"step_s": t4 - t0, "rollout_s": t1 - t0, "judge_s": t2 - t1, "update_s": t3 - t2,
                "weight_load_s": t4 - t3, "gen_tokens": sum(sum(r.loss_mask) for r in records),
                "flat_groups": _flat_groups(rewards)}

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.close())
        self.loop.close()
        self.learner.close()


# -------------------------------------------------------------------------------------------------- TRL


class _Replay:
    """A policy that answers the one turn with tokens TRL already generated (log-probs unused: 0.0)."""

    def __init__(self, ids: list[int], version: int):
        self.ids, self.version = ids, version

    async def __call__(self, request: Any) -> Any:
        from mosaic_ray.rollout import ScriptedCompletion

        return ScriptedCompletion(list(self.ids), [0.0] * len(self.ids), "length", self.version)


def run_trl(s: Setup, warmup: int, steps: int, between: Callable[[int], None] | None = None) -> dict[str, Any]:
    """`GRPOTrainer.train()` for `warmup` + `steps` optimizer steps; the timed steps' seconds. A step's time runs
    from the trainer's `on_step_begin` to its `on_step_end` (generation, rewards, reference log-probs, loss,
    backward, optimizer); `between(k)`, when given, runs after step k, outside TRL's clock."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from mosaic_ray.judge import RubricJudge
    from mosaic_ray.rollout import EpisodeSpec, load_tokenizer, run_episodes

    tok = load_tokenizer(s.model_dir, s.cfg.model.chat_template)
    judge = RubricJudge(s.judge_cfg.tie_tolerance_tokens)
    per_step: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def mosaic_reward(prompts, completions, completion_ids, task_index, trainer_state, **_):
        """Each completion replayed as the episode's one turn (graded by our sandbox), then our judge and
        rewards over each group of G."""
        t0 = time.perf_counter()
        step = trainer_state.global_step
        seen: Counter = Counter()
        specs = []
        for i in task_index:
            specs.append(EpisodeSpec(s.tasks[i], "peer-trl", step, seen[i]))
            seen[i] += 1
        if sorted(seen.values()) != [s.group_size] * len(seen):
            raise RuntimeError(f"TRL passed groups of sizes {sorted(seen.values())}, expected {s.group_size} each")
        ids = {spec.traj_id: list(c) for spec, c in zip(specs, completion_ids)}
        records = asyncio.run(run_episodes(specs, lambda spec: _Replay(ids[spec.traj_id], step), tok,
                                           concurrency=len(specs), protocol_cfg=s.protocol_cfg,
                                           family=s.cfg.model.family))
        _check(records)
        rewards = judge_and_reward(records, judge, s.judge_cfg)
        per_step[step].update(reward_s=time.perf_counter() - t0, gen_tokens=sum(len(c) for c in completion_ids),
                              flat_groups=_flat_groups(rewards))
        return [rewards[spec.traj_id].reward for spec in specs]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)
            if between is not None:
                between(state.global_step - 1)

    lc = s.learner_cfg
    out_dir = tempfile.mkdtemp(prefix="peer-trl-", dir="/tmp")
    try:
        config = GRPOConfig(
            output_dir=out_dir, max_steps=warmup + steps, per_device_train_batch_size=len(s.tasks) * s.group_size,
            gradient_accumulation_steps=1, num_generations=s.group_size, max_completion_length=s.new_tokens,
            temperature=s.cfg.engine.temperature, top_p=s.cfg.engine.top_p, top_k=0,
            generation_kwargs={"min_new_tokens": s.new_tokens} if s.forced else None,
            learning_rate=lc.lr, adam_beta1=lc.betas[0], adam_beta2=lc.betas[1], weight_decay=lc.weight_decay,
            max_grad_norm=lc.grad_clip, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
            beta=lc.kl_coef, epsilon=lc.clip_eps, loss_type="dapo", num_iterations=1, scale_rewards="group",
            use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            model_init_kwargs={"dtype": s.cfg.model.dtype}, shuffle_dataset=False, seed=lc.seed,
            report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0)
        dataset = Dataset.from_dict({"prompt": s.prompts, "task_index": list(range(len(s.tasks)))})
        clock = StepClock()
        trainer = GRPOTrainer(model=s.model_dir, reward_funcs=mosaic_reward, args=config, train_dataset=dataset,
                              processing_class=tok, callbacks=[clock])
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)

        def timed(fn):   # seconds of TRL's generation (`model.generate`) per optimizer step
            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    per_step[trainer.state.global_step]["generate_s"] += time.perf_counter() - t0
            return wrapper

        trainer._generate_single_turn = timed(trainer._generate_single_turn)
        torch.set_num_threads(s.threads)
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if len(clock.seconds) != warmup + steps:
        raise RuntimeError(f"TRL ran {len(clock.seconds)} optimizer steps, expected {warmup + steps}")
    rows = [{"step_s": sec, **per_step[k]} for k, sec in enumerate(clock.seconds)]
    for r in rows:   # reference log-probs, loss forward/backward, optimizer, the trainer's own work
        r["rest_s"] = r["step_s"] - r["generate_s"] - r["reward_s"]
    return _summary(rows, warmup, ("generate_s", "reward_s", "rest_s"))


# ------------------------------------------------------------------------------------------------- main


def _summary(rows: list[dict[str, float]], warmup: int, phases: tuple[str, ...]) -> dict[str, Any]:
    timed = rows[warmup:]
    step_s = [r["step_s"] for r in timed]
    mean = statistics.mean(step_s)
    tokens = statistics.mean(r["gen_tokens"] for r in timed)
    return {"steps": len(timed), "s_per_step": mean, "step_s": step_s,
            "warmup_s": [r["step_s"] for r in rows[:warmup]], "gen_tokens_per_step": tokens,
            "tokens_per_s": tokens / mean, "flat_groups": [r["flat_groups"] for r in timed],
            "phases_s": {p: statistics.mean(r[p] for r in timed) for p in phases}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", "-n", type=int, default=12, help="N: prompts per step")
    ap.add_argument("--group-size", "-g", type=int, default=4, help="G: samples per prompt")
    ap.add_argument("--new-tokens", "-t", type=int, default=128, help="T: new tokens per sample")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side before the timed ones")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (both sides)")
    ap.add_argument("--sequential", action="store_true",
                    help="run all of our steps, then all of TRL's (default: alternate, TRL step k then our step k)")
    ap.add_argument("--natural-stop", action="store_true",
                    help="let samples stop at eos (default: exactly T tokens on both sides)")
    ap.add_argument("--config", default="tiny-cpu", help="preset or YAML whose model, protocol, judge, engine and "
                                                         "learner sections are used")
    ap.add_argument("--model", default=None, help="HF model dir (default: the config's model.path)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.group_size < 2 or args.prompts < 1 or args.new_tokens < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("need --group-size >= 2, --prompts >= 1, --new-tokens >= 1, --steps >= 1, --warmup >= 0")
    for var, value in (("HF_HUB_OFFLINE", "1"), ("RAY_USAGE_STATS_ENABLED", "0"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(var, value)
    from mosaic_ray.hygiene import set_torch_threads

    set_torch_threads(args.threads)
    import torch
    import trl

    setup = make_setup(args)
    load_before = os.getloadavg()[0]
    stepper = OursStepper(setup)
    try:
        if args.sequential:
            for it in range(args.warmup + args.steps):
                stepper.step(it)
            theirs = run_trl(setup, args.warmup, args.steps)
        else:   # both sides see the machine as it is at that moment (its load drifts on a shared machine)
            theirs = run_trl(setup, args.warmup, args.steps, between=stepper.step)
    finally:
        stepper.close()
    ours = _summary(stepper.rows, args.warmup, OURS_PHASES)
    ratio = ours["s_per_step"] / theirs["s_per_step"]
    load = os.getloadavg()[0]
    result = {"prompts": args.prompts, "group_size": args.group_size, "new_tokens": args.new_tokens,
              "forced_length": setup.forced, "warmup_steps": args.warmup, "threads": args.threads,
              "order": "sequential" if args.sequential else "alternating",
              "model": setup.model_dir, "config": args.config,
              "categories": dict(Counter(t.category for t in setup.tasks)),
              "prompt_tokens": [len(p) for p in setup.prompt_ids],
              "ours": ours, "trl": theirs, "ratio": ratio, "target_ratio": 1.0,
              "trl_version": trl.__version__, "torch_version": torch.__version__, "cores": os.cpu_count(),
              "load_average": [load_before, load]}
    print(f"model {setup.model_dir} | N={args.prompts} × G={args.group_size} × {args.new_tokens} new tokens "
          f"({'forced' if setup.forced else 'stop at eos'}) | {args.threads} threads | "
          f"{'sequential' if args.sequential else 'alternating steps'} | TRL {trl.__version__} | "
          f"cores {os.cpu_count()} | load average {load_before:.1f} -> {load:.1f}")
    print(f"{'side':<6} {'steps':>6} {'s/step':>8} {'tokens/s':>9}")
    for name, side in (("ours", ours), ("TRL", theirs)):
        print(f"{name:<6} {side['steps']:>6} {side['s_per_step']:>8.2f} {side['tokens_per_s']:>9.0f}")
    for name, side in (("ours", ours), ("TRL", theirs)):
        print(f"{name} phases (s/step): " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}"
                                                       for k, v in side["phases_s"].items()))
    print(f"ratio ours/TRL: {ratio:.2f}x (target <= 1.0x)")
    from mosaic_ray.benchmarks.harness import emit

    return emit(result, args.json)


if __name__ == "__main__":
    main()
