"""Port numbers for servers a test starts on a fixed port (not port 0)."""

from __future__ import annotations

import random
import socket

_rng = random.SystemRandom()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, below the kernel's ephemeral range.

    A port the kernel handed out for a port-0 bind and took back can be handed
    out again to any process's port-0 bind (a worker's, Valkey's) before the
    test's server binds it by number: "Address already in use", seen in CI.
    Below the ephemeral range no port-0 bind can take it.
    """
    high = _ephemeral_low()
    low = max(1024, high - 12000)
    if high - low >= 1000:
        for _ in range(100):
            port = _rng.randrange(low, high)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room below: any free one
        s.bind((host, 0))
        return int(s.getsockname()[1])
