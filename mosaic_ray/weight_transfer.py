"""Broadcast weight sync learner → engines over a private torch.distributed group (no Ray here).

The learner's rank 0 is the sender (rank 0 of this group), every engine is a receiver. The group is built from a
TCPStore on a loopback/free port that the driver picks, so it never touches the learners' own training group.
Backend: gloo on CPU, NCCL on GPU (the same pattern vLLM's weight-transfer engine uses).

A transfer is: the sender publishes the ordered metadata `[(name, shape, dtype), …]` in the store under the
transfer's sequence number, then broadcasts the tensors in dtype buckets (one flat buffer per bucket, fewer and
larger messages than one call per tensor). Receivers read the metadata (or take it as an argument), allocate
buffers, receive, and split. Names are plain HF parameter names, as engines' `update_weights` expects.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_BUCKET_BYTES = 256 << 20
Meta = list[tuple[str, tuple[int, ...], str]]


@dataclass
class WeightGroup:
    """A private sender/receivers process group. Rank 0 sends; build with `WeightGroup.create`."""

    store: dist.Store
    pg: object
    rank: int
    world_size: int
    device: torch.device
    seq: int = 0

    @classmethod
    def create(cls, host: str, port: int, rank: int, world_size: int, *, backend: str = "gloo",
               device: str | torch.device | None = None, timeout_s: float = 300.0) -> WeightGroup:
        """Join the group: rank 0 hosts the TCPStore. Blocks until all `world_size` ranks have joined."""
        if not 0 <= rank < world_size:
            raise ValueError(f"weight group: rank {rank} outside [0, {world_size})")
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout, wait_for_workers=False)
        store = dist.PrefixStore("mosaic_weights", store)
        if backend == "gloo":
            pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
            dev = torch.device("cpu")
        elif backend == "nccl":
            if not torch.cuda.is_available():
                raise RuntimeError("weight group: backend 'nccl' needs a CUDA device; use 'gloo' on CPU")
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
            dev = torch.device(device or f"cuda:{torch.cuda.current_device()}")
        else:
            raise ValueError(f"weight group backend {backend!r}: expected 'gloo' or 'nccl'")
        return cls(store=store, pg=pg, rank=rank, world_size=world_size, device=torch.device(device or dev))


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"weight metadata: unknown dtype {name!r}")
    return dtype


def _buckets(meta: Meta, bucket_bytes: int) -> list[list[int]]:
    """Consecutive indices of the same dtype, each bucket ≤ bucket_bytes (a larger tensor gets its own)."""
    out: list[list[int]] = []
    size, dtype = 0, None
    for i, (_, shape, dt) in enumerate(meta):
        nbytes = _dtype(dt).itemsize * int(torch.Size(shape).numel())
        if out and dt == dtype and size + nbytes <= bucket_bytes:
            out[-1].append(i)
            size += nbytes
        else:
            out.append([i])
            size, dtype = nbytes, dt
    return out


def send_weights(group: WeightGroup, named_tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor], *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Meta:
    """Rank 0: publish the metadata, then broadcast every tensor. Returns the metadata it published."""
    if group.rank != 0:
        raise RuntimeError(f"send_weights: only rank 0 of the weight group sends (this is rank {group.rank})")
    items = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
    meta: Meta = [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in items]
    group.store.set(f"meta/{group.seq}", json.dumps(meta))
    group.seq += 1
    for idx in _buckets(meta, bucket_bytes):
        flat = torch.cat([items[i][1].detach().to(group.device).reshape(-1) for i in idx])
        group.pg.broadcast(flat, 0).wait()
    return meta


def recv_weights(group: WeightGroup, meta: Meta | None = None, *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> dict[str, torch.Tensor]:
    """Ranks ≥ 1: receive one transfer. `meta` defaults to what the sender published for this transfer."""
    if group.rank == 0:
        raise RuntimeError("recv_weights: rank 0 is the sender")
    if meta is None:
        meta = [(n, tuple(s), d) for n, s, d in json.loads(group.store.get(f"meta/{group.seq}"))]
    group.seq += 1
    out: dict[str, torch.Tensor] = {}
    for idx in _buckets(meta, bucket_bytes):
        shapes = [torch.Size(meta[i][1]) for i in idx]
        flat = torch.empty(sum(s.numel() for s in shapes), dtype=_dtype(meta[idx[0]][2]), device=group.device)
        group.pg.broadcast(flat, 0).wait()
        offset = 0
        for i, shape in zip(idx, shapes):
            out[meta[i][0]] = flat[offset:offset + shape.numel()].view(shape)
            offset += shape.numel()
    return out
