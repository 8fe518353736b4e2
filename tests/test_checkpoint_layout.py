"""Checkpoint layout: each `iter-N/` is a clean Hugging Face model directory (weights in the training dtype, sharded
above `max_shard_bytes`, tokenizer with its chat template) that `from_pretrained` loads alone; the exact-resume state
sits in `trainer_state/`; restore stays strict shard by shard; old formats are refused; `prune_checkpoints` keeps
the newest N (locally and on S3)."""

from __future__ import annotations

import json
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from mosaic_ray.learners import LearnerGroup
from mosaic_ray.learners.checkpoint import (
    FORMAT_VERSION,
    MANIFEST,
    STATE_DIR,
    CheckpointWriter,
    prune_checkpoints,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mosaic_ray.algorithms.batch import PolicySample
from mosaic_ray.config import LearnerConfig
from mosaic_ray.storage import filesystem_for

CFG = LearnerConfig(num_learners=0, lr=1e-3, micro_batch_tokens=10_000, kl_coef=0.05, lr_warmup_steps=3)
TOOLS = [{"type": "function", "function": {"name": "lookup_weather", "description": "Weather of a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def batch(seed: int) -> list[PolicySample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(3):
        ids = torch.randint(3, 150, (18 + i,), generator=g).tolist()
        mask = [0] * 7 + [1] * (11 + i)
        out.append(PolicySample(ids, mask, [-2.0 if m else 0.0 for m in mask], float(i) - 1.0, traj_id=f"t{i}"))
    return out


def weight_bytes(model_dir: str) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(f"{model_dir}/model.safetensors").values())


def tokenizer_files(model_dir: str, tmp: Path) -> set[str]:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    return {p.name for p in tmp.iterdir()}


@pytest.fixture(scope="module")
def learner(tiny_model_dir):
    lg = LearnerGroup(tiny_model_dir, CFG)
    lg.update(batch(1))
    yield lg
    lg.shutdown()


@pytest.fixture(scope="module")
def single(learner, tmp_path_factory) -> str:
    return learner.save(str(tmp_path_factory.mktemp("single") / "iter-00000"))


@pytest.fixture(scope="module")
def sharded(learner, tiny_model_dir, tmp_path_factory) -> str:
    return learner.save(str(tmp_path_factory.mktemp("sharded") / "iter-00000"),
                        max_shard_bytes=weight_bytes(tiny_model_dir) // 3)


def test_the_top_level_is_a_clean_hf_model_dir_that_transformers_loads_alone(learner, single, tiny_model_dir,
                                                                            tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(single)
    tokenizer = tokenizer_files(tiny_model_dir, tmp_path / "tok")
    top = {p.name for p in ckpt.iterdir()}
    assert top == {"config.json", "generation_config.json", "model.safetensors", MANIFEST, STATE_DIR} | tokenizer
    state = {p.relative_to(ckpt / STATE_DIR).as_posix() for p in (ckpt / STATE_DIR).rglob("*") if p.is_file()}
    assert state == {"optimizer.safetensors", "optimizer.json", "reference.safetensors", "trainer_state.json",
                     "rng/rank0.safetensors"}   # fp32 learner: the exported weights are the master weights
    assert not [p for p in ckpt.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and set(manifest["files"]) == top - {MANIFEST, STATE_DIR}

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    expected = learner.get_weights()
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items()), "loaded weights differ from the learner's"
    tok = AutoTokenizer.from_pretrained(ckpt)
    msgs = [{"role": "user", "content": "weather in Oslo?"}]
    assert "lookup_weather" in tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template(msgs, tools=TOOLS, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_a_bf16_learner_saves_bf16_weights_and_keeps_fp32_master_weights_for_resume(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    cfg = LearnerConfig(**{**CFG.__dict__, "bf16": True})
    first = LearnerGroup(tiny_model_dir, cfg)
    try:
        first.update(batch(2))
        ckpt = first.save(str(tmp_path / "bf16"))
        with safe_open(f"{ckpt}/model.safetensors", framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 - not a dict
        with safe_open(f"{ckpt}/{STATE_DIR}/master.safetensors", framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118 - not a dict
        assert AutoConfig.from_pretrained(ckpt).dtype == torch.bfloat16
        second = LearnerGroup(tiny_model_dir, cfg)
        try:
            assert second.restore(ckpt) == 1
            expected, restored = first.get_weights(), second.get_weights()
            assert all(torch.equal(expected[k], restored[k]) for k in expected), "fp32 master weights not restored"
        finally:
            second.shutdown()
    finally:
        first.shutdown()


def test_above_max_shard_bytes_the_weights_are_shards_with_an_index_that_transformers_loads(learner, sharded):
    from transformers import AutoModelForCausalLM

    ckpt = Path(sharded)
    shards = sorted(p.name for p in ckpt.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (ckpt / "model.safetensors").exists()
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert sorted(p.name for p in (ckpt / STATE_DIR).glob("reference-*-of-*.safetensors")) == \
        [s.replace("model", "reference") for s in shards]
    loaded = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    expected = learner.get_weights()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_a_sharded_checkpoint_resumes_exactly(tiny_model_dir, tmp_path):
    first = LearnerGroup(tiny_model_dir, CFG)
    try:
        first.update(batch(3))
        ckpt = first.save(str(tmp_path / "iter-00000"), max_shard_bytes=weight_bytes(tiny_model_dir) // 3)
        rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        first.update(batch(4))
        expected, expected_optim = first.get_weights(), first._local.optimizer.state_dict()

        torch.rand(7), random.random(), np.random.rand()   # move every generator on
        second = LearnerGroup(tiny_model_dir, CFG)   # its constructor re-seeds them too
        try:
            assert second.restore(ckpt) == 1
            assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
            assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), rng[2]))
            second.update(batch(4))
            resumed, optim = second.get_weights(), second._local.optimizer.state_dict()
            assert second._local.step == 2
            assert all(torch.equal(expected[k], resumed[k]) for k in expected), "resume is not bit-identical"
            as_json = json.dumps(optim["param_groups"])   # torch hands betas back as a list: same values
            assert as_json == json.dumps(expected_optim["param_groups"])
            for p, state in expected_optim["state"].items():
                assert all(torch.equal(v, optim["state"][p][k]) for k, v in state.items())
        finally:
            second.shutdown()
    finally:
        first.shutdown()


@pytest.mark.parametrize("stem", ["model", f"{STATE_DIR}/reference"])
@pytest.mark.parametrize("change", ["drop", "add"])
def test_restore_names_the_shard_and_the_key_that_does_not_match(tiny_model_dir, sharded, tmp_path, stem, change):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(sharded, ckpt)
    index = json.loads((ckpt / f"{stem}.safetensors.index.json").read_text())
    key = "model.norm.weight"
    shard = f"{stem.rpartition('/')[0]}/{index['weight_map'][key]}".lstrip("/")
    tensors = load_file(ckpt / shard)
    if change == "drop":
        del tensors[key]
        expected = f"missing key '{key}'"
    else:
        tensors["model.extra.weight"] = torch.zeros(2)
        expected = "unexpected key 'model.extra.weight'"
    save_file(tensors, ckpt / shard, metadata={"format": "pt"})
    lg = LearnerGroup(tiny_model_dir, CFG)
    try:
        with pytest.raises(ValueError, match=f"checkpoint {ckpt}/{shard}: {expected}"):
            lg.restore(str(ckpt))
        assert lg.restore(sharded) == 1   # the intact checkpoint still restores
    finally:
        lg.shutdown()


def test_a_key_missing_from_the_index_names_the_index(tiny_model_dir, sharded, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(sharded, ckpt)
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = index["weight_map"].pop("model.norm.weight")
    tensors = load_file(ckpt / shard)
    del tensors["model.norm.weight"]
    save_file(tensors, ckpt / shard, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    assert_refused(tiny_model_dir, ckpt, f"checkpoint {ckpt}/model.safetensors.index.json: missing key "
                                         f"'model.norm.weight'")


def test_a_checkpoint_of_the_old_format_is_refused_naming_the_path_and_both_versions(tiny_model_dir, single,
                                                                                    tmp_path):
    ckpt = tmp_path / "old"
    shutil.copytree(single, ckpt)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    (ckpt / MANIFEST).write_text(json.dumps({**manifest, "format_version": 1}))
    assert_refused(tiny_model_dir, ckpt, rf"checkpoint {ckpt}: format_version 1 .* reads only format_version "
                                         rf"{FORMAT_VERSION}")


def assert_refused(model_dir: str, ckpt, match: str) -> None:
    """Restoring `ckpt` into a fresh learner group raises a ValueError matching `match`."""
    lg = LearnerGroup(model_dir, CFG)
    try:
        with pytest.raises(ValueError, match=match):
            lg.restore(str(ckpt))
    finally:
        lg.shutdown()


def commit_fake(uri: str, step: int) -> None:
    """A committed checkpoint through the real commit path (prepare → files → manifest last)."""
    writer = CheckpointWriter(uri)
    writer.prepare()
    writer.put_json(f"{STATE_DIR}/trainer_state.json", {"step": step})
    writer.put_tensors("model.safetensors", {"w": torch.zeros(3)})
    writer.commit({"format_version": FORMAT_VERSION, "step": step})


def names_under(root: str) -> set[str]:
    """Top-level names under `root` that hold files (SeaweedFS, unlike S3, lists emptied folders)."""
    fs, path = filesystem_for(root)
    fs.invalidate_cache()
    return {f.removeprefix(path.rstrip("/") + "/").split("/", 1)[0] for f in fs.find(path)}


def check_pruning(root: str) -> None:
    for it in (-1, 0, 1, 2, 3, 4):
        commit_fake(f"{root}/iter-{it:05d}", it)
    fs, path = filesystem_for(root)
    fs.makedirs(f"{path}/iter-00009", exist_ok=True)
    fs.pipe(f"{path}/iter-00009/model.safetensors", b"half-written, never committed")   # no manifest
    fs.invalidate_cache()
    deleted = prune_checkpoints(root, keep_last=2, keep=["checkpoints/iter--0001", "iter-00001"])
    assert deleted == ["iter-00000", "iter-00002"]
    assert names_under(root) == {"iter--0001", "iter-00001", "iter-00003", "iter-00004", "iter-00009"}
    assert prune_checkpoints(root, keep_last=2, keep=["iter--0001", "iter-00001"]) == []
    assert prune_checkpoints(root, keep_last=1) == ["iter--0001", "iter-00001", "iter-00003"]
    assert names_under(root) == {"iter-00004", "iter-00009"}
    assert fs.exists(f"{path}/iter-00004/{MANIFEST}") and fs.exists(f"{path}/iter-00009/model.safetensors")


def test_prune_keeps_the_newest_and_the_named_checkpoints_and_leaves_uncommitted_dirs(tmp_path):
    root = tmp_path / "checkpoints"
    check_pruning(str(root))
    (root / "iter-00005.partial").mkdir()
    (root / "iter-00005.partial" / MANIFEST).write_text("{}")   # being written: never pruned
    assert prune_checkpoints(str(root), keep_last=0) == ["iter-00004"]
    assert names_under(str(root)) == {"iter-00005.partial", "iter-00009"}
    assert prune_checkpoints(str(tmp_path / "nothing-yet"), keep_last=3) == []
    with pytest.raises(ValueError, match="keep_last must be >= 0"):
        prune_checkpoints(str(root), keep_last=-1)


def test_on_s3_a_sharded_checkpoint_restores_an_overwrite_leaves_no_stale_shard_and_prune_works(
        learner, tiny_model_dir, s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    root = f"s3://{s3_server.bucket}/ckpt-{uuid.uuid4().hex[:8]}/checkpoints"
    uri = learner.save(f"{root}/iter-00000", max_shard_bytes=weight_bytes(tiny_model_dir) // 3)
    assert any(n.startswith("model-00001-of-") for n in names_under(uri))
    assert learner.restore(uri) == 1
    learner.save(uri)   # the same prefix again, one file now: the old shards and index are gone
    assert {n for n in names_under(uri) if n.startswith("model")} == {"model.safetensors"}
    assert learner.restore(uri) == 1
    check_pruning(f"{root}-pruned")
