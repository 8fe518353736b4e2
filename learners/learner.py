"""One learner rank: model, optimizer, micro-batched updates, weights out, checkpoints. No Ray here.

A `Learner` is used in-process (`LearnerGroup(num_learners=0)`) or inside a Ray actor, one per rank, joined in a
`torch.distributed` group (gloo on CPU, NCCL on GPU). DDP for small models, FSDP2 (`fully_shard` per decoder
layer + root) for large ones, where AdamW state must shard.

Memory under FSDP2: the model is built on the meta device and sharded before anything is allocated, then each
rank reads only its own rows of each tensor from the safetensors files (`load_sharded`): no rank ever holds the
whole model. The sharded fp32 parameters are the optimizer's master weights; with `bf16` FSDP2 gathers them in
bf16. The KL / DPO reference is a second, frozen model sharded exactly like the policy and kept in the training
dtype; `reset_reference` copies each rank's policy shards into it (every rank, no communication). Weights leave
the learner in buckets (`iter_weight_buckets`: one gathered tensor at a time, at most one bucket held), for the
driver's weight sync and for checkpoints.

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
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from mosaic_ray.learners.checkpoint import MAX_SHARD_BYTES, restore_learner, save_learner
from torch import nn

from mosaic_ray.algorithms import get_loss, loss_norm
from mosaic_ray.algorithms.batch import (
    IterationData,
    MicroBatch,
    PolicySample,
    PreferencePair,
    iteration_batch,
    pack_micro_batches,
    shard,
    validate_units,
)
from mosaic_ray.algorithms.logprobs import chunked_logprobs
from mosaic_ray.config import LearnerConfig
from mosaic_ray.hygiene import set_torch_threads
from mosaic_ray.weight_transfer import Meta, PackedBucket

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
                 master_addr: str = "127.0.0.1", master_port: int | None = None, chat_template: str | None = None):
        """`chat_template`: `model.chat_template`, set on the tokenizer every checkpoint carries."""
        self.cfg, self.rank, self.world_size, self.model_path = cfg, rank, world_size, model_path
        self.chat_template = chat_template
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
        self.fsdp = cfg.strategy == "fsdp2"
        self.distributed = world_size > 1 or self.fsdp
        if self.distributed:
            if master_port is None and world_size > 1:
                raise ValueError("a distributed learner needs master_port (pick one with hygiene.free_port)")
            if master_port is None:   # FSDP2 on one rank still needs a (1-rank) process group
                from mosaic_ray.hygiene import free_port

                master_port = free_port(master_addr)
            dist.init_process_group(cfg.backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                    world_size=world_size, timeout=timedelta(minutes=10))
        self.train_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        """bf16 runs: FSDP2 gathers parameters and keeps the reference in bf16; the sharded fp32 parameters are the
        optimizer's master weights (`plan.py` counts memory the same way)."""
        self.policy = self._build(torch.float32, trainable=True)
        self.lm = self.policy.lm
        self.pad_id = self.lm.config.pad_token_id if self.lm.config.pad_token_id is not None else 0
        self.reference: TokenLogprobModel | None = None
        if cfg.kl_coef > 0 or cfg.algorithm == "dpo":
            self.reset_reference()
        self.module = self.policy if self.fsdp else self._wrap_ddp(self.policy)
        self.optimizer = torch.optim.AdamW(self.lm.parameters(), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        warmup = cfg.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
        self.step = 0
        self._weight_group = None

    # ------------------------------------------------------------------------------------------ setup

    def _build(self, dtype: torch.dtype, *, trainable: bool) -> TokenLogprobModel:
        """The model, its parameters first made on the meta device, then materialised where they live: under FSDP2
        each rank allocates only its shards (`fully_shard` before `to_empty`), so no rank ever holds the whole
        model. The policy (`trainable`) then reads its shards from the checkpoint files (`load_sharded`); the
        reference stays empty until `reset_reference` copies the policy's shards into it."""
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.model_path), dtype=dtype)
        lm.config.use_cache = False
        if trainable and self.cfg.activation_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = TokenLogprobModel(lm, self.cfg.logprob_chunk_size)
        if self.fsdp:
            self._shard(model, trainable)
        model.to_empty(device=self.device)
        lm.tie_weights()   # to_empty gives each module a new tensor; FSDP2 keeps ties itself, plain modules do not
        for module in lm.modules():   # non-persistent buffers (rotary frequencies) come from the config, not files
            if module._non_persistent_buffers_set:
                lm._init_weights(module)
        if trainable:
            load_sharded(lm, self.model_path)
        else:
            model.requires_grad_(False)
        return model

    def _shard(self, model: TokenLogprobModel, trainable: bool) -> None:
        """FSDP2: one group per decoder layer + the root (embeddings, final norm, LM head). The policy gathers its
        fp32 shards in the training dtype and reduces gradients in fp32; the frozen reference is stored in the
        training dtype already. Policy and reference shard identically (same modules, same mesh)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=self.train_dtype, reduce_dtype=torch.float32) if trainable
              else MixedPrecisionPolicy())
        for layer in model.lm.base_model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)

    def _wrap_ddp(self, module: nn.Module) -> nn.Module:
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # broadcast_buffers=False: ranks may run different numbers of micro-batches (no per-forward collective).
            return DistributedDataParallel(module, device_ids=[self.device] if self.device.type == "cuda" else None,
                                           broadcast_buffers=False)
        return module

    def _autocast(self):
        if self.cfg.bf16 and self.device.type == "cuda" and not self.fsdp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _grad_sync(self, enabled: bool):
        """Accumulate locally on all but the last micro-batch (one gradient all-reduce per step)."""
        if self.fsdp:
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
        if self.fsdp and self.distributed:
            n_max = int(self._all_reduce([len(mbs)], dist.ReduceOp.MAX)[0])
            while len(mbs) < n_max:   # a no-op micro-batch: real forward/backward, zero loss
                mb = mbs[-1]
                mbs.append(MicroBatch(**{**mb.__dict__, "mask": torch.zeros_like(mb.mask), "num_tokens": 0}))
        return mbs

    # ------------------------------------------------------------------------------------------ verbs

    def update_iteration(self, data: IterationData, algorithm: str | None = None) -> dict[str, float]:
        """One update on an iteration's committed groups, read from the run's storage by this rank itself: every
        rank reads the groups' rows, builds the same global batch and keeps its own share (`shard`). Returns the
        update's metrics and the batch's (`iteration_batch`); no update when no group carries a signal."""
        samples, metrics = iteration_batch(data)
        if not samples:
            return metrics
        return {**metrics, **self.update(shard(samples, self.world_size)[self.rank], algorithm)}

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
        return self._logprobs(self.module if self.fsdp else self.policy, samples)

    def _logprobs(self, model: nn.Module, samples: list[PolicySample]) -> list[list[float]]:
        model.eval()
        out: list[list[float]] = []
        for s in samples:   # one row each: no padding, so values do not depend on batch composition
            mb = pack_micro_batches([s], 1 << 30, self.pad_id)[0].to(self.device)
            with self._autocast():
                logp, _ = model(mb.input_ids, None, mb.targets)
            out.append([0.0] + logp[0].float().cpu().tolist())
        self._reshard(model)
        return out

    def _reshard(self, model: nn.Module) -> None:
        """FSDP2 keeps the root's parameters (embeddings, LM head) gathered after a forward, expecting a backward;
        a forward without one frees them here, so a rank holds only its shards between calls."""
        if self.fsdp:
            model.reshard()

    @torch.no_grad()
    def _reference_logprobs(self, mb: MicroBatch) -> torch.Tensor:
        if self.reference is None:
            raise ValueError("samples carry no ref_logprobs and this learner keeps no reference model "
                             "(set learner.kl_coef > 0 or learner.algorithm='dpo', or pass ref_logprobs)")
        self.reference.eval()
        with self._autocast():
            logp, _ = self.reference(mb.input_ids, _attention(mb), mb.targets)
        self._reshard(self.reference)
        return logp.float().detach()

    @torch.no_grad()
    def reset_reference(self) -> None:
        """Freeze a copy of the current policy as the KL / DPO reference (e.g. after the warm start), on every rank.

        Each rank copies its own shards: the reference is sharded exactly like the policy (FSDP2) and kept in the
        training dtype, so this needs no communication and never holds the whole model."""
        if self.reference is None:
            self.reference = self._build(self.train_dtype, trainable=False)
        ref, pol = self.reference.lm.named_parameters(), self.lm.named_parameters()
        for (name, dst), (src_name, src) in zip(ref, pol, strict=True):
            if name != src_name:
                raise RuntimeError(f"reset_reference: reference parameter {name} faces policy parameter {src_name}")
            _local(dst).copy_(_local(src))

    def load_reference(self, weights: dict[str, torch.Tensor]) -> None:
        """Load full HF-named weights (a checkpoint's reference) into this rank's reference shards."""
        if self.reference is None:
            self.reference = self._build(self.train_dtype, trainable=False)
        load_sharded(self.reference.lm, weights)

    def weight_meta(self, *, as_stored: bool = False) -> Meta:
        """`(HF name, full shape, dtype)` of every tensor a sync sends, in order: floating tensors in the training
        dtype (bf16 runs send bf16), or as stored with `as_stored` (the fp32 master weights). Local: no collective."""
        return [(name, tuple(t.shape), str(t.dtype if as_stored or not t.is_floating_point()
                                           else self.train_dtype).removeprefix("torch."))
                for name, t in self._named_weights(self.lm)]

    def iter_weight_buckets(self, bucket_bytes: int, device: str | torch.device = "cpu", *, as_stored: bool = False,
                            every_rank: bool = False, reference: bool = False
                            ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The policy's (or the reference's) full weights in buckets cut by `bucket_indices(weight_meta(), ...)`.

        Collective under FSDP2: every rank iterates to the end, gathering one tensor at a time in step. Rank 0 (or
        every rank with `every_rank`) yields each bucket of full tensors on `device`; the other ranks yield
        nothing. So a rank holds at most one bucket, never the whole model."""
        from torch.distributed.tensor import DTensor

        from mosaic_ray.weight_transfer import bucket_indices, dtype_of

        lm = self.reference.lm if reference else self.lm
        named, meta = self._named_weights(lm), self.weight_meta(as_stored=as_stored)
        keep = every_rank or self.rank == 0
        for idx in bucket_indices(meta, bucket_bytes):
            bucket = []
            for i in idx:
                name, t = named[i]
                full = t.full_tensor() if isinstance(t, DTensor) else t
                if keep:
                    dtype = full.dtype if as_stored else dtype_of(meta[i][2])
                    # a sync serialises or flattens each bucket at once, so it may alias the parameter (no copy);
                    # get_weights hands its tensors out, so it copies what is not a fresh gather already
                    copy = as_stored and not isinstance(t, DTensor)
                    bucket.append((name, full.detach().to(device, dtype, copy=copy)))
                del full
            if keep:
                yield bucket

    def iter_packed_buckets(self, bucket_bytes: int) -> Iterator[PackedBucket]:
        """`iter_weight_buckets` in the sync dtype, each bucket as one flat buffer (the object-store sync's unit)."""
        from mosaic_ray.weight_transfer import pack_bucket

        for bucket in self.iter_weight_buckets(bucket_bytes):
            yield pack_bucket(bucket)

    def get_weights(self) -> dict[str, torch.Tensor]:
        """Full CPU weights as stored (fp32 master weights) with plain HF names (tied lm_head omitted, as in
        save_pretrained); {} off rank 0 (under FSDP2 the gather is collective: call on all ranks)."""
        return {n: t for bucket in self.iter_weight_buckets(1 << 62, as_stored=True) for n, t in bucket}

    def reference_weights(self, every_rank: bool = False) -> dict[str, torch.Tensor]:
        """Full CPU weights of the KL / DPO reference, in its dtype (collective under FSDP2); {} off rank 0 unless
        `every_rank`."""
        if self.reference is None:
            raise ValueError("reference_weights: this learner keeps no reference (learner.kl_coef is 0 and the "
                             "algorithm is not dpo)")
        buckets = self.iter_weight_buckets(1 << 62, as_stored=True, every_rank=every_rank, reference=True)
        return {n: t for b in buckets for n, t in b}

    def _named_weights(self, lm: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """Parameters and persistent buffers by plain HF name (DTensors under FSDP2); a tied LM head is omitted."""
        sd = lm.state_dict()
        if getattr(lm.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        return [(hf_name(k), v) for k, v in sd.items()]

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load full HF-named weights (e.g. a warm-started policy) into this rank's shards."""
        load_sharded(self.lm, weights)

    def health(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "step": self.step, "device": str(self.device),
                "strategy": self.cfg.strategy, "pid": os.getpid(),
                "params": sum(p.numel() for p in self.lm.parameters()), **self.memory()}

    def memory(self) -> dict[str, float]:
        """Bytes this rank holds: its parameter and reference shards, and the process's peak (RSS on CPU, CUDA
        allocator peak on GPU)."""
        import resource

        def local_bytes(module: nn.Module | None) -> int:
            return 0 if module is None else sum(_local(p).numel() * p.element_size() for p in module.parameters())

        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return {"param_bytes": float(local_bytes(self.lm)), "reference_bytes": float(local_bytes(self.reference)),
                "peak_bytes": float(peak)}

    # ---------------------------------------------------------------------------------- weight sync

    def init_weight_group(self, host: str, port: int, world_size: int) -> None:
        """Rank 0 joins the private learner→engines group as sender (blocks until the receivers join)."""
        from mosaic_ray.weight_transfer import WeightGroup

        if self.rank == 0:
            self._weight_group = WeightGroup.create(host, port, 0, world_size, backend=self.cfg.backend,
                                                    device=str(self.device))

    def broadcast_weights(self, bucket_bytes: int | None = None) -> dict[str, float]:
        """Send the current weights to every receiver, bucket by bucket as they are gathered (`bucket_bytes`, default
        `sync_bucket_mb`). Collective under FSDP2: call on all ranks; rank 0 returns the metrics, the others {}."""
        from mosaic_ray.weight_transfer import send_buckets

        if self.rank == 0 and self._weight_group is None:
            raise RuntimeError("broadcast_weights: call init_weight_group first")
        t0 = time.perf_counter()
        bucket_bytes = bucket_bytes or self.cfg.sync_bucket_mb << 20
        device = self._weight_group.device if self.rank == 0 else self.device
        buckets = ([t for _, t in b] for b in self.iter_weight_buckets(bucket_bytes, device))
        if self.rank != 0:
            for _ in buckets:   # run the gathers in step with rank 0
                pass
            return {}
        sent = send_buckets(self._weight_group, self.weight_meta(), buckets, bucket_bytes=bucket_bytes)
        return {"weight_sync/broadcast_s": time.perf_counter() - t0, "weight_sync/bytes": float(sent)}

    # ---------------------------------------------------------------------------------- checkpoints

    def save(self, uri: str, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
        """Collective: write a checkpoint (an HF model directory + `trainer_state/`, see `checkpoint.py`)."""
        return save_learner(self, uri, max_shard_bytes=max_shard_bytes)

    def restore(self, uri: str) -> int:
        return restore_learner(self, uri)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing it writes the parameter), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def checkpoint_files(model_path: str) -> dict[str, str]:
    """HF tensor name → safetensors file of a model directory (`model.safetensors` or a sharded index)."""
    import json

    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(model_path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(model_path, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise FileNotFoundError(f"model {model_path}: no model.safetensors or model.safetensors.index.json (the learner "
                            f"reads safetensors shard by shard; re-save the model with save_pretrained)")


@torch.no_grad()
def load_sharded(lm: nn.Module, source: str | dict[str, torch.Tensor]) -> None:
    """Fill `lm`'s parameters and persistent buffers (this rank's shards under FSDP2) from a model directory's
    safetensors files or from a dict of full tensors, by HF name. From files, each rank reads only the rows of its
    own dim-0 shards (memory-mapped `get_slice`), so loading never holds a full tensor, let alone the model.
    A tied LM head shares the embedding's parameter; every other name must be present."""
    import contextlib as ctx

    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, Shard

    files = checkpoint_files(source) if isinstance(source, str) else None
    persistent = [(f"{mod}.{b}" if mod else b, buf) for mod, m in lm.named_modules()
                  for b, buf in m.named_buffers(recurse=False) if b not in m._non_persistent_buffers_set]
    with ctx.ExitStack() as stack:
        handles: dict[str, Any] = {}
        for name, t in [*lm.named_parameters(), *persistent]:
            if name not in (files if files is not None else source):
                where = source if isinstance(source, str) else "the given weights"
                raise KeyError(f"{where}: no tensor {name!r} for the model's parameter of that name")
            rows = None
            if isinstance(t, DTensor):
                if tuple(t.placements) != (Shard(0),):
                    raise ValueError(f"{name}: expected FSDP2's dim-0 sharding, got {t.placements}")
                chunk = -(-t.shape[0] // t.device_mesh.size())
                start = t.device_mesh.get_local_rank() * chunk
                rows = slice(start, start + _local(t).shape[0])
            if files is not None:
                path = files[name]
                if path not in handles:
                    handles[path] = stack.enter_context(safe_open(path, framework="pt"))
                view = handles[path].get_slice(name)
                src = view[rows] if rows is not None else view[:]
            else:
                src = source[name][rows] if rows is not None else source[name]
            if tuple(src.shape) != tuple(_local(t).shape):
                raise ValueError(f"{name}: source shape {tuple(src.shape)} does not fit the model's "
                                 f"{tuple(_local(t).shape)}")
            _local(t).copy_(src)


def _attention(mb: MicroBatch) -> torch.Tensor | None:
    """None when nothing is padded: lets SDPA take its causal fast path."""
    return None if bool(mb.attention_mask.all()) else mb.attention_mask
