"""Turns a request's prompt (text, chat messages or token ids) into token ids.

Errors are ``PromptError`` naming the offending field, so the front ends can
answer INVALID_ARGUMENT / HTTP 400 with a precise message.

Untrusted text is checked before the tokenizer sees it: ``check_prompt_size``
refuses a prompt too long to fit the context whatever it tokenizes to (so a
megabyte of text is never tokenized just to be refused), and ``render_prompt``
refuses text that is not valid Unicode (a lone surrogate, which JSON's
``\\ud800`` escapes can carry, makes the tokenizer raise).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class PromptError(ValueError):
    """Bad prompt input; ``field`` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


ROLES = ("system", "user", "assistant", "tool", "developer")

# A generous bound on the characters one token covers: real text averages 3-5, and
# even long runs of spaces or punctuation rarely reach 32. A prompt longer than the
# context times this cannot fit, so it is refused without being tokenized.
MAX_CHARS_PER_TOKEN = 32

_SURROGATE = re.compile("[\ud800-\udfff]")


def prompt_chars(prompt: str = "", messages: Sequence[ChatTurn] = ()) -> int:
    """The characters of text a request gives the tokenizer (the chat template's own aside)."""
    return len(prompt) + sum(len(m.content) for m in messages)


def check_prompt_size(
    max_context: int,
    prompt: str = "",
    messages: Sequence[ChatTurn] = (),
    prompt_token_ids: Sequence[int] = (),
) -> None:
    """PromptError when the prompt cannot fit max_context tokens, whatever it tokenizes to.

    O(number of messages): does not look at the text itself, nor tokenize it."""
    if len(prompt_token_ids) >= max_context:
        raise PromptError(
            "prompt_token_ids",
            f"prompt is {len(prompt_token_ids)} tokens; the model's context is {max_context} "
            "(it must leave room for one new token)",
        )
    chars, limit = prompt_chars(prompt, messages), max_context * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise PromptError(
            "messages" if messages else "prompt",
            f"prompt is {chars} characters; the model's context of {max_context} tokens "
            f"holds at most {limit}",
        )


def _check_text(field: str, text: str, where: str = "") -> None:
    """PromptError when text holds a lone surrogate (not encodable as UTF-8)."""
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise PromptError(
            field,
            f"{where}invalid Unicode: lone surrogate U+{ord(bad.group()):04X} at character "
            f"{bad.start()} (text must be valid UTF-8)",
        )


def render_prompt(
    tokenizer: Any,
    vocab_size: int,
    prompt: str = "",
    messages: Sequence[ChatTurn] = (),
    prompt_token_ids: Sequence[int] = (),
) -> list[int]:
    """Token ids for exactly one of prompt / messages / prompt_token_ids."""
    given = [
        name
        for name, v in (
            ("prompt", prompt),
            ("messages", messages),
            ("prompt_token_ids", prompt_token_ids),
        )
        if v
    ]
    if not given:
        raise PromptError("prompt", "empty prompt: give prompt, messages or prompt_token_ids")
    if len(given) > 1:
        raise PromptError(
            given[1],
            f"give only one of prompt, messages, prompt_token_ids (got {', '.join(given)})",
        )
    if prompt:
        _check_text("prompt", prompt)
        ids = list(tokenizer(prompt)["input_ids"])
        if not ids:
            raise PromptError("prompt", "prompt tokenizes to zero tokens")
        return ids
    if messages:
        return _render_chat(tokenizer, messages)
    for i, t in enumerate(prompt_token_ids):
        if not 0 <= t < vocab_size:
            raise PromptError(
                "prompt_token_ids", f"token id {t} at index {i} outside [0, {vocab_size})"
            )
    return list(prompt_token_ids)


def _render_chat(tokenizer: Any, messages: Sequence[ChatTurn]) -> list[int]:
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise PromptError(
                "messages",
                f"message {i}: unknown role {m.role!r} (expected one of {', '.join(ROLES)})",
            )
        _check_text("messages", m.content, f"message {i}: ")
    if getattr(tokenizer, "chat_template", None) is None:
        raise PromptError("messages", "this model has no chat template; send prompt instead")
    turns = [{"role": m.role, "content": m.content} for m in messages]
    ids = tokenizer.apply_chat_template(
        turns, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    return list(ids)
