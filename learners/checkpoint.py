"""Checkpoints: an HF-format model directory plus everything an exact resume needs, never pickled.

Layout under `uri` (a local path or `s3://bucket/prefix`):

    config.json, generation_config.json, model.safetensors, tokenizer files   ← `from_pretrained` / vLLM load this
    optimizer.safetensors + optimizer.json     AdamW moments per parameter (by HF name) + param-group hyper-parameters
    reference.safetensors                      frozen reference policy (only when the learner keeps one)
    rng/rank{r}.safetensors                    torch CPU/CUDA generator states (uint8), Python + NumPy states
    trainer_state.json                         step, scheduler state, version
    mosaic_checkpoint.json                     the manifest, written LAST: a checkpoint without it is incomplete

Commit: a local checkpoint is written to `<path>.partial` and renamed; on S3 (no rename) the manifest is the
commit marker and is deleted first when a prefix is overwritten. Reading uses safetensors and JSON only.
S3 credentials come from the standard AWS environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL`, `AWS_REGION`) and are never logged.
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MANIFEST = "mosaic_checkpoint.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "chat_template*",
                   "added_tokens.json", "*.tiktoken")


# ------------------------------------------------------------------------------------------------ storage


def filesystem(uri: str):
    """(fsspec filesystem, path) for a local path or s3:// URI; S3 endpoint from AWS_ENDPOINT_URL."""
    import fsspec

    if uri.startswith("s3://"):
        options: dict[str, Any] = {}
        if os.environ.get("AWS_ENDPOINT_URL"):
            options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
        return fsspec.core.url_to_fs(uri, **options)
    return fsspec.core.url_to_fs(os.path.abspath(uri))


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


class CheckpointWriter:
    """Where one rank writes its files for one checkpoint; `commit` (rank 0, after a barrier) finalises it."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.final = filesystem(self.uri)
        self.target = self.final if is_remote(self.uri) else self.final + ".partial"

    def prepare(self) -> None:
        """Rank 0, before anyone writes: clear a stale partial dir / invalidate an overwritten S3 manifest."""
        if is_remote(self.uri):
            if self.fs.exists(f"{self.target}/{MANIFEST}"):
                self.fs.rm(f"{self.target}/{MANIFEST}")
        elif self.fs.exists(self.target):
            self.fs.rm(self.target, recursive=True)
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

    def put_dir_files(self, src_dir: str, patterns: tuple[str, ...]) -> list[str]:
        """Copy files of a local source directory whose names match `patterns` (tokenizer files)."""
        copied = []
        for p in sorted(Path(src_dir).iterdir()):
            if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns):
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
        self.fs, self.root = filesystem(self.uri)
        if not self.fs.exists(f"{self.root}/{MANIFEST}"):
            raise FileNotFoundError(f"checkpoint {uri}: no {MANIFEST} (missing or incomplete checkpoint)")
        self.manifest = self.json(MANIFEST)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"checkpoint {uri}: format_version {self.manifest.get('format_version')!r}, "
                             f"this code reads {FORMAT_VERSION}")

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


def save_learner(learner, uri: str) -> str:
    """Collective: every rank calls it. Rank 0 writes model/optimizer/state, each rank its RNG; then commit."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    writer = CheckpointWriter(uri)
    if learner.rank == 0:
        writer.prepare()
    learner.barrier()
    weights = learner.get_weights()
    reference = learner.reference_weights() if learner.reference is not None else {}   # collective under FSDP2
    optim = get_optimizer_state_dict(learner.lm, learner.optimizer, options=_opts(cpu_offload=True))
    rng_tensors, rng_meta = rng_state()
    writer.put_tensors(f"rng/rank{learner.rank}.safetensors", rng_tensors, rng_meta)
    if learner.rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            learner.lm.config.save_pretrained(tmp)
            if getattr(learner.lm, "generation_config", None) is not None:
                learner.lm.generation_config.save_pretrained(tmp)
            writer.put_dir_files(tmp, ("config.json", "generation_config.json"))
        writer.put_tensors("model.safetensors", weights, {"format": "pt"})
        tokenizer_files = (writer.put_dir_files(learner.model_path, TOKENIZER_FILES)
                           if os.path.isdir(learner.model_path) else [])
        opt_tensors, opt_meta = flatten_optimizer_state(optim)
        writer.put_tensors("optimizer.safetensors", opt_tensors)
        writer.put_json("optimizer.json", opt_meta)
        if learner.reference is not None:
            writer.put_tensors("reference.safetensors", reference)
        writer.put_json("trainer_state.json", {"step": learner.step, "scheduler": learner.scheduler.state_dict(),
                                               "world_size": learner.world_size})
    learner.barrier()
    if learner.rank == 0:
        writer.commit({"format_version": FORMAT_VERSION, "step": learner.step, "world_size": learner.world_size,
                       "tokenizer_files": tokenizer_files, "has_reference": learner.reference is not None})
    learner.barrier()
    return uri


def _matching(model: torch.nn.Module, reader: CheckpointReader, name: str) -> dict[str, torch.Tensor]:
    """The tensors of `name`, which must hold exactly the model's state dict: a partial or foreign file would
    load silently with `strict=False`. Only a tied `lm_head.weight` may be absent (save_pretrained omits it;
    tying restores it). ValueError names the file and the first missing or unexpected key."""
    from mosaic_ray.learners.learner import hf_name

    tensors = reader.tensors(name)
    expected = {hf_name(k) for k in model.state_dict()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        which = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise ValueError(f"checkpoint {reader.uri}/{name}: {which} ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected): not a checkpoint of this model")
    return tensors


def restore_learner(learner, uri: str) -> int:
    """Collective: every rank reads the checkpoint and loads full state dicts (sharded locally under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    reader = CheckpointReader(uri)
    saved_world = reader.manifest["world_size"]
    if saved_world != learner.world_size:
        raise ValueError(f"checkpoint {uri}: saved by {saved_world} learner(s), restoring into {learner.world_size}; "
                         f"exact resume needs the same learner.num_learners (RNG streams are per rank)")
    set_model_state_dict(learner.lm, _matching(learner.lm, reader, "model.safetensors"), options=_opts(strict=False))
    optim = unflatten_optimizer_state(reader.tensors("optimizer.safetensors"), reader.json("optimizer.json"))
    set_optimizer_state_dict(learner.lm, learner.optimizer, optim, options=_opts())
    if reader.manifest["has_reference"]:
        # the reference has the policy's names and shapes; each rank loads its own shards
        learner.load_reference(_matching(learner.lm, reader, "reference.safetensors"))
    elif learner.reference is not None:
        # saved without a KL reference (kl_coef was 0, e.g. a warm start forked into a KL run): anchor to the
        # restored policy, not to the base model this learner was built from
        learner.reset_reference()
    state = reader.json("trainer_state.json")
    learner.scheduler.load_state_dict(state["scheduler"])
    learner.step = int(state["step"])
    set_rng_state(*reader.tensors_with_metadata(f"rng/rank{learner.rank}.safetensors"))
    learner.barrier()
    return learner.step
