"""Free loopback ports for the servers the tests and the benchmark start (never 6379 or 5000)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

BUS_OFFSET = 10000  # a Cluster node's bus listens on its port + 10000
LOWEST = 10000  # below: well-known and registered services' ports (6379, 5000, …)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ephemeral_range() -> tuple[int, int]:
    """The ports the OS hands out to ``bind(0)`` and to every outgoing connection (Linux's
    ``ip_local_port_range``; its default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free as well, both below the
    ephemeral range: a port from that range can be taken by any process's next connection (or
    ``free_port``) between this check and redis-server's bind, and on a loaded machine with
    other suites running, one was."""
    low, _ = ephemeral_range()
    top = max(LOWEST + 100, low - BUS_OFFSET - 1)
    for _ in range(200):
        port = random.randint(LOWEST, top)
        try:
            for candidate in (port, port + BUS_OFFSET):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")
