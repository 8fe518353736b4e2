"""Weight sync, learner → every engine, as `learner.weight_sync` picks it: bucket by bucket, versioned.

Both strategies stream the weights in buckets of at most `learner.sync_bucket_mb` (a single larger tensor travels
alone) and never build one blob of the model. Every engine drains, loads the buckets in place as they arrive, then
serves the new version (`Engine.begin_weight_update` / `load_weight_bucket` / `finish_weight_update`), so no
completion comes from a half-loaded model and an engine's extra memory is one bucket.

- `object_store`: the learner's rank 0 puts one bucket at a time into Ray's object store (a streaming generator, at
  most two buckets ahead); all engines load it, then its ref is dropped.
- `broadcast`: a private torch.distributed group, learner rank 0 → engines (gloo on CPU, NCCL on GPU), formed at the
  first sync and again whenever the engines pushed to change, one of them restarted (it lost its group), or a
  transfer failed.
"""

from __future__ import annotations

import time
from typing import Any

from mosaic_ray.config import LearnerConfig

__all__ = ["BroadcastSync", "ObjectStoreSync", "make_weight_sync"]


class ObjectStoreSync:
    """Buckets through the object store: begin on every engine, load each bucket ref on every engine, finish."""

    name = "object_store"

    def __init__(self, learner: Any, bucket_bytes: int):
        self.learner, self.bucket_bytes = learner, bucket_bytes

    def push(self, engines: list[Any], version: int) -> dict[str, float]:
        import ray

        t0 = time.perf_counter()
        meta = self.learner.weight_meta()
        ray.get([e.begin_weight_update.remote(version, meta) for e in engines])
        buckets, sent, largest = 0, 0, 0
        for ref in self.learner.weight_buckets(self.bucket_bytes):
            size = ray.get([e.load_weight_bucket.remote(ref) for e in engines])[0]
            buckets, sent, largest = buckets + 1, sent + size, max(largest, size)
            del ref   # the bucket's object is freed before the next one is loaded
        ray.get([e.finish_weight_update.remote(version) for e in engines])
        return {"weight_sync/seconds": time.perf_counter() - t0, "weight_sync/buckets": float(buckets),
                "weight_sync/bytes": float(sent), "weight_sync/largest_bucket_bytes": float(largest)}


class BroadcastSync:
    """Buckets by broadcast over a private process group (`mosaic_ray.weight_transfer`)."""

    name = "broadcast"

    def __init__(self, learner: Any, bucket_bytes: int, backend: str):
        self.learner, self.bucket_bytes, self.backend = learner, bucket_bytes, backend
        self._members: list[str] | None = None
        self._key: str | None = None

    def push(self, engines: list[Any], version: int) -> dict[str, float]:
        import ray

        t0 = time.perf_counter()
        members = [e._actor_id.hex() for e in engines]
        keys = set(ray.get([e.weight_group_key.remote() for e in engines]))
        if members != self._members or keys != {self._key}:   # other engines, or one restarted since the join
            self._join(engines)
            self._members = members
        receives = [e.receive_weights.remote(version) for e in engines]   # waiting receivers, before the send
        try:
            sent = self.learner.broadcast_weights(self.bucket_bytes)
            ray.get(receives)
        except Exception:
            self._members = None   # the group may be broken (a receiver died mid-transfer): form a new one next time
            raise
        return {"weight_sync/seconds": time.perf_counter() - t0, "weight_sync/bytes": sent["weight_sync/bytes"]}

    def _join(self, engines: list[Any]) -> None:
        import ray

        host, port = self.learner.sync_address()
        world = 1 + len(engines)
        joins = [e.init_weight_group.remote(host, port, world, rank, self.backend)
                 for rank, e in enumerate(engines, start=1)]
        self.learner.init_weight_group(host, port, world)
        ray.get(joins)
        self._key = f"{host}:{port}"


def make_weight_sync(cfg: LearnerConfig, learner: Any) -> ObjectStoreSync | BroadcastSync:
    """The strategy `learner.weight_sync` names, over `learner` (a LearnerGroup)."""
    bucket_bytes = cfg.sync_bucket_mb << 20
    if cfg.weight_sync == "broadcast":
        return BroadcastSync(learner, bucket_bytes, cfg.backend)
    return ObjectStoreSync(learner, bucket_bytes)
