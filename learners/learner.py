"""One learner rank: model, optimizer, micro-batched updates, weights out, checkpoints. No Ray here.

A `Learner` is used in-process (`LearnerGroup(num_learners=0)`) or inside a Ray actor, one per rank, joined in a
`torch.distributed` group (gloo on CPU, NCCL on GPU). DDP for small models, FSDP2 (`fully_shard` per decoder
layer + root) for large ones, where AdamW state must shard.

Loss normalisation: every loss divides by the GLOBAL denominator (policy tokens or sequences of the whole
update, summed over micro-batches and all-reduced over ranks, TRL's `global_masked_mean` idea); DDP/FSDP
average gradients over ranks, so each rank's loss is multiplied by the world size. The result is the gradient
of one big batch: 2 learners == 1 learner, and micro-batching never changes the update.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mosaic_ray.algorithms import get_loss, loss_norm
from mosaic_ray.algorithms.batch import MicroBatch, PolicySample, PreferencePair, pack_micro_batches, validate_units
from mosaic_ray.algorithms.logprobs import chunked_logprobs
from mosaic_ray.config import LearnerConfig
from mosaic_ray.hygiene import set_torch_threads

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def hf_name(name: str) -> str:
    """Strip DDP / compile / checkpoint / FSDP wrapper prefixes so engines get plain HF names."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix) or f".{prefix}" in name:
                name = name.removeprefix(prefix).replace(f".{prefix}", ".")
                changed = True
    return name


class TokenLogprobModel(nn.Module):
    """Causal LM → per-token log-probs of the targets, with the LM head applied in chunks (see logprobs.py).

    DDP and FSDP2 wrap THIS module, so their hooks see the whole forward (body and chunked head)."""

    def __init__(self, lm: nn.Module, chunk_size: int):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B,T,H)
        return chunked_logprobs(hidden[:, :-1], self.lm.get_output_embeddings(), targets, self.chunk_size)


class Learner:
    """One rank. Every public method is called on ALL ranks of a group with that rank's shard."""

    def __init__(self, model_path: str, cfg: LearnerConfig, *, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int | None = None):
        from transformers import AutoModelForCausalLM

        self.cfg, self.rank, self.world_size, self.model_path = cfg, rank, world_size, model_path
        on_gpu = cfg.backend == "nccl"
        if on_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("learner.backend='nccl' needs CUDA; use 'gloo' on CPU")
            local_rank = int(os.environ.get("LOCAL_RANK", "0")) if "CUDA_VISIBLE_DEVICES" not in os.environ else 0
            self.device = torch.device(f"cuda:{local_rank}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            set_torch_threads(cfg.cpu_threads)
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)
        import numpy as np

        np.random.seed(cfg.seed + rank)
        self.distributed = world_size > 1 or cfg.strategy == "fsdp2"
        if self.distributed:
            if master_port is None and world_size > 1:
                raise ValueError("a distributed learner needs master_port (pick one with hygiene.free_port)")
            if master_port is None:   # FSDP2 on one rank still needs a (1-rank) process group
                from mosaic_ray.hygiene import free_port

                master_port = free_port(master_addr)
            dist.init_process_group(cfg.backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                    world_size=world_size, timeout=timedelta(minutes=10))
        lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(self.device)
        if cfg.activation_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.config.use_cache = False
        self.lm = lm
        self.pad_id = lm.config.pad_token_id if lm.config.pad_token_id is not None else 0
        self.reference: TokenLogprobModel | None = None
        if cfg.kl_coef > 0 or cfg.algorithm == "dpo":
            self.reset_reference()
        self.policy = TokenLogprobModel(lm, cfg.logprob_chunk_size)
        self.module = self._wrap(self.policy)
        self.optimizer = torch.optim.AdamW(self.lm.parameters(), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        warmup = cfg.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
        self.step = 0
        self._weight_group = None

    # ------------------------------------------------------------------------------------------ setup

    def _wrap(self, module: nn.Module) -> nn.Module:
        cfg = self.cfg
        if cfg.strategy == "fsdp2":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                                      reduce_dtype=torch.float32)
            for layer in self.lm.base_model.layers:
                fully_shard(layer, mp_policy=mp)
            fully_shard(module, mp_policy=mp)
            return module
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # broadcast_buffers=False: ranks may run different numbers of micro-batches (no per-forward collective).
            return DistributedDataParallel(module, device_ids=[self.device] if self.device.type == "cuda" else None,
                                           broadcast_buffers=False)
        return module

    def _autocast(self):
        if self.cfg.bf16 and self.device.type == "cuda" and self.cfg.strategy != "fsdp2":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _grad_sync(self, enabled: bool):
        """Accumulate locally on all but the last micro-batch (one gradient all-reduce per step)."""
        if self.cfg.strategy == "fsdp2":
            self.module.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if not enabled and hasattr(self.module, "no_sync"):
            return self.module.no_sync()
        return contextlib.nullcontext()

    def _all_reduce(self, values: list[float], op=None) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.tolist()

    def _micro_batches(self, units: list) -> list[MicroBatch]:
        """Pack, move to device; under FSDP2 pad every rank to the same count (each forward is collective)."""
        mbs = [mb.to(self.device) for mb in pack_micro_batches(units, self.cfg.micro_batch_tokens, self.pad_id)]
        if self.cfg.strategy == "fsdp2" and self.distributed:
            n_max = int(self._all_reduce([len(mbs)], dist.ReduceOp.MAX)[0])
            while len(mbs) < n_max:   # a no-op micro-batch: real forward/backward, zero loss
                mb = mbs[-1]
                mbs.append(MicroBatch(**{**mb.__dict__, "mask": torch.zeros_like(mb.mask), "num_tokens": 0}))
        return mbs

    # ------------------------------------------------------------------------------------------ verbs

    def update(self, units: list[PolicySample] | list[PreferencePair], algorithm: str | None = None,
               lr: float | None = None) -> dict[str, float]:
        """One optimizer step per epoch over this rank's shard (`epochs_per_iteration` epochs of RL / DPO; an SFT
        step is one epoch); returns metrics reduced over all ranks."""
        algorithm = algorithm or self.cfg.algorithm
        epochs = 1 if algorithm == "sft" else self.cfg.epochs_per_iteration
        loss_fn = get_loss(algorithm)
        validate_units(units, algorithm)
        t0 = time.perf_counter()
        mbs = self._micro_batches(units)
        needs_ref = algorithm == "dpo" or (self.cfg.kl_coef > 0 and algorithm != "sft")
        if needs_ref:
            for mb in mbs:
                if mb.ref_logp is None:
                    mb.ref_logp = self._reference_logprobs(mb)
        norm = self._all_reduce([sum(loss_norm(algorithm, mb.mask, self.cfg) for mb in mbs)])[0]
        loss_total, weight_total, grad_norm = 0.0, 0.0, 0.0
        sums: dict[str, float] = {}
        self.module.train()
        for _ in range(epochs):
            if lr is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            for i, mb in enumerate(mbs):
                with self._grad_sync(i == len(mbs) - 1), self._autocast():
                    logp, entropy = self.module(mb.input_ids, _attention(mb), mb.targets)
                    loss, metrics = loss_fn(logp, mb.old_logp, mb.adv, mb.mask, self.cfg, ref_logp=mb.ref_logp,
                                            entropy=entropy, norm=norm)
                    (loss * self.world_size).backward()
                w = float(mb.mask.sum())
                loss_total += float(loss.detach())
                weight_total += w
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v * w
            gn = torch.nn.utils.clip_grad_norm_(self.lm.parameters(), self.cfg.grad_clip)
            grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            self.optimizer.step()
            current_lr = self.optimizer.param_groups[0]["lr"]
            if lr is None:
                self.scheduler.step()
            else:   # an explicit lr (SFT warm start schedule) leaves the RL schedule where it was
                for group, base in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                    group["lr"] = base
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
        keys = sorted(sums)
        tokens = sum(mb.num_tokens for mb in mbs)
        red = self._all_reduce([loss_total, weight_total, float(tokens), float(len(units))] + [sums[k] for k in keys])
        elapsed = time.perf_counter() - t0
        out = {"learner/loss": red[0] / epochs, "learner/policy_tokens": red[1] / epochs, "learner/tokens": red[2],
               "learner/samples": red[3], "learner/grad_norm": grad_norm, "learner/lr": current_lr,
               "learner/step": float(self.step), "learner/update_s": elapsed,
               "learner/tokens_per_s": red[2] * epochs / max(elapsed, 1e-9)}
        for k, v in zip(keys, red[4:]):
            out[f"learner/{k}"] = v / max(red[1], 1.0)
        return out

    def sft_update(self, samples: list[PolicySample], lr: float | None = None) -> dict[str, float]:
        """Cross-entropy on assistant tokens; `lr` overrides the learning rate for this step only."""
        return self.update(samples, "sft", lr=lr)

    @torch.no_grad()
    def compute_logprobs(self, samples: list[PolicySample]) -> list[list[float]]:
        """Teacher-forced log-probs of each sample under the current policy, aligned with input_ids (0.0 first)."""
        return self._logprobs(self.module if self.cfg.strategy == "fsdp2" else self.policy, samples)

    def _logprobs(self, model: nn.Module, samples: list[PolicySample]) -> list[list[float]]:
        model.eval()
        out: list[list[float]] = []
        for s in samples:   # one row each: no padding, so values do not depend on batch composition
            mb = pack_micro_batches([s], 1 << 30, self.pad_id)[0].to(self.device)
            with self._autocast():
                logp, _ = model(mb.input_ids, None, mb.targets)
            out.append([0.0] + logp[0].float().cpu().tolist())
        return out

    @torch.no_grad()
    def _reference_logprobs(self, mb: MicroBatch) -> torch.Tensor:
        if self.reference is None:
            raise ValueError("samples carry no ref_logprobs and this learner keeps no reference model "
                             "(set learner.kl_coef > 0 or learner.algorithm='dpo', or pass ref_logprobs)")
        self.reference.eval()
        with self._autocast():
            logp, _ = self.reference(mb.input_ids, _attention(mb), mb.targets)
        return logp.float().detach()

    def reset_reference(self) -> None:
        """Freeze a copy of the current policy as the KL / DPO reference (e.g. after the warm start)."""
        weights = self.get_weights()
        if self.reference is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(self.model_path)
            ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            self.reference = TokenLogprobModel(ref, self.cfg.logprob_chunk_size).to(self.device)
        self.reference.lm.load_state_dict(weights, strict=False)
        self.reference.lm.tie_weights()
        self.reference.requires_grad_(False)

    def get_weights(self) -> dict[str, torch.Tensor]:
        """Full CPU state dict with plain HF names (tied lm_head omitted, as in save_pretrained); {} off rank 0
        under FSDP2 (the gather is collective: call on all ranks)."""
        if self.cfg.strategy == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = {k: v.detach().to("cpu", copy=True) for k, v in self.lm.state_dict().items()}
        if getattr(self.lm.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        return {hf_name(k): v for k, v in sd.items()}

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load HF-named weights (e.g. a warm-started policy) into this rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.lm, weights, options=StateDictOptions(full_state_dict=True, strict=False))

    def health(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "step": self.step, "device": str(self.device),
                "strategy": self.cfg.strategy, "pid": os.getpid(),
                "params": sum(p.numel() for p in self.lm.parameters())}

    # ---------------------------------------------------------------------------------- weight sync

    def init_weight_group(self, host: str, port: int, world_size: int) -> None:
        """Rank 0 joins the private learner→engines group as sender (blocks until the receivers join)."""
        from mosaic_ray.weight_transfer import WeightGroup

        if self.rank == 0:
            self._weight_group = WeightGroup.create(host, port, 0, world_size, backend=self.cfg.backend,
                                                    device=str(self.device))

    def broadcast_weights(self) -> dict[str, float]:
        """Send the current weights to every receiver (collective gather first under FSDP2)."""
        from mosaic_ray.weight_transfer import send_weights

        t0 = time.perf_counter()
        weights = self.get_weights()
        if self.rank != 0:
            return {}
        if self._weight_group is None:
            raise RuntimeError("broadcast_weights: call init_weight_group first")
        send_weights(self._weight_group, weights)
        return {"weight_sync/broadcast_s": time.perf_counter() - t0,
                "weight_sync/bytes": float(sum(t.numel() * t.element_size() for t in weights.values())),
                "weight_sync/version": float(self.step)}

    # ---------------------------------------------------------------------------------- checkpoints

    def save(self, uri: str) -> str:
        from mosaic_ray.learners.checkpoint import save_learner

        return save_learner(self, uri)

    def restore(self, uri: str) -> int:
        from mosaic_ray.learners.checkpoint import restore_learner

        return restore_learner(self, uri)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _attention(mb: MicroBatch) -> torch.Tensor | None:
    """None when nothing is padded: lets SDPA take its causal fast path."""
    return None if bool(mb.attention_mask.all()) else mb.attention_mask
