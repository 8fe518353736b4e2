"""Process hygiene used everywhere: one torch thread per process, free ports, processes stopped by PID.

Never call `ray stop`: it kills every Ray process on the host. Processes started with a marker environment
variable (a test's or benchmark's private Ray head, `mosaic_ray.benchmarks.cluster.RayHead`) are ended by
`stop_marked_processes`, which stops exactly the processes that inherited it.
"""

from __future__ import annotations

import os
import random
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


RAY_DEFAULT_WORKER_PORTS = range(10002, 20000)
"""Where a Ray node started without `--min/max-worker-port` binds its workers."""

_handed_out: set[int] = set()
_rng = random.SystemRandom()
"""Not the `random` module's: runs seed that one, and two processes seeded alike would pick the same ports."""


def ephemeral_ports() -> range:
    """The ports this host hands out to outgoing connections and `bind(port 0)` (Linux: 32768–60999 by default)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return range(32768, 61000)
    return range(low, high + 1)


def quiet_ports() -> range:
    """Ports that nothing takes unasked: above Ray's default worker ports, below the ephemeral range. A port picked
    here stays free until its user binds it; one the OS picks (port 0) can be taken meanwhile by any process's
    outgoing connection: a private Ray cluster opens hundreds while it starts, and a CI run lost a Serve proxy
    (port 37701) and a raylet (34801) to them."""
    return range(RAY_DEFAULT_WORKER_PORTS.stop, max(ephemeral_ports().start, RAY_DEFAULT_WORKER_PORTS.stop))


def _halves() -> tuple[range, range]:
    """The quiet ports for single ports and for blocks. Apart because a block may hold a Ray node's worker ports,
    which its workers bind one by one as they start: a single port that another process picked inside such a
    block while it was still unbound could be taken from under it (a CI run lost a learner's weight-sync port
    that way)."""
    quiet = quiet_ports()
    mid = quiet.start + len(quiet) // 2
    return range(quiet.start, mid), range(mid, quiet.stop)


def free_port(host: str = "127.0.0.1", ports: range | None = None) -> int:
    """A port free right now on `host`, from `ports` (default: the lower half of `quiet_ports()`, from a random
    start so that processes choosing at once rarely collide) and never one this process handed out before.
    Falls back to a port the OS picks where the host leaves no quiet range."""
    if ports is None:
        if len(quiet_ports()) < 2000:
            with socket.socket() as s:
                s.bind((host, 0))
                return s.getsockname()[1]
        ports = _shuffled_start(_halves()[0], 1)
    return free_ports(1, host, ports)


def free_ports(n: int, host: str = "127.0.0.1", ports: range | list[int] | None = None) -> int:
    """The first of `n` consecutive ports, all free right now on `host` and never handed out by this process
    before, tried from each start in `ports` (default: the upper half of `quiet_ports()`, from a random start)."""
    quiet_blocks = _halves()[1]
    starts = _shuffled_start(quiet_blocks, n) if ports is None else list(ports)[:max(len(ports) - n + 1, 0)]
    for base in starts:
        if all(p not in _handed_out and _bindable(host, p) for p in range(base, base + n)):
            _handed_out.update(range(base, base + n))
            return base
    where = f"{min(starts)}..{max(starts) + n - 1}" if starts else f"{ports or quiet_blocks} (too few ports)"
    raise RuntimeError(f"no {n} free consecutive port(s) on {host} in {where}")


def _shuffled_start(ports: range, n: int) -> list[int]:
    """The starts of `n`-port blocks inside `ports`, beginning at a random one and wrapping around."""
    starts = ports[:max(len(ports) - n + 1, 0)]
    if not starts:
        return []
    k = _rng.randrange(len(starts))
    return [*starts[k:], *starts[:k]]


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


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
