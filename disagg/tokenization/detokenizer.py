"""Incremental detokenization and stop strings.

Text is re-decoded over a short window of recent tokens, so characters built
from several tokens (multi-byte UTF-8, merged pieces, leading spaces) come out
whole: a delta is released only once it no longer ends in U+FFFD.
Stop strings are matched on the text; the tail that could still begin a stop
string is held back, so no part of a stop string is ever emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_WINDOW = 6  # prompt tokens of context for the first decode (leading-space rules)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_WINDOW:])
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_ids: Sequence[int]) -> str:
        """Appends tokens; returns the text that became final."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text) :]

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=self._skip))


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
