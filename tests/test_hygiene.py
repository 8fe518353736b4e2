"""Ports for private clusters and servers: picked where no other process takes them unasked (a CI run lost a Serve
proxy and a raylet to ports the OS had handed out to outgoing connections meanwhile)."""

from __future__ import annotations

import socket

import pytest

from mosaic_ray.hygiene import RAY_DEFAULT_WORKER_PORTS, ephemeral_ports, free_port, free_ports, quiet_ports


def test_free_ports_avoid_the_ephemeral_range_and_rays_default_worker_ports():
    quiet = quiet_ports()
    if len(quiet) < 1000:
        pytest.skip(f"this host's ephemeral range {ephemeral_ports()} leaves no quiet range above Ray's worker ports")
    picked = [free_port() for _ in range(50)]
    assert len(set(picked)) == 50  # never handed out twice, though none of them is bound yet
    for port in picked:
        assert port in quiet and port not in ephemeral_ports() and port not in RAY_DEFAULT_WORKER_PORTS


def test_a_block_is_free_and_disjoint_from_every_port_handed_out_before():
    singles = {free_port() for _ in range(20)}
    first = set(range(base := free_ports(61), base + 61))
    second = set(range(base := free_ports(61), base + 61))
    assert not first & singles and not second & (first | singles)
    for port in first:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_skipped_and_a_range_without_one_is_named():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"no 1 free consecutive ports on 127.0.0.1 in range\({port}, {port + 1}\)"):
            free_port(ports=range(port, port + 1))
        assert free_port(ports=range(port - 5, port + 5)) != port
