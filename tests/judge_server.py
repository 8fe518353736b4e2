"""A real OpenAI-compatible judge endpoint for tests: the project's server (`openai_server`, chat mode) serving the
shipped tiny base model in a subprocess on 127.0.0.1, requiring an API key read from an environment variable."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def judge_server(key_env: str, key: str) -> Iterator[str]:
    """Yields the base URL (`http://127.0.0.1:PORT/v1`); the server is stopped by PID at the end."""
    from mosaic_ray.models.base import shipped_base

    port = free_port()
    env = {**os.environ, key_env: key, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mosaic_ray.actors.engines.openai_server", "--model",
                             str(shipped_base()), "--port", str(port), "--api-key-env", key_env], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=5)
            except urllib.error.HTTPError as e:  # 401: up, and asking for the key
                if e.code == 401:
                    break
                raise
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"judge server did not start: {proc.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
