"""A run's storage: a local directory or `s3://bucket/prefix`, holding Parquet datasets and small files.

Layout under the run URI (one directory per dataset; see `mosaic_ray.schema.DATASETS`):

    <run>/<dataset>/_manifest.json        committed shards, in commit order (the only source of truth)
    <run>/<dataset>/<shard>.parquet       one committed shard
    <run>/<dataset>/_tmp/*.tmp             in-flight local writes (never end in .parquet, so globbing readers skip them)
    <run>/config.yaml, report files …     small text / JSON files (`put_text`, `put_json`)

Commit protocol of `write_shard` (single writer per dataset — the pair builder):
1. write the Parquet file as `<shard>.parquet` (a deterministic name: a rewrite of the same shard replaces the
   same file). Locally it is written under `_tmp/`, fsynced and renamed; on S3 it is uploaded to its final key
   directly (an object becomes visible only when its upload completes);
2. replace `_manifest.json` with a new version listing the shard (locally: temp file, fsync, rename, fsync of
   the directory; on S3: one PUT) — both atomic, so a reader sees the old or the new manifest, never a torn
   one, and locally a commit that returned survives a power loss.
A crash before 2 leaves the shard uncommitted: readers go through the manifest and never see it, and the
writer's `recover()` deletes it on restart. A shard name that is already committed is a no-op, so a retried or
restarted writer never duplicates rows.

Fencing: a dataset's writer holds an epoch in `<dataset>/_writer.json`. `recover()` (a writer's restart) and a
writer's first `write_shard` take the next epoch; every commit first checks that the epoch is still its own, so a
stale writer (a zombie actor, the old job while `--resume` runs) fails loudly with `StaleWriterError` instead
of overwriting the new writer's commits. Locally the check and the manifest replace run under an exclusive
`flock` on `<dataset>/_writer.lock`, so they are one step for every writer on the host. On S3 the check and
the PUT are two requests: a stale writer whose check passed a moment before the new writer took over can still
commit once (the window is one request long); the next commit fails.

S3 access goes through `s3_filesystem` (the one S3 builder of the project; checkpoints and model sources use it
too): `s3fs` with the standard AWS chain (environment, `~/.aws/config`, instance role);
`AWS_ENDPOINT_URL_S3` (else `AWS_ENDPOINT_URL`) selects an S3-compatible endpoint. Credentials are never logged:
`repr(storage)` shows only the URI. The writer keeps the manifest it last committed in memory (one writer per
dataset), so a commit costs two requests on S3: the shard and the manifest. The filesystem object pickles without secrets (unless passed explicitly in
`storage_options`), so Ray workers resolve credentials from their own environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from mosaic_ray.schema import DATASETS, schema_for

MANIFEST = "_manifest.json"
LEASE = "_writer.json"
LOCK = "_writer.lock"
TMP_DIR = "_tmp"
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

__all__ = ["MANIFEST", "RunStorage", "ShardInfo", "StaleWriterError", "filesystem_for", "read_ray_dataset",
           "s3_filesystem"]


class StaleWriterError(RuntimeError):
    """This writer's epoch was superseded: another writer took over the dataset; its commit is refused."""


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard as the manifest lists it."""

    name: str
    file: str
    """File name inside the dataset directory."""
    rows: int
    bytes: int
    committed_at: float
    meta: dict[str, Any] = field(default_factory=dict)
    """Writer's annotations (the pair builder stores the group ids the shard holds)."""


def s3_filesystem(options: Mapping[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    """The project's one S3 filesystem builder: run storage, checkpoints and `s3://` model sources all use it.

    Credentials are never passed here: s3fs/botocore resolve them in the calling process (environment,
    `~/.aws/config`, instance role), so nothing logs or pickles them. `AWS_ENDPOINT_URL_S3` (else
    `AWS_ENDPOINT_URL`) selects an S3-compatible endpoint, `AWS_REGION` (else `AWS_DEFAULT_REGION`) the region.
    `options` are extra `s3fs.S3FileSystem` arguments (`RunStorage`'s `storage_options`); explicit
    `client_kwargs` there win over the environment.
    """
    import s3fs

    opts = dict(options or {})
    client_kwargs = dict(opts.pop("client_kwargs", {}) or {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs.setdefault("endpoint_url", endpoint)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs.setdefault("region_name", region)
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, **opts)


def filesystem_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path in it) for a local path, `file://` or `s3://bucket/prefix` URI (`s3_filesystem`); any
    other scheme through fsspec. A local path comes back absolute."""
    if uri.startswith("s3://"):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        return fsspec.core.url_to_fs(uri)
    return fsspec.core.url_to_fs(os.path.abspath(uri.removeprefix("file://")))


class RunStorage:
    """Datasets and small files under one run URI (local path or `s3://bucket/prefix`)."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
        if not uri:
            raise ValueError("RunStorage: empty URI (expected a local path or s3://bucket/prefix)")
        self.uri = uri.rstrip("/") if uri.rstrip("/") else uri
        self.storage_options = dict(storage_options or {})
        self._writer_manifests: dict[str, dict[str, Any]] = {}
        self._epochs: dict[str, tuple[int, str]] = {}
        """dataset → (epoch, token) this object holds as the dataset's writer."""
        if uri.startswith("s3://"):
            self.root = uri[len("s3://"):].rstrip("/")
            if not self.root or self.root.startswith("/"):
                raise ValueError(f"RunStorage: {uri!r} has no bucket (expected s3://bucket/prefix)")
            self.filesystem = s3_filesystem(self.storage_options)
        elif "://" in self.uri and not self.uri.startswith("file://"):
            raise ValueError(f"RunStorage: unsupported URI scheme in {uri!r} (use a local path or s3://)")
        else:
            self.root = os.path.abspath(self.uri.removeprefix("file://"))
            self.filesystem = fsspec.filesystem("file", auto_mkdir=True)
            self.filesystem.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"RunStorage({self.uri!r})"

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def path(self, *parts: str) -> str:
        """Filesystem path (no scheme) of `parts` under the run root."""
        return "/".join([self.root, *parts])

    def url(self, *parts: str) -> str:
        """Full URI of `parts` (with `s3://` for S3), for tools outside this class."""
        return "/".join([self.uri, *parts])

    # ------------------------------------------------------------------------------------------ small files

    def put_bytes(self, relpath: str, data: bytes) -> None:
        """Write a small file atomically (one PUT on S3; temp name, then rename locally)."""
        if self.is_s3:
            self.filesystem.pipe_file(self.path(relpath), data)
            return
        parent, _, name = relpath.rpartition("/")
        tmp = self.path(*(p for p in (parent, f".{name}.{uuid.uuid4().hex}.tmp") if p))
        _durable_write(tmp, data)
        _durable_rename(tmp, self.path(relpath))

    def get_bytes(self, relpath: str) -> bytes:
        """Read a small file; FileNotFoundError names the URI."""
        try:
            return self.filesystem.cat_file(self.path(relpath))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(relpath)}: no such file") from None

    def put_text(self, relpath: str, text: str) -> None:
        self.put_bytes(relpath, text.encode())

    def get_text(self, relpath: str) -> str:
        return self.get_bytes(relpath).decode()

    def put_json(self, relpath: str, obj: Any) -> None:
        self.put_text(relpath, json.dumps(obj, indent=1, sort_keys=True))

    def get_json(self, relpath: str) -> Any:
        text = self.get_text(relpath)
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.url(relpath)}: not valid JSON: {e}") from None

    def exists(self, relpath: str) -> bool:
        self.filesystem.invalidate_cache(self.path(relpath))
        return self.filesystem.exists(self.path(relpath))

    # ---------------------------------------------------------------------------------------------- datasets

    def _manifest(self, dataset: str) -> dict[str, Any]:
        _check_dataset(dataset)
        try:
            raw = self.filesystem.cat_file(self.path(dataset, MANIFEST))
        except FileNotFoundError:
            return {"dataset": dataset, "shards": []}
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.url(dataset, MANIFEST)}: corrupt manifest: {e}") from None
        if manifest.get("dataset") != dataset or not isinstance(manifest.get("shards"), list):
            raise ValueError(f"{self.url(dataset, MANIFEST)}: not a manifest of dataset {dataset!r}")
        return manifest

    def committed_shards(self, dataset: str) -> list[ShardInfo]:
        """Committed shards of `dataset` in commit order (empty when the dataset does not exist yet)."""
        return [ShardInfo(**s) for s in self._manifest(dataset)["shards"]]

    def is_committed(self, dataset: str, shard_name: str) -> bool:
        return any(s.name == shard_name for s in self.committed_shards(dataset))

    def write_shard(self, dataset: str, shard_name: str, table: pa.Table,
                    meta: Mapping[str, Any] | None = None) -> tuple[ShardInfo, bool]:
        """Write `table` as shard `shard_name` and commit it; returns (info, written).

        `written` is False when the shard was already committed (the call is then a no-op: idempotent).
        """
        if not _SHARD_NAME.match(shard_name):
            raise ValueError(f"{self.url(dataset)}: bad shard name {shard_name!r} (letters, digits, '.', '_', '-'; "
                             f"at most 200 characters, not starting with a dot)")
        if dataset not in self._epochs:
            self.acquire_writer(dataset)  # (re)reads the manifest the previous writer left
        manifest = self._writer_manifest(dataset)
        for s in manifest["shards"]:
            if s["name"] == shard_name:
                return ShardInfo(**s), False
        final_file = f"{shard_name}.parquet"
        final = self.path(dataset, final_file)
        # S3 makes an object visible only once its upload completes, so the shard goes straight to its final
        # key; a local file is visible while it is written, so it goes through a temp name, fsync and rename.
        if self.is_s3:
            with self.filesystem.open(final, "wb") as f:
                pq.write_table(table, f)
                size = f.tell()
        else:
            tmp = self.path(dataset, TMP_DIR, f"{shard_name}.{uuid.uuid4().hex}.parquet.tmp")
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                size = f.tell()
                f.flush()
                os.fsync(f.fileno())
            _durable_rename(tmp, final)
        info = ShardInfo(name=shard_name, file=final_file, rows=table.num_rows, bytes=int(size),
                         committed_at=time.time(), meta=dict(meta or {}))
        new = {**manifest, "epoch": self._epochs[dataset][0], "shards": [*manifest["shards"], asdict(info)]}
        with self._writer_lock(dataset):
            self._check_epoch(dataset, f"commit of shard {shard_name!r}")
            self._replace_manifest(dataset, new)
        self._writer_manifests[dataset] = new
        return info, True

    # ------------------------------------------------------------------------------------------- fencing

    def acquire_writer(self, dataset: str) -> int:
        """Become `dataset`'s writer: take the next epoch (any earlier writer's next commit then fails)."""
        _check_dataset(dataset)
        token = uuid.uuid4().hex
        with self._writer_lock(dataset):
            epoch = self._lease(dataset).get("epoch", 0) + 1
            data = json.dumps({"epoch": epoch, "writer": token, "acquired_at": time.time()}).encode()
            if self.is_s3:
                self.filesystem.pipe_file(self.path(dataset, LEASE), data)
            else:
                tmp = self.path(dataset, TMP_DIR, f"_writer.{token}.json.tmp")
                _durable_write(tmp, data)
                _durable_rename(tmp, self.path(dataset, LEASE))
        self._epochs[dataset] = (epoch, token)
        self._writer_manifests.pop(dataset, None)  # read what the previous writer committed, once
        return epoch

    def _lease(self, dataset: str) -> dict[str, Any]:
        try:
            raw = self.filesystem.cat_file(self.path(dataset, LEASE))
        except FileNotFoundError:
            return {}
        try:
            lease = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.url(dataset, LEASE)}: corrupt writer lease: {e}") from None
        return lease if isinstance(lease, dict) else {}

    def _check_epoch(self, dataset: str, what: str) -> None:
        mine, token = self._epochs[dataset]
        lease = self._lease(dataset)
        if lease.get("epoch") != mine or lease.get("writer") != token:
            raise StaleWriterError(
                f"{self.url(dataset)}: {what} refused: this writer holds epoch {mine}, but epoch "
                f"{lease.get('epoch')} took over the dataset (a restarted writer or a second job on the same run "
                f"directory); stop this writer")

    @contextlib.contextmanager
    def _writer_lock(self, dataset: str) -> Iterator[None]:
        """Exclusive lock over lease check + manifest replace (local only; see the module docstring)."""
        if self.is_s3:
            yield
            return
        import fcntl

        path = self.path(dataset, LOCK)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _writer_manifest(self, dataset: str) -> dict[str, Any]:
        """The manifest as this writer last committed it (read once; the writer is the dataset's only one)."""
        if dataset not in self._writer_manifests:
            self._writer_manifests[dataset] = self._manifest(dataset)
        return self._writer_manifests[dataset]

    def _replace_manifest(self, dataset: str, manifest: dict[str, Any]) -> None:
        data = json.dumps(manifest, sort_keys=True).encode()
        if self.is_s3:  # one PUT replaces the object atomically: readers get the old or the new manifest
            self.filesystem.pipe_file(self.path(dataset, MANIFEST), data)
            return
        tmp = self.path(dataset, TMP_DIR, f"_manifest.{uuid.uuid4().hex}.json.tmp")
        _durable_write(tmp, data)
        _durable_rename(tmp, self.path(dataset, MANIFEST))

    def shard_paths(self, dataset: str) -> list[str]:
        """Filesystem paths of the committed shard files (for `pyarrow.dataset` / Ray Data with `filesystem`)."""
        return [self.path(dataset, s.file) for s in self.committed_shards(dataset)]

    def read_dataset(self, dataset: str, columns: list[str] | None = None,
                     shards: Callable[[ShardInfo], bool] | None = None) -> pa.Table:
        """Committed rows of `dataset`, in commit order, as one table (empty table with the schema if none);
        `shards` keeps only the shards it accepts (e.g. by the groups in their manifest entry)."""
        keep = [s for s in self.committed_shards(dataset) if shards is None or shards(s)]
        tables = [pq.read_table(self.path(dataset, s.file), filesystem=self.filesystem, columns=columns)
                  for s in keep]
        if not tables:
            if dataset not in DATASETS:
                return pa.table({})
            schema = schema_for(dataset)
            return schema.empty_table().select(columns) if columns else schema.empty_table()
        return pa.concat_tables(tables)

    def iter_batches(self, dataset: str, batch_size: int = 1024, start_shard: int = 0,
                     columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream committed rows as Arrow record batches, shard by shard in commit order.

        The shard list is read once at the start; a consumer that follows a growing dataset calls again
        with `start_shard` = the number of shards it has already read.
        """
        for path in self.shard_paths(dataset)[start_shard:]:
            with self.filesystem.open(path, "rb") as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)

    def recover(self, dataset: str) -> list[str]:
        """Delete in-flight temp files and uncommitted shard files of `dataset` (writer restart); returns them.

        Only the dataset's single writer may call this: a concurrent writer's in-flight files would be removed.
        """
        fs = self.filesystem
        base = self.path(dataset)
        self._writer_manifests.pop(dataset, None)
        fs.invalidate_cache(base)
        if not fs.exists(base):
            return []
        self.acquire_writer(dataset)  # fence the previous writer out before removing its in-flight files
        committed = {self.path(dataset, s.file) for s in self.committed_shards(dataset)}
        keep = committed | {self.path(dataset, MANIFEST)}
        stale = [p for p in fs.find(base) if p.endswith((".parquet", ".tmp")) and _strip(p) not in keep]
        for p in stale:
            fs.rm_file(p)
        fs.invalidate_cache(base)
        return stale


def _durable_write(path: str, data: bytes) -> None:
    """Write a local file and fsync it (its contents reach the disk before it is renamed into place)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _durable_rename(src: str, dst: str) -> None:
    """Atomic local rename, then fsync of the directory, so the new name survives a crash."""
    os.replace(src, dst)
    fd = os.open(os.path.dirname(dst) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _strip(p: str) -> str:
    return p.removeprefix("file://")


def _check_dataset(dataset: str) -> None:
    if not _DATASET_NAME.match(dataset):
        raise ValueError(f"bad dataset name {dataset!r} (lowercase letters, digits, '_')")


def read_ray_dataset(storage: RunStorage, dataset: str, override_num_blocks: int | None = None, *,
                     ship_credentials: bool = True):
    """Committed shards as a `ray.data.Dataset` (learners: `.iter_batches(batch_format="pyarrow")`).

    Ray is imported here only (the core never needs it). Pass `override_num_blocks` on small clusters: Ray
    Data's default block count makes hundreds of tiny read tasks (notes/feasibility-ray.md §3).
    Ray Data pickles the filesystem into its read tasks. With `ship_credentials` (S3 only), the driver's
    resolved AWS credentials go inside it, so workers started without AWS variables can read; the secret then
    travels in Ray's task specs (never in logs). Pass False on clusters whose nodes have their own credentials.
    """
    import ray.data

    paths = storage.shard_paths(dataset)
    if not paths:
        raise FileNotFoundError(f"{storage.url(dataset)}: no committed shards")
    fs = storage.filesystem
    if storage.is_s3 and ship_credentials and "key" not in storage.storage_options:
        import botocore.session

        creds = botocore.session.get_session().get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            fs = s3_filesystem({**storage.storage_options, "key": frozen.access_key, "secret": frozen.secret_key,
                                "token": frozen.token})
    return ray.data.read_parquet(paths, filesystem=fs, override_num_blocks=override_num_blocks)
