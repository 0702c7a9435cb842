"""Requests with n > 1 choices: their limits and their one delta stream.

The rows themselves (one per choice, the forks sharing choice 0's prompt blocks) are made by
`Engine.new_rows` (engine/row.py, engine/scheduler.py). Here: `check_choices`, the request's
limits (part of `Engine.check_limits`, checked once per request); and `choice_stream`, which
reads the request's one queue, merges what piled up per choice (never across choices) and
ends after the n-th last delta.

Thread: the engine's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from engine.errors import InvalidRequestError
from engine.request import Delta, GenerationRequest


def check_choices(request: GenerationRequest, max_rows: int, capacity_tokens: int) -> None:
    """n choices run at once, each a row (at most `max_rows`), sharing the prompt's KV: the
    prompt plus n x max_tokens must fit the KV cache."""
    n, max_tokens = request.params.n, request.params.max_tokens
    if n == 1:
        return
    if n > max_rows:
        raise InvalidRequestError(f"n is {n}; at most {max_rows} choices per request (max_batch_size)")
    total = len(request.prompt_ids) + n * max_tokens
    if total > capacity_tokens:
        raise InvalidRequestError(
            f"prompt ({len(request.prompt_ids)} tokens) plus n x max_tokens ({n} x {max_tokens}) is {total} "
            f"tokens; the KV cache holds {capacity_tokens}: lower n or max_tokens"
        )


async def choice_stream(queue: asyncio.Queue[Delta], n: int, cancel: Callable[[], None]) -> AsyncIterator[Delta]:
    """The deltas of an n-choice request: what is queued is merged per choice and yielded;
    the stream ends after the n-th choice's last delta. Closing it early calls `cancel`."""
    left = n
    try:
        while left:
            pending = [await queue.get()]
            while not queue.empty():
                pending.append(queue.get_nowait())
            for delta in merge_per_choice(pending):
                left -= delta.finish_reason is not None
                yield delta
    finally:
        if left:
            cancel()


def merge_per_choice(deltas: list[Delta]) -> list[Delta]:
    """Each choice's deltas merged into one, choices in order of first appearance."""
    merged: dict[int, Delta] = {}
    for delta in deltas:
        merged[delta.index] = merged[delta.index].merge(delta) if delta.index in merged else delta
    return list(merged.values())
