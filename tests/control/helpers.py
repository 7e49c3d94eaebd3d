"""Test helpers: async scenarios run with asyncio.run (no pytest-asyncio)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T], timeout_s: float = 20.0) -> T:
    """Runs coro on a fresh event loop, failing it after timeout_s."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())
