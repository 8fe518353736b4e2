"""LearnerGroup: N learner ranks behind one set of verbs (RLlib's LearnerGroup shape, plain Ray actors).

`num_learners=0` runs one in-process `Learner` (tests, notebooks); `num_learners=N` starts N Ray actors that
join one `torch.distributed` group (gloo on CPU, NCCL on GPU) on a free port of rank 0's node — the measured
best fit (feasibility-model §3: lowest overhead, explicit sync; Ray Train costs ~22 s per fit, RLlib has no
gradient accumulation). The driver calls the group as if it were one process: every verb splits the global
batch over ranks, calls all of them, and returns ONE value of ONE type.

A rank that dies never hangs the others: every verb waits on the ranks one result at a time, and the first rank
lost (its actor or node died) tears the whole group down at once (the survivors would otherwise sit in a
collective until its timeout) and raises `LearnerFailure`. `reform(checkpoint)` then starts a new group from a
checkpoint; the driver retries the step on it, or stops with the error (see `mosaic_ray.driver.train`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
from mosaic_ray.actors.resources import actor_options, in_bundle, reserve
from mosaic_ray.learners.checkpoint import MAX_SHARD_BYTES
from mosaic_ray.learners.learner import Learner

from mosaic_ray.algorithms.batch import IterationData, PolicySample, PreferencePair, shard, validate_units
from mosaic_ray.config import LearnerConfig, MosaicConfig
from mosaic_ray.weight_transfer import Meta, PackedBucket

__all__ = ["LearnerFailure", "LearnerGroup"]


PEER_DEATH_GRACE_S = 10.0
"""How long a failed collective waits for Ray to report the peer whose death caused it."""


class LearnerFailure(RuntimeError):
    """A learner rank died; the group was torn down (`LearnerGroup.reform` starts a new one)."""


class _LearnerActor:
    """Process shell for one rank: `setup` builds the Learner after rank 0's address is known; every other method
    is one of the Learner's verbs, with its signature, which `LearnerGroup` calls as `actor.<verb>.remote(...)`."""

    def address(self) -> tuple[str, int]:
        import ray

        from mosaic_ray.hygiene import free_port

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def setup(self, model_path: str, cfg: LearnerConfig, rank: int, world_size: int, addr: str, port: int,
              cache_dir: str | None = None, chat_template: str | None = None) -> int:
        """`model_path` is a model source, resolved on this rank's node (`mosaic_ray.models.source`)."""
        from mosaic_ray.models.source import resolve_model

        self.learner = Learner(resolve_model(model_path, cache_dir), cfg, rank=rank, world_size=world_size,
                               master_addr=addr, master_port=port, chat_template=chat_template)
        return os.getpid()

    def update(self, units: list[PolicySample] | list[PreferencePair], algorithm: str | None = None,
               lr: float | None = None) -> dict[str, float]:
        return self.learner.update(units, algorithm, lr)

    def update_iteration(self, data: IterationData, algorithm: str | None = None) -> dict[str, float]:
        return self.learner.update_iteration(data, algorithm)

    def sft_update(self, samples: list[PolicySample], lr: float | None = None) -> dict[str, float]:
        return self.learner.sft_update(samples, lr)

    def compute_logprobs(self, samples: list[PolicySample]) -> list[list[float]]:
        return self.learner.compute_logprobs(samples)

    def get_weights(self) -> dict[str, torch.Tensor]:
        return self.learner.get_weights()

    def reference_weights(self, every_rank: bool = False) -> dict[str, torch.Tensor]:
        return self.learner.reference_weights(every_rank)

    def weight_meta(self, *, as_stored: bool = False) -> Meta:
        return self.learner.weight_meta(as_stored=as_stored)

    def iter_packed_buckets(self, bucket_bytes: int) -> Iterator[PackedBucket]:
        """Called with `num_returns="streaming"`, a Ray streaming generator: each bucket becomes one object."""
        yield from self.learner.iter_packed_buckets(bucket_bytes)

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.learner.set_weights(weights)

    def reset_reference(self) -> None:
        self.learner.reset_reference()

    def init_weight_group(self, host: str, port: int, world_size: int) -> None:
        self.learner.init_weight_group(host, port, world_size)

    def broadcast_weights(self, bucket_bytes: int | None = None) -> dict[str, float]:
        return self.learner.broadcast_weights(bucket_bytes)

    def save(self, uri: str, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
        return self.learner.save(uri, max_shard_bytes=max_shard_bytes)

    def restore(self, uri: str) -> int:
        return self.learner.restore(uri)

    def health(self) -> dict[str, Any]:
        return self.learner.health()


class LearnerGroup:
    """update / sft_update → metrics dict; get_weights → HF-named tensors; weight_buckets → ObjectRefs of buckets
    (object-store sync); init_weight_group / broadcast_weights → broadcast sync; save / restore; health."""

    def __init__(self, model_path: str, cfg: LearnerConfig, *, cache_dir: str | None = None,
                 chat_template: str | None = None):
        """`model_path`: a model source (a directory, `s3://`, `pkg:`, `builtin:` or a Hub id) that every rank
        resolves on its own node into `cache_dir` (`mosaic_ray.models.source`); `chat_template`:
        `model.chat_template`, which every checkpoint's tokenizer carries."""
        self.cfg = cfg
        self.model_path = model_path
        self.cache_dir = cache_dir
        self.chat_template = chat_template
        self._local: Learner | None = None
        self._actors: list[Any] = []
        self._pg: Any = None
        """The ranks' placement group (removed at shutdown)."""
        self.reforms = 0
        """How many times the group was re-formed after a lost rank."""
        if cfg.num_learners == 0:
            from mosaic_ray.models.source import resolve_model

            self._local = Learner(resolve_model(model_path, cache_dir), replace(cfg, num_learners=0),
                                  chat_template=chat_template)
            return
        self._start()

    def _start(self) -> None:
        import ray

        cfg, model_path = self.cfg, self.model_path

        # one bundle per rank in a placement group (learner node resource where advertised); a cluster that can
        # never hold them fails here, naming what is missing
        options = actor_options("learner", MosaicConfig(learner=cfg))
        options["num_gpus"] = options["num_gpus"] if cfg.backend == "nccl" else 0
        self._release_placement()
        self._pg = reserve("learner", options, cfg.num_learners, strategy=cfg.placement_strategy,
                           timeout_s=cfg.placement_timeout_s)
        options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}
        actor_cls = ray.remote(_LearnerActor)
        self._actors = [actor_cls.options(**options, **in_bundle(self._pg, r)).remote()
                        for r in range(cfg.num_learners)]
        addr, port = ray.get(self._actors[0].address.remote())
        self.pids = ray.get([a.setup.remote(model_path, cfg, r, cfg.num_learners, addr, port, self.cache_dir,
                                            self.chat_template)
                             for r, a in enumerate(self._actors)])

    @property
    def world_size(self) -> int:
        return max(1, len(self._actors))

    # ----------------------------------------------------------------------------------------- dispatch

    def _all(self, verb: Callable[[Any], Callable[..., Any]], per_rank_args: list[tuple] | None = None,
             **kwargs: Any) -> list[Any]:
        """Call one verb on every rank (rank r gets per_rank_args[r]); results in rank order.

        `verb` picks the method off a rank, e.g. `lambda a: a.update`: off the in-process `Learner` (num_learners=0)
        it runs at once; off a `_LearnerActor` handle, which has the same verbs, it runs `.remote` (`_gather`)."""
        if self._local is not None:
            args = per_rank_args[0] if per_rank_args else ()
            return [verb(self._local)(*args, **kwargs)]
        if not self._actors:
            raise LearnerFailure("the learner group was torn down after a lost rank; reform() it first")
        refs = [verb(a).remote(*(per_rank_args[r] if per_rank_args else ()), **kwargs)
                for r, a in enumerate(self._actors)]
        return self._gather(refs, verb(_LearnerActor).__name__)   # picked off the class, the verb is a function

    def _gather(self, refs: list[Any], what: str) -> list[Any]:
        """Results of one call per rank; the first rank lost tears the group down (`LearnerFailure`)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except RayActorError as exc:
                self._fail(refs.index(ready[0]), what, exc)
            except RayTaskError:
                # A survivor whose collective peer died fails with a transport error ("Connection reset by peer")
                # before Ray reports the dead peer: name the lost rank when there is one, else it is a real error.
                lost = self._lost_rank(refs)
                if lost is not None:
                    rank, exc = lost
                    self._fail(rank, what, exc)
                raise
        return ray.get(refs)

    @staticmethod
    def _lost_rank(refs: list[Any]) -> tuple[int, BaseException] | None:
        """The first rank whose call ends in `RayActorError` within `PEER_DEATH_GRACE_S`, with that error."""
        import ray
        from ray.exceptions import RayActorError

        done, _ = ray.wait(refs, num_returns=len(refs), timeout=PEER_DEATH_GRACE_S)
        for rank, ref in enumerate(refs):
            if ref not in done:
                continue
            try:
                ray.get(ref)
            except RayActorError as exc:
                return rank, exc
            except Exception:  # noqa: BLE001, S110 - only a dead actor counts here; other errors are the caller's
                pass
        return None

    def _fail(self, rank: int, what: str, exc: BaseException) -> None:
        import ray

        for a in self._actors:  # the survivors may be blocked in a collective with the lost rank
            ray.kill(a, no_restart=True)
        self._actors = []
        why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise LearnerFailure(f"learner rank {rank} was lost during {what} ({why}); the group was torn down") from exc

    def reform(self, checkpoint_uri: str) -> int:
        """Start a new group (every rank) and restore it from `checkpoint_uri`; returns the restored step."""
        import ray

        for a in self._actors:
            ray.kill(a, no_restart=True)
        self._actors = []
        self._start()
        self.reforms += 1
        return self.restore(checkpoint_uri)

    # --------------------------------------------------------------------------------------------- verbs

    def update(self, samples: list[PolicySample] | list[PreferencePair], *, algorithm: str | None = None) -> dict:
        """One update on the global batch (split over ranks); metrics reduced over ranks."""
        validate_units(samples, algorithm or self.cfg.algorithm)
        shards = shard(samples, self.world_size)
        return self._all(lambda a: a.update, [(s, algorithm) for s in shards])[0]

    def update_iteration(self, data: IterationData, *, algorithm: str | None = None) -> dict:
        """One update on the committed groups `data` names, which every rank reads from the run's storage itself
        (`Learner.update_iteration`): the caller sends the control message, never the samples."""
        return self._all(lambda a: a.update_iteration, [(data, algorithm)] * self.world_size)[0]

    def sft_update(self, samples: list[PolicySample], *, lr: float | None = None) -> dict:
        """One SFT step (loss on assistant tokens); `lr` overrides the learning rate for this step."""
        validate_units(samples, "sft")
        shards = shard(samples, self.world_size)
        return self._all(lambda a: a.sft_update, [(s, lr) for s in shards])[0]

    def compute_logprobs(self, samples: list[PolicySample]) -> list[list[float]]:
        """Current-policy log-probs per sample (aligned with input_ids), in input order."""
        w = self.world_size
        if self.cfg.strategy != "fsdp2" or w == 1:
            return self._all(lambda a: a.compute_logprobs, [(samples,)] + [([],)] * (w - 1))[0]
        chunks = [samples[r::w] for r in range(w)]   # every rank runs the same number of forwards ± 1
        if len(samples) % w:
            chunks = [c + c[:1] * (len(chunks[0]) - len(c)) for c in chunks]
        parts = self._all(lambda a: a.compute_logprobs, [(c,) for c in chunks])
        out: list[list[float]] = [[] for _ in samples]
        for r, part in enumerate(parts):
            for j, lp in enumerate(part[: len(samples[r::w])]):
                out[r + j * w] = lp
        return out

    def get_weights(self) -> dict[str, torch.Tensor]:
        """Full CPU weights with plain HF names (rank 0's)."""
        return self._all(lambda a: a.get_weights)[0]

    def weight_meta(self) -> list[tuple[str, tuple[int, ...], str]]:
        """`(name, shape, dtype)` of every tensor a weight sync sends, in order (`Learner.weight_meta`)."""
        return self._all(lambda a: a.weight_meta)[0]

    def weight_buckets(self, bucket_bytes: int) -> Iterator[Any]:
        """The weights as ObjectRefs of buckets (`PackedBucket`s: one flat buffer each, at most `bucket_bytes` but
        for a larger single tensor), produced one at a time: rank 0 runs at most two buckets ahead of the consumer, and
        a bucket's object is freed once the caller drops its ref. Every rank takes part (FSDP2 gathers)."""
        import ray

        if self._local is not None:
            for bucket in self._local.iter_packed_buckets(bucket_bytes):
                yield ray.put(bucket)
                del bucket
            return
        from ray.exceptions import RayActorError

        if not self._actors:
            raise LearnerFailure("the learner group was torn down after a lost rank; reform() it first")
        gens = [a.iter_packed_buckets.options(num_returns="streaming", _generator_backpressure_num_objects=2)
                .remote(bucket_bytes) for a in self._actors]
        rank = 0
        try:
            yield from gens[0]
            for rank, gen in enumerate(gens[1:], start=1):   # the other ranks yield nothing; this waits for them
                for ref in gen:                                # and surfaces their errors
                    ray.get(ref)
        except RayActorError as exc:
            self._fail(rank, "weight_buckets", exc)

    def sync_address(self) -> tuple[str, int]:
        """(host, free port) on rank 0's node, where the broadcast weight group's store listens."""
        if self._local is not None:
            from mosaic_ray.hygiene import free_port

            return "127.0.0.1", free_port()
        import ray

        return ray.get(self._actors[0].address.remote())

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self._all(lambda a: a.set_weights, [(weights,)] * self.world_size)

    def reset_reference(self) -> None:
        """Freeze the current policy as the KL / DPO reference on every rank."""
        self._all(lambda a: a.reset_reference)

    def init_weight_group(self, host: str, port: int, world_size: int) -> None:
        """Join the private sync group as rank 0. Launch the receivers' joins (non-blocking) BEFORE this call."""
        self._all(lambda a: a.init_weight_group, [(host, port, world_size)] * self.world_size)

    def broadcast_weights(self, bucket_bytes: int | None = None) -> dict[str, float]:
        """Send weights to all receivers in buckets of `bucket_bytes` (default `sync_bucket_mb`). Launch the
        receivers' `receive_weights` BEFORE this call."""
        return self._all(lambda a: a.broadcast_weights, [(bucket_bytes,)] * self.world_size)[0]

    def save(self, uri: str, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
        """Checkpoint every rank's state to `uri`; weights above `max_shard_bytes` are written as shards + index."""
        return self._all(lambda a: a.save, [(uri,)] * self.world_size, max_shard_bytes=max_shard_bytes)[0]

    def restore(self, uri: str) -> int:
        """Restore model, optimizer, scheduler, step and RNG on every rank; returns the step."""
        return self._all(lambda a: a.restore, [(uri,)] * self.world_size)[0]

    def health(self) -> list[dict[str, Any]]:
        return self._all(lambda a: a.health)

    def shutdown(self) -> None:
        """Tear down the process group and end the actors this group started."""
        if self._local is not None:
            self._local.close()
            return
        import ray

        for a in self._actors:
            ray.kill(a)
        self._actors = []
        self._release_placement()

    def _release_placement(self) -> None:
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
            self._pg = None
