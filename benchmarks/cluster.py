"""A private `ray start --head` cluster for tests and benchmarks that need a real head (dashboard, job submission,
metrics endpoint, Ray's autoscaler), stopped by PID.

Not part of training: the trainer runs on whatever cluster `ray.init` finds. Never `ray stop` (it kills every Ray
process on the host): every process of this head inherits a marker environment variable, and `RayHead.stop` ends
exactly those (`mosaic_ray.hygiene.stop_marked_processes`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mosaic_ray.hygiene import free_port, free_ports, stop_marked_processes

__all__ = ["RayHead"]


@dataclass
class RayHead:
    """A `ray start --head` cluster with explicit ports and a private temp dir, stopped by PID.

    Used by tests and benchmarks that need a real head (dashboard, job submission, metrics endpoint).
    The venv's bin directory is put first on PATH so job entrypoints find the right Python.
    """

    temp_dir: str
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    num_cpus: int | None = None
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    marker: str = field(default_factory=lambda: f"MOSAIC_RAY_HEAD_{os.getpid()}_{time.time_ns()}")
    port_base: int | None = None
    """Every port from port_base .. port_base + 99 (head +0, dashboard +1, metrics +2, other components +3..+8,
    workers +20..+80) instead of ports the OS picks: for a machine where each user owns a port range."""

    def __post_init__(self) -> None:
        if self.port_base is not None:
            self.port, self.dashboard_port, self.metrics_port = (self.port_base + i for i in range(3))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def process_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env[self.marker] = "1"
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env.setdefault("RAY_AUTH_MODE", "disabled")
        env["RAY_TMPDIR"] = self.temp_dir
        return env

    def start(self, timeout_s: float = 120.0) -> RayHead:
        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        if self.port_base is not None:
            ports = [*(self.port_base + i for i in range(3, 9)), self.port_base + 20]
        else:
            ports = [*(free_port() for _ in range(6)), free_ports(61)]  # free_ports: distinct from the others
        cmd = [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
            f"--port={self.port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={ports[0]}", f"--node-manager-port={ports[1]}",
            f"--object-manager-port={ports[2]}", f"--metrics-export-port={self.metrics_port}",
            f"--dashboard-agent-listen-port={ports[3]}", f"--dashboard-agent-grpc-port={ports[4]}",
            f"--runtime-env-agent-port={ports[5]}", f"--min-worker-port={ports[6]}",
            f"--max-worker-port={ports[6] + 60}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
            *([f"--num-cpus={self.num_cpus}"] if self.num_cpus is not None else []), *self.extra_args,
        ]
        log = Path(self.temp_dir) / "ray-start.log"
        with open(log, "w") as out:
            proc = subprocess.run(cmd, env=self.process_env(), stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout_s, check=False)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed (exit {proc.returncode}); see {log}: {log.read_text()[-800:]}")
        return self

    def stop(self) -> int:
        return stop_marked_processes(self.marker)
