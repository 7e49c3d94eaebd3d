"""`disagg verify`: each prompt on the disaggregated path and on the collocated path of the
same workers, greedy, token ids compared.

1. The workers from ``list_workers()``: prompt i goes to prefill worker i mod P and
   decode worker i mod D.
2. Disaggregated: pinned to that prefill worker and that decode worker (the KV
   moves between them). Collocated: the prefill pinned to the decode worker
   itself, which then prefills the prompt locally (no KV handoff).
3. Equal token ids: a match. Anything else, a mismatch with the first index
   that differs. A run that did not take the path it was pinned to (a policy
   that ignores pins, a disaggregated run that moved no KV) is reported as
   such, never as a match.
Pins are honoured by the default length_aware policy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disagg.client.sync import Client
from disagg.client.types import Completion, WorkerInfo


@dataclass(frozen=True)
class Prompt:
    """One line of a prompts file: text, or a JSON object (prompt | prompt_token_ids | messages)."""

    prompt: str = ""
    prompt_token_ids: tuple[int, ...] = ()
    messages: tuple[Mapping[str, str], ...] = ()


@dataclass(frozen=True)
class PathComparison:
    index: int  # the prompt's number in the file, from 0
    prefill_worker: str
    decode_worker: str
    disaggregated: tuple[int, ...]
    collocated: tuple[int, ...]
    problem: str = ""  # a run that did not take its path; "" = both did

    @property
    def match(self) -> bool:
        return not self.problem and self.disaggregated == self.collocated

    @property
    def first_difference(self) -> int | None:
        a, b = self.disaggregated, self.collocated
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                return i
        return None if len(a) == len(b) else min(len(a), len(b))


def read_prompts(path: str) -> list[Prompt]:
    """Non-empty lines; a line starting with '{' is JSON, '#' starts a comment line."""
    out: list[Prompt] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(_json_prompt(line, path, n) if line.startswith("{") else Prompt(prompt=line))
    return out


def _json_prompt(line: str, path: str, n: int) -> Prompt:
    try:
        obj: Any = json.loads(line)
        return Prompt(
            prompt=str(obj.get("prompt", "")),
            prompt_token_ids=tuple(int(t) for t in obj.get("prompt_token_ids", ())),
            messages=tuple(
                {"role": str(m["role"]), "content": str(m["content"])}
                for m in obj.get("messages", ())
            ),
        )
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}:{n}: not a prompt object: {e}") from e


def pairs(workers: list[WorkerInfo], n: int) -> Iterator[tuple[WorkerInfo, WorkerInfo]]:
    """(prefill, decode) worker for each of n prompts, round robin over both roles."""
    prefills = sorted((w for w in workers if w.role == "prefill"), key=lambda w: w.worker_id)
    decodes = sorted((w for w in workers if w.role == "decode"), key=lambda w: w.worker_id)
    if not prefills or not decodes:
        raise ValueError("the cluster needs at least one prefill and one decode worker")
    for i in range(n):
        yield prefills[i % len(prefills)], decodes[i % len(decodes)]


def compare(
    client: Client, prompts: list[Prompt], max_tokens: int, timeout_s: float | None = None
) -> Iterator[PathComparison]:
    """Each prompt on both paths; ValueError when the cluster lacks a role."""
    workers = client.list_workers(timeout=timeout_s)
    for i, (p, (pre, dec)) in enumerate(zip(prompts, pairs(workers, len(prompts)), strict=True)):
        disagg = _run(client, p, pre.worker_id, dec.worker_id, max_tokens, timeout_s)
        colloc = _run(client, p, dec.worker_id, dec.worker_id, max_tokens, timeout_s)
        problem = _path_problem(disagg, pre.worker_id, dec.worker_id, handoff=True)
        problem = problem or _path_problem(colloc, dec.worker_id, dec.worker_id, handoff=False)
        yield PathComparison(
            i, pre.worker_id, dec.worker_id, disagg.token_ids, colloc.token_ids, problem
        )


def _run(
    client: Client,
    p: Prompt,
    prefill: str,
    decode: str,
    max_tokens: int,
    timeout_s: float | None,
) -> Completion:
    return client.complete(
        p.prompt or None,
        prompt_token_ids=p.prompt_token_ids,
        messages=p.messages,
        max_tokens=max_tokens,
        temperature=0.0,
        prefill_worker=prefill,
        decode_worker=decode,
        timeout=timeout_s,
    )


def _path_problem(c: Completion, prefill: str, decode: str, handoff: bool) -> str:
    if (c.prefill_worker, c.decode_worker) != (prefill, decode):
        return (
            f"ran on {c.prefill_worker} -> {c.decode_worker}, not the pinned {prefill} -> {decode} "
            "(does the scheduler's policy honour pins?)"
        )
    if handoff and c.usage.completion_tokens > 1 and c.timings.kv_transfer_ms <= 0:
        return "the disaggregated run moved no KV"
    return ""
