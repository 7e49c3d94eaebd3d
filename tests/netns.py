"""Network namespaces as hosts: a bridge namespace plus one namespace per host.

    ns A (10.77.0.1)       ns B (10.77.0.2)       ns C (10.77.0.3)
          \\___ veth ________ bridge (own ns) ________ veth ___/

Each host namespace is joined to the bridge by a veth pair; the 10.77.0.0/24
addresses exist only inside these namespaces. ``link_down(host)`` /
``link_up(host)`` cut and restore one host's link (a partition). The
``netns`` fixture (import ``netns_fixture`` into the test module) deletes every
namespace, and with it every veth and the bridge, at teardown. Needs root for
``ip netns``; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SUBNET = "10.77.0"
HOSTS = {"a": f"{SUBNET}.1", "b": f"{SUBNET}.2", "c": f"{SUBNET}.3"}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Netns:
    """A bridge namespace plus one namespace per host, named after this process."""

    def __init__(self) -> None:
        tag = f"dg{os.getpid() % 100000}"
        self.tag = tag
        self.ns = {h: f"{tag}-{h}" for h in HOSTS}
        self.bridge_ns = f"{tag}-br"

    def up(self) -> None:
        _ip("netns", "add", self.bridge_ns)
        self.exec_ip(self.bridge_ns, "link", "add", "br0", "type", "bridge")
        self.exec_ip(self.bridge_ns, "link", "set", "br0", "up")
        for host, addr in HOSTS.items():
            ns, inner, outer = self.ns[host], self.veth(host), f"{self.tag}{host}1"
            _ip("netns", "add", ns)
            _ip("link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", self.bridge_ns)  # fmt: skip
            self.exec_ip(self.bridge_ns, "link", "set", outer, "master", "br0", "up")
            self.exec_ip(ns, "addr", "add", f"{addr}/24", "dev", inner)
            self.exec_ip(ns, "link", "set", inner, "up")
            self.exec_ip(ns, "link", "set", "lo", "up")

    def veth(self, host: str) -> str:
        """The host's end of its veth pair (inside the host's namespace)."""
        return f"{self.tag}{host}0"

    def link_down(self, host: str) -> None:
        """Partitions host from every other host: its veth goes down."""
        self.exec_ip(self.ns[host], "link", "set", self.veth(host), "down")

    def link_up(self, host: str) -> None:
        self.exec_ip(self.ns[host], "link", "set", self.veth(host), "up")

    def exec_ip(self, ns: str, *args: str) -> None:
        _ip("-n", ns, *args)

    def down(self) -> None:
        for ns in [*self.ns.values(), self.bridge_ns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)

    def listed(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
        return [ln.split()[0] for ln in out.stdout.splitlines() if ln.startswith(self.tag + "-")]

    def argv(self, host: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *argv]

    def popen(
        self, host: str, argv: list[str], log: Path, env: dict[str, str], cwd: Path
    ) -> subprocess.Popen[bytes]:
        """argv inside host's namespace, in its own session, stdout+stderr to log."""
        with open(log, "wb") as out:
            return subprocess.Popen(
                self.argv(host, *argv),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


def _netns_permitted() -> str | None:
    """None if `ip netns` works here, else why not."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"dgprobe{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"`ip netns add` not permitted: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


@pytest.fixture(name="netns")
def netns_fixture() -> Iterator[Netns]:
    """A fresh Netns, up; import ``netns_fixture`` into a test module to use ``netns``."""
    reason = _netns_permitted()
    if reason is not None:
        pytest.skip(reason)
    net = Netns()
    try:
        net.up()
        yield net
    finally:
        net.down()
    assert net.listed() == [], "network namespaces left behind"
