"""Incremental detokenization and stop strings.

Text is re-decoded over a short window of recent tokens, so characters built
from several tokens (multi-byte UTF-8, merged pieces, leading spaces) come out
whole: a delta is released only once it no longer ends in U+FFFD.
The window is bounded, so a long output costs linear time: tokens that release
no text would otherwise grow it without end. Special tokens the decode skips
(``ignore_eos`` runs of EOS) never enter it -- the decode is the same without
them, and the context keeps tokens that have text. Bytes that never form a
character (a model emitting garbage) are cut off: past ``_MAX_WINDOW``
tokens, the text up to the last ``_HOLD`` tokens is released as it stands (a
UTF-8 character is at most 4 bytes, so no character still being completed
starts before them), and the window restarts from there.
Stop strings are matched on the text; the tail that could still begin a stop
string is held back, so no part of a stop string is ever emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_WINDOW = 6  # tokens of context for a decode (prompt tokens at first: leading-space rules)
_MAX_WINDOW = 32  # a window this long releases its settled text whatever its end
_HOLD = 4  # tokens kept unreleased by that: a character still being completed lies in them


class IncrementalDetokenizer:
    """Token ids in, final text out; the deltas concatenate to the decode of the whole output.

    Lifecycle of the window ``ids[prefix:]``: ``ids[prefix:read]`` is context whose
    text was already given out; ``ids[read:]`` is pending. ``add`` decodes the
    window; if the text grew and ends in a whole character, the new text is
    released and the window restarts at the old ``read``. Cost per token: one
    decode of at most ``_MAX_WINDOW`` tokens plus the chunk added.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._raw = _rust_decoder(tokenizer)
        self._skip = skip_special_tokens
        self._skipped = _skipped_ids(tokenizer) if skip_special_tokens else frozenset()
        self._ids: list[int] = [t for t in prompt_ids if t not in self._skipped][-_WINDOW:]
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_ids: Sequence[int]) -> str:
        """Appends tokens; returns the text that became final."""
        kept = [t for t in token_ids if t not in self._skipped]
        if not kept:
            return ""
        self._ids.extend(kept)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._move(self._read, len(self._ids))
            return full_text[len(prefix_text) :]
        if len(self._ids) - self._prefix > _MAX_WINDOW:
            return self._release_settled(prefix_text)
        return ""

    def _release_settled(self, prefix_text: str) -> str:
        """The text up to the last _HOLD tokens, released as it is (bounds the window)."""
        cut = max(self._read, len(self._ids) - _HOLD)  # never back over text given out
        settled = self._decode(self._ids[self._prefix : cut])
        self._move(max(self._prefix, cut - _WINDOW), cut)
        return settled[len(prefix_text) :] if len(settled) > len(prefix_text) else ""

    def _move(self, prefix: int, read: int) -> None:
        """The window now starts at prefix with text given out up to read; older ids dropped."""
        del self._ids[:prefix]
        self._prefix, self._read = 0, read - prefix

    def _decode(self, ids: Sequence[int]) -> str:
        if self._raw is not None:
            return str(self._raw.decode(ids, skip_special_tokens=self._skip))
        return str(self._tok.decode(ids, skip_special_tokens=self._skip))


def _rust_decoder(tokenizer: Any) -> Any:
    """The Rust ``tokenizers.Tokenizer`` under a fast tokenizer, when its decode is the
    same as the wrapper's (no clean-up of spaces); else None. The wrapper's own checks
    and conversions cost ~3x the decode itself, on every token the scheduler relays."""
    raw = getattr(tokenizer, "_tokenizer", None)
    if raw is None or not callable(getattr(raw, "decode", None)):
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return raw


def _skipped_ids(tokenizer: Any) -> frozenset[int]:
    """The ids a decode with skip_special_tokens drops: the special added tokens."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return frozenset(i for i, t in added.items() if getattr(t, "special", False))


class StopStringMatcher:
    """Feeds text deltas; emits what is safe and reports when a stop string hits."""

    def __init__(self, stops: Sequence[str]):
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Returns the text that can be emitted now (up to a stop string, exclusive)."""
        if self.stopped:
            return ""
        self._pending += delta
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        if self._hold == 0:
            out, self._pending = self._pending, ""
            return out
        keep = self._pending[-self._hold :] if len(self._pending) > self._hold else self._pending
        out = self._pending[: len(self._pending) - len(keep)]
        self._pending = keep
        return out

    def flush(self) -> str:
        """At the end of generation: the held-back tail (no stop string completed)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
