"""Keeps the services of ``disagg up`` running: a dead one is restarted, not fatal.

Lifecycle of one supervised service:

1. ``add``: spawned in the ``ServiceGroup`` (own session, output pumped,
   parent-death signal) and remembered with its argv and environment.
2. It exits, for whatever reason (crash, SIGKILL, OOM): ``poll`` notices,
   logs the exit and schedules a restart after a backoff that doubles with each
   restart inside the window (``backoff_s`` .. ``max_backoff_s``).
3. At the due time ``poll`` spawns it again with the same argv: a worker comes
   back on a new port under a new id (the old id leaves the registry by its
   heartbeat TTL), a scheduler on the same port. ``on_restart`` is told, so the
   count reaches the log and Redis (``disagg:service_restarts`` on /metrics).
4. More than ``max_restarts`` exits within ``window_s`` is a crash loop: ``poll``
   returns a message and the launcher stops the whole system, since a service
   that cannot stay up would otherwise restart forever behind a healthy front.

The rest keep serving throughout: the scheduler migrates streams off a dead
decode worker and routes around a dead prefill worker; a dead scheduler loses
only its own streams (clients retry ``UNAVAILABLE``).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

from disagg.runtime.procs import ExitedService, ServiceGroup


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 0.5  # delay before the first restart; doubled per recent restart
    max_backoff_s: float = 10.0  # cap of that delay
    window_s: float = 60.0  # exits counted over this many seconds
    max_restarts: int = 5  # more exits than this within window_s: a crash loop, give up

    def __post_init__(self) -> None:
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("need 0 <= backoff_s <= max_backoff_s")
        if self.window_s <= 0 or self.max_restarts < 0:
            raise ValueError("window_s must be > 0 and max_restarts >= 0")

    def delay(self, recent_exits: int) -> float:
        """Backoff before the restart that follows the recent_exits-th exit (1-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, recent_exits - 1))


@dataclass
class _Service:
    argv: list[str]
    env: dict[str, str] | None
    exits: deque[float] = field(default_factory=deque)  # monotonic times of recent exits
    restarts: int = 0  # total, for the log and metrics
    due: float | None = None  # when the pending restart is due; None = running


class Supervisor:
    """Restarts exited services of one ServiceGroup. Not thread-safe: use from one thread."""

    def __init__(
        self,
        group: ServiceGroup,
        policy: RestartPolicy | None = None,
        on_restart: Callable[[str, int], None] | None = None,
        out: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._group = group
        self._policy = policy or RestartPolicy()
        self._on_restart = on_restart
        self._out = out if out is not None else sys.stderr
        self._clock = clock
        self._services: dict[str, _Service] = {}

    def add(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Spawns name and keeps it running from now on."""
        service = _Service(list(argv), None if env is None else dict(env))
        self._services[name] = service
        self._group.spawn(name, service.argv, env=service.env)

    def restarts(self, name: str) -> int:
        return self._services[name].restarts

    def poll(self) -> str | None:
        """Handles exits and due restarts; a message when a service is in a crash loop."""
        while (exited := self._group.wait_any(timeout_s=0)) is not None:
            verdict = self._on_exit(exited)
            if verdict is not None:
                return verdict
        now = self._clock()
        for name, service in self._services.items():
            if service.due is not None and now >= service.due:
                self._restart(name, service)
        return None

    def _on_exit(self, exited: ExitedService) -> str | None:
        service = self._services.get(exited.name)
        if service is None:  # not supervised
            return f"{exited.name} exited with code {exited.returncode}"
        now = self._clock()
        service.exits.append(now)
        while service.exits and now - service.exits[0] > self._policy.window_s:
            service.exits.popleft()
        recent = len(service.exits)
        if recent > self._policy.max_restarts:
            tail = "\n".join(self._group.tail(exited.name)[-10:])
            return (
                f"{exited.name} exited {recent} times within {self._policy.window_s:g}s "
                f"(last code {exited.returncode}): crash loop, stopping\n{tail}"
            )
        delay = self._policy.delay(recent)
        service.due = now + delay
        self._say(
            f"{exited.name} exited with code {exited.returncode}; "
            f"restarting in {delay:g}s (restart {service.restarts + 1})"
        )
        return None

    def _restart(self, name: str, service: _Service) -> None:
        service.due = None
        service.restarts += 1
        self._group.spawn(name, service.argv, env=service.env)
        self._say(f"{name} restarted (restart {service.restarts})")
        if self._on_restart is not None:
            self._on_restart(name, service.restarts)

    def _say(self, line: str) -> None:
        self._out.write(f"disagg: {line}\n")
        self._out.flush()
