"""RunStorage on a local directory and on a real S3 server (SeaweedFS): commit protocol, idempotence,
invisibility of half-written shards, streaming, small files, and the Ray Data read path."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from mosaic_ray.storage import RunStorage, read_ray_dataset


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, monkeypatch) -> RunStorage:
    if request.param == "local":
        return RunStorage(str(tmp_path / "run"))
    server = request.getfixturevalue("s3_server")
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    return RunStorage(f"s3://{server.bucket}/storage-{uuid.uuid4().hex[:8]}")


def table(lo: int, hi: int) -> pa.Table:
    return pa.table({"x": pa.array(range(lo, hi), pa.int64()), "name": [f"r{i}" for i in range(lo, hi)]})


def test_write_commit_read_in_commit_order(storage):
    info, written = storage.write_shard("pairs", "b-second", table(0, 3), meta={"groups": ["g1"]})
    assert written and info.rows == 3 and info.file == "b-second.parquet" and info.bytes > 0
    storage.write_shard("pairs", "a-first", table(3, 5))
    assert [s.name for s in storage.committed_shards("pairs")] == ["b-second", "a-first"]
    assert storage.committed_shards("pairs")[0].meta == {"groups": ["g1"]}
    assert storage.read_dataset("pairs").column("x").to_pylist() == [0, 1, 2, 3, 4]
    batches = list(storage.iter_batches("pairs", batch_size=2))
    assert [b.num_rows for b in batches] == [2, 1, 2]
    assert [b.num_rows for b in storage.iter_batches("pairs", start_shard=1)] == [2]
    # plain pyarrow over the committed files sees the same rows
    ds = pads.dataset(storage.shard_paths("pairs"), filesystem=storage.filesystem, format="parquet")
    assert sorted(ds.to_table().column("x").to_pylist()) == [0, 1, 2, 3, 4]


def test_committed_shard_name_is_a_no_op(storage):
    storage.write_shard("trajectories", "s1", table(0, 3))
    info, written = storage.write_shard("trajectories", "s1", table(100, 200))
    assert not written and info.rows == 3
    assert storage.read_dataset("trajectories").num_rows == 3
    # a fresh handle (a restarted writer) sees the same commit
    again = RunStorage(storage.uri)
    assert not again.write_shard("trajectories", "s1", table(0, 3))[1]
    assert again.is_committed("trajectories", "s1") and not again.is_committed("trajectories", "s2")


def test_half_written_shards_are_invisible_and_recovered(storage):
    storage.write_shard("rewards", "good", table(0, 2))
    fs = storage.filesystem
    # a crash after the data file landed but before the manifest commit, and one mid-upload
    fs.pipe_file(storage.path("rewards", "orphan.parquet"), b"not committed")
    fs.pipe_file(storage.path("rewards", "_tmp", "x.0123.parquet.tmp"), b"half")
    assert [s.name for s in storage.committed_shards("rewards")] == ["good"]
    assert storage.read_dataset("rewards").num_rows == 2
    removed = storage.recover("rewards")
    assert sorted(p.rsplit("/", 1)[-1] for p in removed) == ["orphan.parquet", "x.0123.parquet.tmp"]
    fs.invalidate_cache()
    assert not fs.exists(storage.path("rewards", "orphan.parquet"))
    assert storage.read_dataset("rewards").num_rows == 2 and storage.recover("rewards") == []


def test_empty_and_unknown_datasets(storage):
    assert storage.committed_shards("pairs") == []
    empty = storage.read_dataset("pairs")
    assert empty.num_rows == 0 and "preference" in empty.column_names
    assert list(storage.iter_batches("pairs")) == []
    assert storage.recover("pairs") == []


def test_small_files_round_trip(storage):
    storage.put_text("config.yaml", "a: 1\n")
    storage.put_json("reports/summary.json", {"b": [1, 2]})
    assert storage.get_text("config.yaml") == "a: 1\n"
    assert storage.get_json("reports/summary.json") == {"b": [1, 2]}
    storage.put_text("config.yaml", "a: 2\n")
    assert storage.get_text("config.yaml") == "a: 2\n" and storage.exists("config.yaml")
    assert not storage.exists("nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file"):
        storage.get_text("nope.txt")


def test_bad_names_and_uris_are_clear(tmp_path):
    st = RunStorage(str(tmp_path))
    with pytest.raises(ValueError, match="bad shard name '../x'"):
        st.write_shard("pairs", "../x", table(0, 1))
    with pytest.raises(ValueError, match="bad dataset name 'Pairs/..'"):
        st.committed_shards("Pairs/..")
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        RunStorage("gs://bucket/x")
    with pytest.raises(ValueError, match="no bucket"):
        RunStorage("s3://")
    st.filesystem.pipe_file(st.path("pairs", "_manifest.json"), b"{oops")
    with pytest.raises(ValueError, match="corrupt manifest"):
        st.committed_shards("pairs")


def test_repr_never_shows_credentials(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    st = RunStorage(f"s3://{s3_server.bucket}/repr")
    assert repr(st) == f"RunStorage('s3://{s3_server.bucket}/repr')"
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in repr(st)


@pytest.mark.ray
@pytest.mark.slow  # Ray Data's task start-up: seconds on an idle machine, over a minute on 2 loaded cores
def test_ray_data_reads_committed_shards_from_s3(ray_session, s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    st = RunStorage(f"s3://{s3_server.bucket}/raydata-{uuid.uuid4().hex[:8]}")
    st.write_shard("pairs", "s1", table(0, 10))
    st.write_shard("pairs", "s2", table(10, 25))
    st.filesystem.pipe_file(st.path("pairs", "orphan.parquet"), b"junk that would break a glob reader")
    ds = read_ray_dataset(st, "pairs", override_num_blocks=2)
    xs = sorted(x for b in ds.iter_batches(batch_format="pyarrow", batch_size=8) for x in b.column("x").to_pylist())
    assert xs == list(range(25))
