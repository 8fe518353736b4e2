"""Process hygiene used everywhere: one torch thread per process, free ports, processes stopped by PID.

Never call `ray stop`: it kills every Ray process on the host. Processes started with a marker environment
variable (a test's or benchmark's private Ray head, `mosaic_ray.benchmarks.cluster.RayHead`) are ended by
`stop_marked_processes`, which stops exactly the processes that inherited it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def set_torch_threads(n: int = 1) -> None:
    """Pin torch (and BLAS) to `n` threads. On 2 busy cores, 2 threads per process ran 5–25× slower."""
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    if "torch" in sys.modules or _torch_importable():
        import torch

        torch.set_num_threads(n)
        if torch.get_num_interop_threads() != n:
            try:
                torch.set_num_interop_threads(n)
            except RuntimeError:  # interop threads can only be set before any parallel work
                pass


def _torch_importable() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("torch") is not None
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now on `host` (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def marked_pids(marker: str) -> list[int]:
    """PIDs of processes whose environment contains `marker=` (they, or an ancestor, were started with it)."""
    needle = f"{marker}=".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if needle in env:
            pids.append(int(proc.name))
    return pids


def stop_marked_processes(marker: str, grace_s: float = 5.0) -> int:
    """SIGTERM every process carrying `marker`, wait up to `grace_s`, then SIGKILL the rest. Returns the count."""
    pids = marked_pids(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and marked_pids(marker):
        time.sleep(0.2)
    for pid in marked_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)
