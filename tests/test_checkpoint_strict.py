"""[Fault tolerance & security] item 8, restore: a checkpoint whose weights do not match the model (a key missing
or foreign) fails naming the file and the key; it never loads partial weights silently (`strict=False`)."""

from __future__ import annotations

import pytest
import torch
from mosaic_ray.learners import LearnerGroup
from safetensors.torch import load_file, save_file

from mosaic_ray.algorithms.batch import PolicySample
from mosaic_ray.config import LearnerConfig

CFG = LearnerConfig(num_learners=0, lr=1e-3, micro_batch_tokens=10_000, kl_coef=0.05)


def batch() -> list[PolicySample]:
    ids = list(range(3, 23))
    mask = [0] * 8 + [1] * 12
    return [PolicySample(ids, mask, [-2.0 if m else 0.0 for m in mask], 1.0, traj_id="t0")]


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory) -> str:
    lg = LearnerGroup(tiny_model_dir, CFG)
    lg.update(batch())
    path = lg.save(str(tmp_path_factory.mktemp("ckpt") / "iter-00000"))
    lg.shutdown()
    return path


@pytest.mark.parametrize("file", ["model.safetensors", "trainer_state/reference.safetensors"])
@pytest.mark.parametrize("change", ["drop", "add"])
def test_restore_names_the_file_and_the_key_that_does_not_match(tiny_model_dir, saved, tmp_path, file, change):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved, ckpt)
    tensors = load_file(ckpt / file)
    if change == "drop":
        tensors.pop("model.norm.weight")
        expected = "missing key 'model.norm.weight'"
    else:
        tensors["model.extra.weight"] = torch.zeros(2)
        expected = "unexpected key 'model.extra.weight'"
    save_file(tensors, ckpt / file, metadata={"format": "pt"})
    lg = LearnerGroup(tiny_model_dir, CFG)
    try:
        with pytest.raises(ValueError, match=f"checkpoint {ckpt}/{file}: {expected}"):
            lg.restore(str(ckpt))
        assert lg.restore(saved) == 1  # the intact checkpoint still restores
    finally:
        lg.shutdown()
