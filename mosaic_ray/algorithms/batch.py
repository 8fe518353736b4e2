"""The learner's input records and how they become padded micro-batches.

A `PolicySample` is one trajectory as token lists aligned with `input_ids` (prompt + completion). Micro-batches
shift by one position: row t of `targets`/`mask`/`old_logp` is the token at position t+1, predicted from
position t. Packing keeps every micro-batch under a token budget (rows × padded length), so a 152k vocab and long
tool chains fit; gradients accumulate across micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PolicySample:
    """One trajectory for the learner. All lists have the length of `input_ids`."""

    input_ids: list[int]
    """Prompt + completion token ids."""
    loss_mask: list[int]
    """1 only on policy-generated tokens; prompt and tool-observation tokens 0."""
    old_logprobs: list[float]
    """Behaviour log-probs at mask-1 positions, 0.0 elsewhere."""
    advantage: float = 0.0
    ref_logprobs: list[float] | None = None
    """Reference-policy log-probs (KL, DPO); None lets the learner compute them with its frozen reference."""
    traj_id: str = ""
    loss_weights: list[float] | None = None
    """Per-token weights multiplying `loss_mask` (SFT: argument tokens the demo copies from the prompt weigh more,
    `WarmStartConfig.copy_weight`); None = every masked token weighs 1."""

    def validate(self, where: str = "sample") -> None:
        n = len(self.input_ids)
        if n < 2:
            raise ValueError(f"{where} ({self.traj_id or 'no traj_id'}): input_ids has {n} tokens, need >= 2")
        for name in ("loss_mask", "old_logprobs", "ref_logprobs", "loss_weights"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{where} ({self.traj_id or 'no traj_id'}): {name} has {len(value)} entries, "
                                 f"input_ids has {n}; they must be aligned token by token")


@dataclass
class PreferencePair:
    """A DPO pair: `chosen` was preferred over `rejected` by the judge."""

    chosen: PolicySample
    rejected: PolicySample
    weight: float = 1.0


@dataclass
class MicroBatch:
    """Padded tensors of one micro-batch; everything after `input_ids` is shifted to target positions."""

    input_ids: torch.Tensor          # (B, T) long, right-padded
    attention_mask: torch.Tensor     # (B, T) long
    targets: torch.Tensor            # (B, T-1) long: input_ids[:, 1:]
    mask: torch.Tensor               # (B, T-1) float: (loss_mask · loss_weights)[:, 1:] (0 on padding)
    old_logp: torch.Tensor           # (B, T-1) float
    adv: torch.Tensor                # (B,) float (DPO: the pair weight on both rows)
    ref_logp: torch.Tensor | None    # (B, T-1) float, None when some row has no reference log-probs
    num_tokens: int = 0              # real (unpadded) tokens

    def to(self, device: torch.device | str) -> MicroBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)


def validate_units(units: Sequence[PolicySample | PreferencePair], algorithm: str) -> None:
    """DPO takes pairs, every other loss samples; every row's lists must align. Errors name the item."""
    want_pairs = algorithm == "dpo"
    for i, u in enumerate(units):
        if isinstance(u, PreferencePair) != want_pairs:
            raise TypeError(f"update(algorithm={algorithm!r}): item {i} is a {type(u).__name__}; "
                            f"{'dpo takes PreferencePair' if want_pairs else 'it takes PolicySample'} items")
        if want_pairs:
            u.chosen.validate(f"item {i} (chosen)")
            u.rejected.validate(f"item {i} (rejected)")
        else:
            u.validate(f"item {i}")


def _rows(unit: PolicySample | PreferencePair) -> list[PolicySample]:
    return [unit.chosen, unit.rejected] if isinstance(unit, PreferencePair) else [unit]


def collate(units: Sequence[PolicySample | PreferencePair], pad_id: int) -> MicroBatch:
    """Pad and stack samples (or pairs, as interleaved chosen/rejected rows) into one micro-batch."""
    rows: list[PolicySample] = []
    adv: list[float] = []
    for unit in units:
        rows += _rows(unit)
        adv += [unit.weight, unit.weight] if isinstance(unit, PreferencePair) else [unit.advantage]
    T = max(len(r.input_ids) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    lmask = torch.zeros((B, T), dtype=torch.float32)
    old = torch.zeros((B, T), dtype=torch.float32)
    has_ref = all(r.ref_logprobs is not None for r in rows)
    ref = torch.zeros((B, T), dtype=torch.float32) if has_ref else None
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        attn[i, :n] = 1
        lmask[i, :n] = torch.tensor(r.loss_mask, dtype=torch.float32)
        if r.loss_weights is not None:
            lmask[i, :n] *= torch.tensor(r.loss_weights, dtype=torch.float32)
        old[i, :n] = torch.tensor(r.old_logprobs, dtype=torch.float32)
        if ref is not None:
            ref[i, :n] = torch.tensor(r.ref_logprobs, dtype=torch.float32)
    return MicroBatch(input_ids=ids, attention_mask=attn, targets=ids[:, 1:].clone(), mask=lmask[:, 1:].clone(),
                      old_logp=old[:, 1:].clone(), adv=torch.tensor(adv, dtype=torch.float32),
                      ref_logp=None if ref is None else ref[:, 1:].clone(), num_tokens=int(attn.sum()))


def unit_length(unit: PolicySample | PreferencePair) -> int:
    return max(len(r.input_ids) for r in _rows(unit))


def pack_micro_batches(units: Sequence[PolicySample | PreferencePair], micro_batch_tokens: int,
                       pad_id: int) -> list[MicroBatch]:
    """Greedy packing by length: each micro-batch's rows × padded length stays ≤ `micro_batch_tokens`
    (a single unit longer than the budget gets a micro-batch of its own). Deterministic."""
    order = sorted(range(len(units)), key=lambda i: -unit_length(units[i]))
    groups: list[list[int]] = []
    rows = longest = 0
    for i in order:
        n_rows, n = len(_rows(units[i])), unit_length(units[i])
        if groups and (rows + n_rows) * max(longest, n) <= micro_batch_tokens:
            groups[-1].append(i)
            rows += n_rows
            longest = max(longest, n)
        else:
            groups.append([i])
            rows, longest = n_rows, n
    return [collate([units[i] for i in g], pad_id) for g in groups]


def shard(units: Sequence[Any], world_size: int) -> list[list[Any]]:
    """Split a global batch over ranks, balancing tokens (longest first onto the lightest rank)."""
    if len(units) < world_size:
        raise ValueError(f"global batch of {len(units)} items is smaller than num_learners={world_size}; "
                         f"every learner needs at least one")
    shards: list[list[Any]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(range(len(units)), key=lambda i: -unit_length(units[i])):
        r = min(range(world_size), key=lambda k: (load[k], len(shards[k]), k))
        shards[r].append(units[i])
        load[r] += unit_length(units[i])
    return shards


# ------------------------------------------------------------------------------------------ from datasets


@dataclass
class SampleStats:
    """What `samples_and_stats` kept and skipped (logged as learner metrics)."""

    groups: int = 0
    zero_variance_groups: int = 0
    """Groups whose advantages are all equal: no signal, skipped."""
    skipped_samples: int = 0
    unrewarded_trajectories: int = 0
    notes: list[str] = field(default_factory=list)


def samples_and_stats(trajectories, rewards, *, eps: float = 1e-8) -> tuple[list[PolicySample], SampleStats]:
    """Join trajectory rows with reward rows on `traj_id`; drop groups with zero advantage variance."""
    need_t = ("traj_id", "group_id", "prompt_ids", "completion_ids", "loss_mask", "behavior_logprobs")
    for name, table, cols in (("trajectories", trajectories, need_t), ("rewards", rewards, ("traj_id", "advantage"))):
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise ValueError(f"{name} table: missing column(s) {missing} (has {table.column_names})")
    adv = dict(zip(rewards.column("traj_id").to_pylist(), rewards.column("advantage").to_pylist()))
    rows = trajectories.select(list(need_t)).to_pylist()
    known = {r["traj_id"] for r in rows}
    orphans = [t for t in adv if t not in known]
    if orphans:
        raise ValueError(f"rewards table: {len(orphans)} traj_id(s) not in the trajectories table, e.g. {orphans[0]!r}")
    stats = SampleStats()
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["traj_id"] not in adv:
            stats.unrewarded_trajectories += 1
            continue
        groups.setdefault(r["group_id"], []).append(r)
    samples: list[PolicySample] = []
    for members in groups.values():
        stats.groups += 1
        values = [float(adv[m["traj_id"]]) for m in members]
        if max(values) - min(values) <= eps:
            stats.zero_variance_groups += 1
            stats.skipped_samples += len(members)
            continue
        for m, a in zip(members, values):
            samples.append(_sample_from_row(m, a))
    return samples, stats


def _sample_from_row(row: dict, advantage: float) -> PolicySample:
    prompt, completion = list(row["prompt_ids"]), list(row["completion_ids"])
    mask, logps = list(row["loss_mask"]), list(row["behavior_logprobs"])
    if not (len(mask) == len(logps) == len(completion)):
        raise ValueError(f"trajectory {row['traj_id']!r}: completion_ids ({len(completion)}), loss_mask ({len(mask)}) "
                         f"and behavior_logprobs ({len(logps)}) must have the same length")
    sample = PolicySample(input_ids=prompt + completion, loss_mask=[0] * len(prompt) + [int(m) for m in mask],
                          old_logprobs=[0.0] * len(prompt) + [float(x) if m else 0.0 for x, m in zip(logps, mask)],
                          advantage=advantage, traj_id=row["traj_id"])
    sample.validate(f"trajectory {row['traj_id']!r}")
    return sample


def samples_from_tables(trajectories, rewards) -> list[PolicySample]:
    """`PolicySample`s from a trajectories table and a rewards table (pyarrow); see `samples_and_stats`."""
    return samples_and_stats(trajectories, rewards)[0]


# ------------------------------------------------------------------------------------------ from storage


@dataclass(frozen=True)
class IterationData:
    """The control message of one update: which committed groups of the run's storage to learn from. Every
    learner rank reads the rows itself (`iteration_batch`); the message carries no training data."""

    storage_uri: str
    iteration: int
    group_ids: tuple[str, ...]
    policy_version: int
    """The version the policy will have been updated from (the staleness metric's reference)."""


def iteration_batch(data: IterationData) -> tuple[list[PolicySample], dict[str, float]]:
    """(samples, metrics) of `data`'s groups, read from the committed `trajectories/` and `rewards/` shards that
    hold them. The metrics: the rollout rates, reward and staleness means, and the sample counts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from mosaic_ray.evaluation import rollout_rates
    from mosaic_ray.schema import TrajectoryRecord, from_arrow
    from mosaic_ray.storage import RunStorage

    storage, groups = RunStorage(data.storage_uri), set(data.group_ids)

    def rows(dataset: str):
        table = storage.read_dataset(dataset, shards=lambda s: not groups.isdisjoint(s.meta.get("groups", ())))
        return table.filter(pc.is_in(table.column("group_id"), value_set=pa.array(sorted(groups))))

    traj, rewards = rows("trajectories"), rows("rewards")
    found = set(traj.column("group_id").to_pylist())
    if found != groups:
        raise ValueError(f"{storage.uri}: iteration {data.iteration}: {len(groups - found)} group(s) not committed "
                         f"in trajectories/, e.g. {min(groups - found)!r}")
    records = from_arrow(traj, TrajectoryRecord)
    samples, stats = samples_and_stats(traj, rewards)
    rw = rewards.to_pydict()
    metrics = {**rollout_rates(records),
               "reward/mean": sum(rw["reward"]) / max(1, len(rw["reward"])),
               "reward/wins_mean": sum(rw["wins"]) / max(1, len(rw["wins"])),
               "staleness/mean": sum(data.policy_version - r.policy_version for r in records) / max(1, len(records)),
               "update/samples": float(len(samples)), "update/groups_without_signal": float(stats.zero_variance_groups)}
    return samples, metrics
