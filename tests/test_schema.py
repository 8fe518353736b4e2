"""Arrow schemas: round trips (in memory and through Parquet), version checks, validation errors."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mosaic_ray.schema import (
    PAIR_SCHEMA,
    REWARD_SCHEMA,
    SCHEMA_VERSION,
    TRAJECTORY_SCHEMA,
    PairRecord,
    RewardRecord,
    SchemaVersionError,
    TrajectoryRecord,
    example_trajectory,
    from_arrow,
    to_arrow,
)
from mosaic_ray.types import Outcome, Step


def _traj(sample_idx: int = 0, **outcome) -> TrajectoryRecord:
    return example_trajectory("run", 3, "task-7", sample_idx,
                              Outcome(terminal="refused", refused_at_step=1, leaked_items=["ssn"], **outcome),
                              category="privacy", num_steps=3)


def test_token_columns_have_the_documented_types():
    assert TRAJECTORY_SCHEMA.field("prompt_ids").type == pa.list_(pa.int32())
    assert TRAJECTORY_SCHEMA.field("completion_ids").type == pa.list_(pa.int32())
    assert TRAJECTORY_SCHEMA.field("loss_mask").type == pa.list_(pa.uint8())
    assert TRAJECTORY_SCHEMA.field("behavior_logprobs").type == pa.list_(pa.float32())
    assert TRAJECTORY_SCHEMA.field("error").nullable and not TRAJECTORY_SCHEMA.field("traj_id").nullable
    step_fields = {f.name for f in TRAJECTORY_SCHEMA.field("steps").type.value_type}
    assert step_fields == {f.name for f in dataclasses.fields(Step)}
    outcome_fields = {f.name for f in TRAJECTORY_SCHEMA.field("outcome").type}
    assert outcome_fields == {f.name for f in dataclasses.fields(Outcome)}
    for schema in (TRAJECTORY_SCHEMA, PAIR_SCHEMA, REWARD_SCHEMA):
        assert schema.metadata[b"mosaic_ray.schema_version"] == str(SCHEMA_VERSION).encode()


def test_trajectory_round_trip_through_parquet(tmp_path):
    recs = [_traj(i, benign_progress=0.3 * i) for i in range(3)]
    recs[1].error = "worker lost"
    pq.write_table(to_arrow(recs), tmp_path / "t.parquet")
    back = from_arrow(pq.read_table(tmp_path / "t.parquet"), TrajectoryRecord)
    # log-probs are float32 on the wire; the example uses 3 decimals, so compare after float32 rounding
    for r in recs:
        r.behavior_logprobs = pa.array(r.behavior_logprobs, pa.float32()).to_pylist()
    assert back == recs
    assert back[1].error == "worker lost" and back[0].error is None
    assert isinstance(back[0].steps[0], Step) and isinstance(back[0].outcome, Outcome)
    assert back[0].outcome.refused_at_step == 1 and back[0].outcome.harmful_action_step is None


def test_pair_and_reward_round_trip():
    pairs = [PairRecord("g/0-1", "g", "t", 0, "harmful", "g/0", "g/1", 1.0, "rubric", "a refused"),
             PairRecord("g/0-2", "g", "t", 0, "harmful", "g/0", "g/2", 0.5, "rubric", "tie")]
    rewards = [RewardRecord("g/0", "g", 0, 2.5, 0.9, 0.5, 0.25, 2.75, 1.2, "pairwise")]
    assert from_arrow(to_arrow(pairs), PairRecord) == pairs
    assert from_arrow(to_arrow(rewards), RewardRecord) == rewards
    assert to_arrow([], PairRecord).schema.equals(PAIR_SCHEMA)


def test_version_mismatch_is_a_clear_error():
    table = to_arrow([_traj()])
    newer = table.set_column(table.column_names.index("schema_version"), "schema_version",
                             pa.array([SCHEMA_VERSION + 1], pa.int32()))
    with pytest.raises(SchemaVersionError, match=rf"trajectories: schema_version \[{SCHEMA_VERSION + 1}\].*reads "
                                                 rf"version {SCHEMA_VERSION}"):
        from_arrow(newer)
    with pytest.raises(SchemaVersionError, match="no schema_version column"):
        from_arrow(table.drop_columns(["schema_version"]))


def test_missing_column_and_nulls_are_named():
    table = to_arrow([_traj()])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['loss_mask'\]"):
        from_arrow(table.drop_columns(["loss_mask"]))
    bad = [PairRecord("p", "g", "t", 0, "benign", "a", "b", 1.0, "rubric", None)]
    with pytest.raises(ValueError, match="'reason' has 1 null"):
        to_arrow(bad)


def test_list_item_naming_from_other_writers_is_accepted(tmp_path):
    """Ray Data writes list items as `element`; from_arrow casts to the schema's `item`."""
    table = to_arrow([_traj()])
    renamed = pa.schema([pa.field(f.name, pa.list_(pa.field("element", f.type.value_type)), f.nullable)
                         if pa.types.is_list(f.type) else f for f in table.schema])
    other = table.cast(renamed)
    assert other.schema.field("prompt_ids").type.value_field.name == "element"
    assert from_arrow(other)[0].prompt_ids == table.column("prompt_ids")[0].as_py()


@pytest.mark.parametrize("change, message", [
    ({"traj_id": "run/3/task-7/9"}, "traj_id must be"),
    ({"group_id": "run/3/other"}, "group_id"),
    ({"category": "spam"}, "category 'spam'"),
    ({"loss_mask": [1]}, "loss_mask has 1 entries"),
])
def test_inconsistent_records_are_rejected_with_their_id(change, message):
    rec = dataclasses.replace(_traj(), **change)
    with pytest.raises(ValueError, match=message):
        to_arrow([rec])


def test_logprob_at_masked_position_is_rejected():
    rec = _traj()
    pos = rec.loss_mask.index(0)
    rec.behavior_logprobs[pos] = -1.0
    with pytest.raises(ValueError, match=rf"behavior_logprobs\[{pos}\].*loss_mask 0"):
        to_arrow([rec])
