"""Turns a request's prompt (text, chat messages or token ids) into token ids.

Errors are ``PromptError`` naming the offending field, so the front ends can
answer INVALID_ARGUMENT / HTTP 400 with a precise message.
"""

from __future__ import annotations

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
    if getattr(tokenizer, "chat_template", None) is None:
        raise PromptError("messages", "this model has no chat template; send prompt instead")
    turns = [{"role": m.role, "content": m.content} for m in messages]
    ids = tokenizer.apply_chat_template(
        turns, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    return list(ids)
