"""Broadcast weight sync learner → engines over a private torch.distributed group (no Ray here).

The learner's rank 0 is the sender (rank 0 of this group), every engine is a receiver. The group is built from a
TCPStore on a port that the driver picks on the sender's node, so it never touches the learners' own training
group. Backend: gloo on CPU, NCCL on GPU (the same pattern vLLM's weight-transfer engine uses).

A transfer is: the sender publishes a `TransferPlan` (the ordered `[(name, shape, dtype), …]` and the bucket size)
in the store under the transfer's sequence number, then broadcasts the tensors bucket by bucket: consecutive
tensors of one dtype, at most `bucket_bytes` per bucket (a larger tensor travels alone), one flat buffer each.
Both sides cut the buckets with the same function (`bucket_indices`), so a receiver allocates, receives and
hands on ONE bucket at a time (`recv_buckets` is a generator): peak extra memory on a receiver is one bucket,
never the model. Names are plain HF parameter names, as engines' weight-update verbs expect.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_BUCKET_BYTES = 256 << 20
Meta = list[tuple[str, tuple[int, ...], str]]
"""Ordered `(HF name, shape, dtype name without the "torch." prefix)` of every tensor of one transfer."""


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


def dtype_of(name: str) -> torch.dtype:
    """`"bfloat16"` → torch.bfloat16; ValueError on anything that is not a torch dtype."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if isinstance(dtype, torch.dtype):
        return dtype
    raise ValueError(f"weight metadata: unknown dtype {name!r}")


def tensor_meta(named: Iterable[tuple[str, torch.Tensor]]) -> Meta:
    return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in named]


def nbytes(entry: tuple[str, tuple[int, ...], str]) -> int:
    return dtype_of(entry[2]).itemsize * int(torch.Size(entry[1]).numel())


def bucket_indices(meta: Meta, bucket_bytes: int) -> list[list[int]]:
    """Consecutive indices of the same dtype, each bucket ≤ bucket_bytes (a larger tensor gets its own)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    out: list[list[int]] = []
    size, dtype = 0, None
    for i, entry in enumerate(meta):
        n = nbytes(entry)
        if out and entry[2] == dtype and size + n <= bucket_bytes:
            out[-1].append(i)
            size += n
        else:
            out.append([i])
            size, dtype = n, entry[2]
    return out


@dataclass(frozen=True)
class PackedBucket:
    """One bucket as a single flat byte buffer (what the object-store sync puts): a NumPy array, which Ray
    deserialises as a zero-copy view of the object store, so a receiver copies each tensor straight from the store
    into its model and holds no private copy of the bucket."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    data: object
    """uint8 numpy array, the tensors' bytes back to back."""

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def pack_bucket(named: Sequence[tuple[str, torch.Tensor]]) -> PackedBucket:
    """Tensors of one dtype (a bucket of `bucket_indices`) → one flat buffer."""
    dtypes = {t.dtype for _, t in named}
    if len(dtypes) != 1:
        raise ValueError(f"pack_bucket: a bucket holds one dtype, got {sorted(map(str, dtypes))}")
    flat = torch.cat([t.detach().reshape(-1).cpu() for _, t in named])
    return PackedBucket(tuple(n for n, _ in named), tuple(tuple(t.shape) for _, t in named),
                        str(flat.dtype).removeprefix("torch."), flat.view(torch.uint8).numpy())


def unpack_bucket(bucket: PackedBucket) -> list[tuple[str, torch.Tensor]]:
    """Views into the bucket's buffer (no copy), by name."""
    import warnings

    with warnings.catch_warnings():   # the object store's buffer is read-only; the views are only read
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(bucket.data).view(dtype_of(bucket.dtype))
    out, offset = [], 0
    for name, shape in zip(bucket.names, bucket.shapes):
        n = int(torch.Size(shape).numel())
        out.append((name, flat[offset:offset + n].view(shape)))
        offset += n
    return out


def publish_plan(group: WeightGroup, meta: Meta, bucket_bytes: int) -> None:
    """Rank 0: make this transfer's plan readable by the receivers (who may be told it directly instead)."""
    if group.rank != 0:
        raise RuntimeError(f"publish_plan: only rank 0 of the weight group sends (this is rank {group.rank})")
    group.store.set(f"plan/{group.seq}", json.dumps({"bucket_bytes": bucket_bytes, "meta": meta}))


def send_buckets(group: WeightGroup, meta: Meta, buckets: Iterable[Sequence[torch.Tensor]], *,
                 bucket_bytes: int) -> int:
    """Rank 0: publish the plan, then broadcast each bucket (its tensors in `bucket_indices` order) as it comes.
    Returns the bytes sent. `buckets` may be a generator that gathers each bucket just in time."""
    publish_plan(group, meta, bucket_bytes)
    group.seq += 1
    plan = bucket_indices(meta, bucket_bytes)
    sent = 0
    for count, (idx, tensors) in enumerate(zip(plan, buckets, strict=True)):
        if len(tensors) != len(idx):
            raise ValueError(f"send_buckets: bucket {count} holds {len(tensors)} tensors, the plan says {len(idx)}")
        flat = torch.cat([t.detach().to(group.device, dtype_of(meta[i][2])).reshape(-1) for i, t in zip(idx, tensors)])
        group.pg.broadcast(flat, 0).wait()
        sent += flat.numel() * flat.element_size()
        del flat, tensors   # freed before the next bucket is gathered and flattened
    return sent


def send_weights(group: WeightGroup, named_tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor], *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Meta:
    """Rank 0: send tensors that are already at hand (tests, small updates). Returns the metadata it published."""
    items = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
    meta = tensor_meta(items)
    send_buckets(group, meta, ([items[i][1] for i in idx] for idx in bucket_indices(meta, bucket_bytes)),
                 bucket_bytes=bucket_bytes)
    return meta


def recv_buckets(group: WeightGroup, meta: Meta | None = None, *,
                 bucket_bytes: int | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Ranks ≥ 1: receive one transfer, one bucket at a time (a generator: consume it to the end).

    `meta` / `bucket_bytes` default to the plan the sender published for this transfer. Each yielded bucket is
    views into one fresh buffer; drop it before taking the next, and at most one bucket is alive."""
    if group.rank == 0:
        raise RuntimeError("recv_buckets: rank 0 is the sender")
    seq = group.seq
    group.seq += 1
    if meta is None or bucket_bytes is None:
        plan = json.loads(group.store.get(f"plan/{seq}"))
        meta = [(n, tuple(s), d) for n, s, d in plan["meta"]] if meta is None else meta
        bucket_bytes = plan["bucket_bytes"] if bucket_bytes is None else bucket_bytes
    for idx in bucket_indices(meta, bucket_bytes):
        shapes = [torch.Size(meta[i][1]) for i in idx]
        flat = torch.empty(sum(s.numel() for s in shapes), dtype=dtype_of(meta[idx[0]][2]), device=group.device)
        group.pg.broadcast(flat, 0).wait()
        out, offset = [], 0
        for i, shape in zip(idx, shapes):
            out.append((meta[i][0], flat[offset:offset + shape.numel()].view(shape)))
            offset += shape.numel()
        del flat
        yield out
        del out
