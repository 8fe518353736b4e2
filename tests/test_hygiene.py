"""Ports for private clusters and servers: picked where no other process takes them unasked (a CI run lost a Serve
proxy and a raylet to ports the OS had handed out to outgoing connections meanwhile)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from mosaic_ray.hygiene import RAY_DEFAULT_WORKER_PORTS, ephemeral_ports, free_port, free_ports, quiet_ports


def test_ports_avoid_the_ephemeral_range_rays_default_worker_ports_and_each_other():
    quiet = quiet_ports()
    if len(quiet) < 2000:
        pytest.skip(f"this host's ephemeral range {ephemeral_ports()} leaves no quiet range above Ray's worker ports")
    singles = [free_port() for _ in range(50)]
    assert len(set(singles)) == 50  # never handed out twice, though none of them is bound yet
    blocks = [set(range(base, base + 61)) for base in (free_ports(61), free_ports(61))]
    assert not blocks[0] & blocks[1]
    for port in (*singles, *blocks[0], *blocks[1]):
        assert port in quiet and port not in ephemeral_ports() and port not in RAY_DEFAULT_WORKER_PORTS
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    # a block may be a Ray node's worker ports, bound one by one later: no single port is ever picked inside one
    assert max(singles) < min(min(b) for b in blocks)


def test_a_port_in_use_is_skipped_and_a_range_without_one_is_named():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"no 1 free consecutive port\(s\) on 127.0.0.1 in {port}..{port}$"):
            free_port(ports=range(port, port + 1))
        assert free_port(ports=range(port - 5, port + 5)) != port


def test_processes_that_seed_random_alike_still_pick_different_ports():
    # a learner seeds `random` with its config's seed: two such processes once picked the same weight-sync port
    code = "import random; random.seed(0); from mosaic_ray.hygiene import free_port; print([free_port() for _ in range(5)])"
    picks = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
             for _ in range(2)]
    assert picks[0] != picks[1], picks
