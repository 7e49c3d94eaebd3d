"""Test helpers: async scenarios run with asyncio.run (no pytest-asyncio)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T], timeout_s: float = 20.0) -> T:
    """Runs coro on a fresh event loop, failing it after timeout_s."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


def run_in_thread(
    body: Callable[[], Coroutine[Any, Any, None]], what: str, join_s: float = 20.0
) -> None:
    """asyncio.run(body()) in a thread of its own, which must end within join_s.

    For a scenario that might hang for good (a stop that never ends): asyncio.run's own
    cleanup would hang with it, so only a thread can be given up on. Fails with
    "<what> hung", or with the scenario's own error."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(body())
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(join_s)
    assert not t.is_alive(), f"{what} hung"
    assert not errors, errors
