"""Block arithmetic shared by every layer that counts KV blocks: how many blocks a
token count needs, and the chained content hashes that key the prefix cache.

The hashes are stable across processes (blake2b, not Python's salted ``hash``),
so the engine's prefix cache, the mock engine and the scheduler's prefix index
all name the same block the same way. A *cache salt* (a tenant's, see
``services.scheduler.auth.cache_salt``) starts the chain: prompts of different
salts never share a block, so one tenant cannot learn from ``cached_tokens``
or timing whether another sent a prefix.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold num_tokens tokens (ceiling division)."""
    return -(-num_tokens // block_size)


def block_hash(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Content hash of a full block: chained over its parent's hash and its token ids."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0")
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def prompt_hashes(
    prompt: Sequence[int], block_size: int, limit: int = 512, salt: bytes = b""
) -> list[bytes]:
    """Chained hashes of the prompt's full blocks (at most ``limit`` of them), the chain
    started from ``salt`` (empty: unsalted)."""
    out: list[bytes] = []
    parent: bytes | None = salt or None
    n = min(len(prompt) // block_size, limit)
    for i in range(n):
        parent = block_hash(parent, prompt[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out
