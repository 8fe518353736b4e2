"""Dataset rows → PolicySamples: masks and log-probs aligned, zero-variance groups skipped and counted."""

from __future__ import annotations

import pyarrow as pa
import pytest

from mosaic_ray.algorithms.batch import samples_and_stats, samples_from_tables


def tables():
    traj = pa.table({
        "traj_id": ["a0", "a1", "b0", "b1", "c0"],
        "group_id": ["a", "a", "b", "b", "c"],
        "prompt_ids": pa.array([[1, 2], [1, 2], [3], [3], [4]], pa.list_(pa.int32())),
        "completion_ids": pa.array([[5, 6, 7], [8, 9], [5], [6], [7]], pa.list_(pa.int32())),
        "loss_mask": pa.array([[1, 0, 1], [1, 1], [1], [1], [1]], pa.list_(pa.uint8())),
        "behavior_logprobs": pa.array([[-0.5, 0.0, -1.5], [-1.0, -2.0], [-1.0], [-1.0], [-3.0]],
                                      pa.list_(pa.float32())),
    })
    rewards = pa.table({"traj_id": ["a0", "a1", "b0", "b1"], "reward": [2.0, 0.0, 1.0, 1.0],
                        "advantage": [1.0, -1.0, 0.0, 0.0]})
    return traj, rewards


def test_rows_become_aligned_samples_and_flat_groups_are_skipped():
    samples, stats = samples_and_stats(*tables())
    assert [s.traj_id for s in samples] == ["a0", "a1"]
    a0 = samples[0]
    assert a0.input_ids == [1, 2, 5, 6, 7]
    assert a0.loss_mask == [0, 0, 1, 0, 1]
    assert a0.old_logprobs == [0.0, 0.0, -0.5, 0.0, -1.5]
    assert a0.advantage == 1.0 and a0.ref_logprobs is None
    assert stats.groups == 2 and stats.zero_variance_groups == 1 and stats.skipped_samples == 2
    assert stats.unrewarded_trajectories == 1
    assert samples_from_tables(*tables())[1].advantage == -1.0


def test_bad_tables_raise_with_names():
    traj, rewards = tables()
    with pytest.raises(ValueError, match="missing column.*group_id"):
        samples_from_tables(traj.drop_columns(["group_id"]), rewards)
    orphan = pa.table({"traj_id": ["zz"], "advantage": [1.0]})
    with pytest.raises(ValueError, match="not in the trajectories table.*zz"):
        samples_from_tables(traj, orphan)
    short = traj.set_column(4, "loss_mask", pa.array([[1, 0], [1, 1], [1], [1], [1]], pa.list_(pa.uint8())))
    with pytest.raises(ValueError, match="'a0'.*same length"):
        samples_from_tables(short, rewards)
