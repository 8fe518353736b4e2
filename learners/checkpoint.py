"""Checkpoints: a clean Hugging Face model directory, plus everything an exact resume needs in `trainer_state/`.

Layout of one checkpoint, e.g. `checkpoints/iter-00009/` (a local path or `s3://bucket/prefix`):

    config.json, generation_config.json      the model's config (its `dtype` is the weights' dtype)
    model.safetensors                        the weights in the training dtype (bf16 runs: bf16); above
                                             `max_shard_bytes`, shards `model-0000k-of-0000n.safetensors` and
                                             `model.safetensors.index.json` instead, as `save_pretrained` writes them
    tokenizer.json, tokenizer_config.json,   the learner's tokenizer as `save_pretrained` writes it, chat template
      chat_template.jinja, ...               included
    trainer_state/                           exact resume; nothing here is read by `from_pretrained` or vLLM:
        optimizer.safetensors, optimizer.json  AdamW moments per parameter (by HF name) + param-group settings
        master.safetensors (or shards)       the fp32 master weights, only when the training dtype is lower
        reference.safetensors (or shards)    the frozen KL / DPO reference, only when the learner keeps one
        rng/rank{r}.safetensors              torch CPU/CUDA generator states, Python + NumPy states, per rank
        trainer_state.json                   step, scheduler state, world size
    mosaic_checkpoint.json                   the manifest, written LAST: a checkpoint without it is incomplete

So `AutoModelForCausalLM.from_pretrained(ckpt)` / `AutoTokenizer.from_pretrained(ckpt)` / vLLM load the top level
alone, and a loader that reads every top-level `*.safetensors` never picks up optimizer or reference tensors.

Commit: a local checkpoint is written to `<path>.partial` and renamed; on S3 (no rename) the manifest is the
commit marker, deleted first when a prefix is overwritten or pruned (`prune_checkpoints`). Restore is strict: every
weights file (each shard, through its index) must hold exactly the model's tensors. Reading uses safetensors and
JSON only, never pickle. Files go through `mosaic_ray.storage.filesystem_for` (S3: `storage.s3_filesystem`, the
project's one S3 builder): credentials from the standard AWS chain (environment, instance role), never logged;
the endpoint from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mosaic_ray.config import CheckpointConfig
from mosaic_ray.storage import filesystem_for

MANIFEST = "mosaic_checkpoint.json"
FORMAT_VERSION = 2
"""2: model files only at the top, exact-resume state in `trainer_state/` (1 kept optimizer and reference
tensors next to the weights)."""
STATE_DIR = "trainer_state"
MAX_SHARD_BYTES = CheckpointConfig.max_shard_mb << 20
"""Default weights shard size (`checkpoint.max_shard_mb`)."""
ITERATION_DIR = re.compile(r"iter-(-?\d+)")
"""An iteration checkpoint's directory name (`iter-00009`; the warm start's is `iter--0001`)."""


# ------------------------------------------------------------------------------------------------ storage


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


class CheckpointWriter:
    """Where one rank writes its files for one checkpoint; `commit` (rank 0, after a barrier) finalises it."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.final = filesystem_for(self.uri)
        self.target = self.final if is_remote(self.uri) else self.final + ".partial"

    def prepare(self) -> None:
        """Rank 0, before anyone writes: remove what is at the target (a stale partial dir; on S3 an overwritten
        checkpoint, its manifest first), so no file of an older checkpoint stays next to the new ones."""
        if self.fs.exists(self.target):
            remove_checkpoint(self.fs, self.target)
        self.fs.makedirs(self.target, exist_ok=True)

    def put_bytes(self, name: str, data: bytes) -> None:
        path = f"{self.target}/{name}"
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def put_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        self.put_bytes(name, st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata))

    def put_json(self, name: str, obj: Any) -> None:
        self.put_bytes(name, json.dumps(obj, indent=1).encode())

    def put_dir_files(self, src_dir: str) -> list[str]:
        """Copy every file of a local directory (what a `save_pretrained` wrote) to the top level; their names."""
        copied = []
        for p in sorted(Path(src_dir).iterdir()):
            if p.is_file():
                self.put_bytes(p.name, p.read_bytes())
                copied.append(p.name)
        return copied

    def commit(self, manifest: dict[str, Any]) -> None:
        """Rank 0: write the manifest last; locally, swap the partial directory into place."""
        self.put_json(MANIFEST, manifest)
        if is_remote(self.uri):
            return
        if self.fs.exists(self.final):
            old = self.final + ".old"
            if self.fs.exists(old):
                self.fs.rm(old, recursive=True)
            os.replace(self.final, old)
            os.replace(self.target, self.final)
            self.fs.rm(old, recursive=True)
        else:
            os.replace(self.target, self.final)


class CheckpointReader:
    """Reads a committed checkpoint (manifest present) with safetensors/JSON only."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem_for(self.uri)
        if not self.fs.exists(f"{self.root}/{MANIFEST}"):
            raise FileNotFoundError(f"checkpoint {uri}: no {MANIFEST} (missing or incomplete checkpoint)")
        self.manifest = self.json(MANIFEST)
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"checkpoint {uri}: format_version {version!r} in {MANIFEST}, but this code reads only "
                             f"format_version {FORMAT_VERSION} (model files at the top, resume state in "
                             f"{STATE_DIR}/); resume it with the mosaic-ray version that wrote it")

    def exists(self, name: str) -> bool:
        return self.fs.exists(f"{self.root}/{name}")

    def bytes(self, name: str) -> bytes:
        with self.fs.open(f"{self.root}/{name}", "rb") as f:
            return f.read()

    def json(self, name: str) -> Any:
        return json.loads(self.bytes(name))

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return st_load(self.bytes(name))

    def tensors_with_metadata(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from safetensors import safe_open

        with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
            tmp.write(self.bytes(name))
            tmp.flush()
            with safe_open(tmp.name, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 - not a dict


# ------------------------------------------------------------------------------------ optimizer (no pickle)


def flatten_optimizer_state(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint.state_dict) → tensors + JSON.

    Tensors are stored as `<param name>::<state key>`; non-tensor state values and param groups go to JSON.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pname, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pname}::{key}"] = value
            else:
                scalars.setdefault(pname, {})[key] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        pname, skey = key.rsplit("::", 1)
        state.setdefault(pname, {})[skey] = value
    for pname, extra in meta["scalars"].items():
        state.setdefault(pname, {}).update(extra)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# -------------------------------------------------------------------------------------------- RNG states


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's generator states: tensors (uint8 / int64) + JSON metadata (no pickle)."""
    import numpy as np

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py_version, py_state, py_gauss = random.getstate()
    tensors["python_state"] = torch.tensor(py_state, dtype=torch.int64)
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_keys.astype(np.int64))
    meta = {"python": json.dumps([py_version, py_gauss]),
            "numpy": json.dumps([np_name, int(np_pos), int(np_has_gauss), float(np_gauss)])}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    import numpy as np

    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    py_version, py_gauss = json.loads(meta["python"])
    random.setstate((py_version, tuple(int(x) for x in tensors["python_state"].tolist()), py_gauss))
    np_name, np_pos, np_has_gauss, np_gauss = json.loads(meta["numpy"])
    np.random.set_state((np_name, tensors["numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))


# ------------------------------------------------------------------------------------- learner save/restore


def _opts(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def save_learner(learner, uri: str, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Collective: every rank calls it. Rank 0 writes the model directory and the resume state, each rank its RNG;
    then rank 0 commits. Weights above `max_shard_bytes` are split into shards with an index."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    writer = CheckpointWriter(uri)
    if learner.rank == 0:
        writer.prepare()
    learner.barrier()
    master = learner.get_weights()
    reference = learner.reference_weights() if learner.reference is not None else {}   # collective under FSDP2
    optim = get_optimizer_state_dict(learner.lm, learner.optimizer, options=_opts(cpu_offload=True))
    rng_tensors, rng_meta = rng_state()
    writer.put_tensors(f"{STATE_DIR}/rng/rank{learner.rank}.safetensors", rng_tensors, rng_meta)
    manifest: dict[str, Any] = {}
    if learner.rank == 0:
        manifest = _write_rank0(learner, writer, master, reference, optim, max_shard_bytes)
    learner.barrier()
    if learner.rank == 0:
        writer.commit(manifest)
    learner.barrier()
    return uri


def _write_rank0(learner, writer: CheckpointWriter, master: dict[str, torch.Tensor],
                 reference: dict[str, torch.Tensor], optim: dict[str, Any], max_shard_bytes: int) -> dict[str, Any]:
    """Rank 0's files: the HF model directory (weights in the training dtype), then the resume state; returns the
    manifest. The fp32 master weights are kept in `trainer_state/` only when the exported weights are lower."""
    dtype = learner.train_dtype
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in master.items()}
    has_master = any(weights[k].dtype != v.dtype for k, v in master.items())
    hf_files = _put_hf_files(learner, writer, dtype)
    weight_files = write_weights(writer, "model", weights, max_shard_bytes)
    del weights
    if has_master:
        write_weights(writer, f"{STATE_DIR}/master", master, max_shard_bytes)
    if reference:
        write_weights(writer, f"{STATE_DIR}/reference", reference, max_shard_bytes)
    opt_tensors, opt_meta = flatten_optimizer_state(optim)
    writer.put_tensors(f"{STATE_DIR}/optimizer.safetensors", opt_tensors)
    writer.put_json(f"{STATE_DIR}/optimizer.json", opt_meta)
    writer.put_json(f"{STATE_DIR}/trainer_state.json", {"step": learner.step, "world_size": learner.world_size,
                                                         "scheduler": learner.scheduler.state_dict()})
    return {"format_version": FORMAT_VERSION, "step": learner.step, "world_size": learner.world_size,
            "dtype": str(dtype).removeprefix("torch."), "files": sorted(hf_files + weight_files),
            "has_master": has_master, "has_reference": bool(reference)}


def _put_hf_files(learner, writer: CheckpointWriter, dtype: torch.dtype) -> list[str]:
    """config.json (its dtype set to the saved weights'), generation_config.json and the learner's tokenizer with
    its chat template, as `save_pretrained` writes them, whatever the source model directory held."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(learner.model_path)   # as given: not the learner's use_cache=False copy
    config.dtype = dtype
    if os.path.isfile(os.path.join(learner.model_path, "generation_config.json")):
        generation = GenerationConfig.from_pretrained(learner.model_path)
    else:
        generation = GenerationConfig.from_model_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        from mosaic_ray.protocol import apply_chat_template

        apply_chat_template(AutoTokenizer.from_pretrained(learner.model_path), learner.chat_template).save_pretrained(tmp)
        return writer.put_dir_files(tmp)


def write_weights(writer: CheckpointWriter, stem: str, tensors: dict[str, torch.Tensor],
                  max_shard_bytes: int) -> list[str]:
    """`{stem}.safetensors`, or above `max_shard_bytes` `{stem}-0000k-of-0000n.safetensors` + `{stem}.safetensors.
    index.json` (the `save_pretrained` format; shard names in the index are relative to its folder). Returns the
    names written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    folder, _, base = stem.rpartition("/")
    prefix = f"{folder}/" if folder else ""
    split = split_torch_state_dict_into_shards(tensors, filename_pattern=base + "{suffix}.safetensors",
                                               max_shard_size=max_shard_bytes)
    written = []
    for filename, names in split.filename_to_tensors.items():
        writer.put_tensors(prefix + filename, {n: tensors[n] for n in names}, {"format": "pt"})
        written.append(prefix + filename)
    if split.is_sharded:
        writer.put_json(f"{stem}.safetensors.index.json",
                        {"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))})
        written.append(f"{stem}.safetensors.index.json")
    return written


def _matching(model: torch.nn.Module, reader: CheckpointReader, stem: str) -> dict[str, torch.Tensor]:
    """The weights saved as `stem` (one file, or every shard through its index), which must hold exactly the
    model's state dict: a partial or foreign file would load silently with `strict=False`. Only a tied
    `lm_head.weight` may be absent (save_pretrained omits it; tying restores it). Each shard must hold exactly the
    keys its index gives it. ValueError names the file and the first missing or unexpected key."""
    from mosaic_ray.learners.learner import hf_name

    expected = {hf_name(k) for k in model.state_dict()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    index = f"{stem}.safetensors.index.json"
    if not reader.exists(index):
        tensors = reader.tensors(f"{stem}.safetensors")
        _same_keys(reader, f"{stem}.safetensors", set(tensors), expected, "not a checkpoint of this model")
        return tensors
    weight_map: dict[str, str] = reader.json(index)["weight_map"]
    folder = stem.rpartition("/")[0]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or shard.startswith("."):
            raise ValueError(f"checkpoint {reader.uri}/{index}: shard name {shard!r} leaves the checkpoint's folder")
        name = f"{folder}/{shard}" if folder else shard
        part = reader.tensors(name)
        _same_keys(reader, name, set(part), {k for k, f in weight_map.items() if f == shard}, f"does not match {index}")
        tensors.update(part)
    _same_keys(reader, index, set(weight_map), expected, "not a checkpoint of this model")
    return tensors


def _same_keys(reader: CheckpointReader, name: str, found: set[str], expected: set[str], why: str) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        which = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise ValueError(f"checkpoint {reader.uri}/{name}: {which} ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected): {why}")


def restore_learner(learner, uri: str) -> int:
    """Collective: every rank reads the checkpoint and loads full state dicts (sharded locally under FSDP2): the
    fp32 master weights (`trainer_state/master`, else the top-level model), optimizer, reference, scheduler, step
    and this rank's RNG."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    reader = CheckpointReader(uri)
    saved_world = reader.manifest["world_size"]
    if saved_world != learner.world_size:
        raise ValueError(f"checkpoint {uri}: saved by {saved_world} learner(s), restoring into {learner.world_size}; "
                         f"exact resume needs the same learner.num_learners (RNG streams are per rank)")
    weights = f"{STATE_DIR}/master" if reader.manifest["has_master"] else "model"
    set_model_state_dict(learner.lm, _matching(learner.lm, reader, weights), options=_opts(strict=False))
    optim = unflatten_optimizer_state(reader.tensors(f"{STATE_DIR}/optimizer.safetensors"),
                                      reader.json(f"{STATE_DIR}/optimizer.json"))
    set_optimizer_state_dict(learner.lm, learner.optimizer, optim, options=_opts())
    if reader.manifest["has_reference"]:
        # the reference has the policy's names and shapes; each rank loads its own shards
        learner.load_reference(_matching(learner.lm, reader, f"{STATE_DIR}/reference"))
    elif learner.reference is not None:
        # saved without a KL reference (kl_coef was 0, e.g. a warm start forked into a KL run): anchor to the
        # restored policy, not to the base model this learner was built from
        learner.reset_reference()
    state = reader.json(f"{STATE_DIR}/trainer_state.json")
    learner.scheduler.load_state_dict(state["scheduler"])
    learner.step = int(state["step"])
    set_rng_state(*reader.tensors_with_metadata(f"{STATE_DIR}/rng/rank{learner.rank}.safetensors"))
    learner.barrier()
    return learner.step


# ------------------------------------------------------------------------------------------------ retention


def remove_checkpoint(fs, path: str) -> None:
    """Delete one checkpoint directory, its manifest first: a half-deleted checkpoint never looks committed."""
    if fs.exists(f"{path}/{MANIFEST}"):
        fs.rm(f"{path}/{MANIFEST}")
    fs.rm(path, recursive=True)


def prune_checkpoints(root_uri: str, keep_last: int, keep: Iterable[str] = ()) -> list[str]:
    """Under `root_uri` (a run's `checkpoints/`, local or s3://), delete committed `iter-N` checkpoints except the
    newest `keep_last` by N and those named in `keep` (names or paths ending in them, e.g. `checkpoints/iter--0001`).
    Directories without a manifest (uncommitted, `.partial`) are left alone. Returns the deleted names, oldest
    first."""
    if keep_last < 0:
        raise ValueError(f"prune_checkpoints({root_uri!r}): keep_last must be >= 0, got {keep_last}")
    fs, root = filesystem_for(root_uri.rstrip("/"))
    fs.invalidate_cache()
    if not fs.exists(root):
        return []
    committed: dict[str, int] = {}
    for path in fs.ls(root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        match = ITERATION_DIR.fullmatch(name)
        if match and fs.exists(f"{root}/{name}/{MANIFEST}"):
            committed[name] = int(match.group(1))
    newest_first = sorted(committed, key=committed.__getitem__, reverse=True)
    kept = set(newest_first[:keep_last]) | {k.rstrip("/").rsplit("/", 1)[-1] for k in keep}
    doomed = [name for name in reversed(newest_first) if name not in kept]
    for name in doomed:
        remove_checkpoint(fs, f"{root}/{name}")
    return doomed
