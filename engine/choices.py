"""A request's choices (n >= 1, one row each): its limits, its open state, its n > 1 stream.

The rows themselves (one per choice, the forks sharing choice 0's prompt blocks) are made by
`Engine.new_rows` (engine/row.py, engine/scheduler.py). Here: `check_choices`, the request's
limits for n > 1 (part of `Engine.check_limits`, checked once per request); `OpenRequest`, a
submitted request until its end, the one place that decides a request is over: after the last
choice's last delta it queues the request's RequestEnd (engine/request.py), and once a choice
has failed it queues nothing more of the others until then (the engine cancels them); and
`choice_stream`, which reads an n > 1 request's queue, merges what piled up per choice (never
across choices) and ends with the RequestEnd.

Thread: the engine's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError
from engine.request import Delta, GenerationRequest, RequestEnd, RequestOutput
from engine.row import Row


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


@dataclass
class OpenRequest:
    """A submitted request until its end: its output queue, the rows of the choices still
    running, and the last deltas of those that have ended (in the order they ended)."""

    queue: asyncio.Queue[RequestOutput]
    rows: list[Row]
    adapter: str | None
    lasts: list[Delta] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(delta.failed for delta in self.lasts)

    def deliver(self, delta: Delta) -> RequestEnd | None:
        """Queue `delta` (unless a choice has failed: the stream's next item is then its end); at
        the last choice's last delta, queue and return the request's end."""
        if not self.failed:
            self.queue.put_nowait(delta)
        if not delta.finish_reason:
            return None
        self.lasts.append(delta)
        self.rows = [row for row in self.rows if row.choice != delta.index]
        if self.rows:
            return None
        end = RequestEnd.of(self.lasts)
        self.queue.put_nowait(end)
        return end


async def choice_stream(queue: asyncio.Queue[RequestOutput], cancel: Callable[[], None]) -> AsyncIterator[RequestOutput]:
    """The items of an n-choice request: what is queued is merged per choice and yielded, then
    the RequestEnd, the last item. Closing it before the end calls `cancel`."""
    try:
        while True:
            pending = [await queue.get()]
            while not queue.empty():
                pending.append(queue.get_nowait())
            end = pending.pop() if isinstance(pending[-1], RequestEnd) else None
            for delta in merge_per_choice(pending):
                yield delta
            if end is not None:
                yield end
                return
    finally:
        cancel()  # nothing left to cancel once the request has ended


def merge_per_choice(deltas: list[Delta]) -> list[Delta]:
    """Each choice's deltas merged into one, choices in order of first appearance."""
    merged: dict[int, Delta] = {}
    for delta in deltas:
        merged[delta.index] = merged[delta.index].merge(delta) if delta.index in merged else delta
    return list(merged.values())
