"""Warm-start data: scripted demonstrations with deliberate mistakes → SFT samples (loss on assistant tokens).

The scripted policy complies with some harmful tasks, follows some injections, over-refuses some benign tasks
and leaks some private data (rates from `WarmStartConfig`), so the SFT'd tiny model starts imperfect and RL has
something real to fix (docs/learning-check.md: the refuse-or-comply choice lands near the demonstrated rate).

Conversations are tokenized with the tokenizer's own chat template; the template's generation markers give the
assistant-token mask (`return_assistant_tokens_mask`), so system, user and tool-response tokens never get loss.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mosaic_ray.algorithms.batch import PolicySample
from mosaic_ray.config import WarmStartConfig

if TYPE_CHECKING:
    from mosaic_ray.scenarios.tasks import Task


def copy_weights(ids: Sequence[int], mask: Sequence[int], request_ids: set[int], weight: float, *,
                 decode: Callable[[int], str], special: set[int]) -> list[float]:
    """`weight` on assistant tokens inside a tool call's arguments that also occur in the user's request — the
    names, accounts and files a call must copy — and 1 everywhere else (`special` token ids never). A tool call's
    arguments are the rest of an assistant run after its first token that spells `arguments`."""
    out = [1.0] * len(ids)
    in_args = False
    for k, (tid, m) in enumerate(zip(ids, mask)):
        if not m:
            in_args = False
            continue
        text = decode(tid)
        if not in_args:
            in_args = "arguments" in text
        elif tid in request_ids and tid not in special and any(ch.isalnum() for ch in text):
            out[k] = weight
    return out


def demo_samples(demos: Sequence[dict[str, Any]], tokenizer, *, max_tokens: int | None = None,
                 copy_weight: float = 1.0, decision_weight: float = 1.0) -> list[PolicySample]:
    """Tokenize demonstrations (`messages`, `tools`, `task_id`); drop ones longer than `max_tokens`. With
    `copy_weight` > 1, argument tokens copied from the first user message get that loss weight (`copy_weights`);
    `decision_weight` is the loss weight of the first assistant turn's first plan token (refuse or act)."""
    samples = []
    decode = functools.lru_cache(maxsize=None)(lambda tid: tokenizer.decode([tid]))
    special = set(tokenizer.all_special_ids)
    for i, demo in enumerate(demos):
        enc = tokenizer.apply_chat_template(demo["messages"], tools=demo.get("tools") or None, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), [int(m) for m in enc["assistant_masks"]]
        where = f"demonstration {i} (task {demo.get('task_id', '?')})"
        if len(mask) != len(ids):
            raise ValueError(f"{where}: assistant mask has {len(mask)} entries for {len(ids)} tokens")
        if not any(mask):
            raise ValueError(f"{where}: no assistant tokens; does the chat template mark generation "
                             f"with {{% generation %}}?")
        if max_tokens is not None and len(ids) > max_tokens:
            continue
        weights = None
        if copy_weight != 1.0:
            request = next(m["content"] for m in demo["messages"] if m["role"] == "user")
            request_ids = set(tokenizer(request, add_special_tokens=False)["input_ids"])
            weights = copy_weights(ids, mask, request_ids, copy_weight, decode=decode, special=special)
        if decision_weight != 1.0:
            weights = weights or [1.0] * len(ids)
            weights[mask.index(1) + 1] = decision_weight  # the turn opens with <think>; the next token decides
        samples.append(PolicySample(input_ids=ids, loss_mask=mask, old_logprobs=[0.0] * len(ids),
                                    traj_id=str(demo.get("task_id", i)), loss_weights=weights))
    return samples


def warmstart_samples(cfg: WarmStartConfig, tokenizer, *, split: str = "train", seed: int = 0,
                      max_tokens: int | None = None, domains: Sequence[str] = ()) -> list[PolicySample]:
    """`cfg.num_demos` demonstrations of `split` tasks (of `domains`; empty = all) by the mistake-making scripted
    policy, tokenized."""
    from mosaic_ray.policies.scripted import ScriptedPolicy, demonstrations
    from mosaic_ray.scenarios import load_tasks

    policy = ScriptedPolicy(comply_harmful_rate=cfg.comply_harmful_rate,
                            follow_injection_rate=cfg.follow_injection_rate,
                            refuse_benign_rate=cfg.refuse_benign_rate, leak_privacy_rate=cfg.leak_privacy_rate,
                            safety_check_rate=cfg.safety_check_rate, seed=seed)
    tasks = load_tasks(split, size=cfg.num_demos, seed=seed, domains=tuple(domains))
    return demo_samples(demonstrations(tasks, policy), tokenizer, max_tokens=max_tokens, copy_weight=cfg.copy_weight,
                        decision_weight=cfg.decision_weight)


def first_turn_samples(cfg: WarmStartConfig, tokenizer, *, split: str = "train", seed: int = 0,
                       max_tokens: int | None = None, domains: Sequence[str] = ()) -> list[PolicySample]:
    """`cfg.num_demos` mistake-free demonstrations cut after their first assistant turn, tokenized, with the
    decision token weighted by `cfg.first_turn_decision_weight`: the first-turn curriculum
    (`WarmStartConfig.first_turn_steps`)."""
    from mosaic_ray.policies.scripted import ScriptedPolicy, demonstrations
    from mosaic_ray.scenarios import load_tasks

    demos = demonstrations(load_tasks(split, size=cfg.num_demos, seed=seed, domains=tuple(domains)),
                           ScriptedPolicy(safety_check_rate=cfg.safety_check_rate, seed=seed))
    for d in demos:
        first = next(i for i, m in enumerate(d["messages"]) if m["role"] == "assistant")
        d["messages"] = d["messages"][:first + 1]
    return demo_samples(demos, tokenizer, max_tokens=max_tokens, copy_weight=cfg.copy_weight,
                        decision_weight=cfg.first_turn_decision_weight)


def replay_samples(tasks: Sequence[Task], tokenizer, *, max_tokens: int | None = None,
                   copy_weight: float = 1.0) -> list[PolicySample]:
    """Mistake-free demonstrations of the benign tasks among `tasks`, tokenized: the helpfulness replay."""
    from mosaic_ray.policies.scripted import ScriptedPolicy, demonstrations

    benign = [t for t in tasks if t.category == "benign"]
    if not benign:
        raise ValueError("warmstart.replay_coef > 0 needs benign training tasks to replay; the task set has none")
    return demo_samples(demonstrations(benign, ScriptedPolicy()), tokenizer, max_tokens=max_tokens,
                        copy_weight=copy_weight)


def lr_at(step: int, cfg: WarmStartConfig) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `lr_end` at `steps` (docs/learning-check.md)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr_end + 0.5 * (cfg.lr - cfg.lr_end) * (1 + math.cos(math.pi * progress))


BUCKET_WINDOW = 8
"""Batches whose samples are sorted by length together (length bucketing: about a third less padding)."""


def epoch_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of index batches: shuffle, sort by length within windows of `BUCKET_WINDOW` batches, cut, and
    shuffle the batches. Every index appears once (the last batch of the epoch may be short)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = BUCKET_WINDOW * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def run_warmstart(group, samples: Sequence[PolicySample], cfg: WarmStartConfig, *, seed: int = 0,
                  steps: int | None = None, on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """`steps` (default cfg.steps) SFT steps of up to `cfg.batch_size` demonstrations, each drawn once per epoch
    in length-bucketed batches (`epoch_batches`); `group` is anything with `sft_update(samples, *, lr)` (a
    LearnerGroup). Returns each step's metrics."""
    if not samples:
        raise ValueError("run_warmstart: no demonstration samples")
    rng = random.Random(seed)
    lengths = [len(s.input_ids) for s in samples]
    pending: list[list[int]] = []
    history = []
    for step in range(cfg.steps if steps is None else steps):
        if not pending:
            pending = epoch_batches(lengths, cfg.batch_size, rng)
        batch = [samples[i] for i in pending.pop()]
        metrics = group.sft_update(batch, lr=lr_at(step, cfg))
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)
    return history
