"""Fan-in of several engine streams into the list-per-step shape of a `@serve.batch` generator.

A batched generator must yield one list per step with one slot per request of the batch.
`merge_streams` yields, per step, each request's new output (all deltas that arrived,
merged into one), None where nothing is new, the request's exception if it was rejected,
and StopIteration after its last item, which tells Serve that request is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from engine.request import Delta

Slot = Delta | Exception | type[StopIteration] | None


async def merge_streams(
    streams: Sequence[AsyncIterator[Delta] | Exception], interval_s: Callable[[], float] = lambda: 0.0
) -> AsyncIterator[list[Slot]]:
    """Interleave streams, at most one yield per `interval_s()` seconds while output piles up.

    Fewer, larger messages cost Ray's proxy and handles less CPU than one per token. A
    request's last delta never waits for the interval: the client learns at once that its
    request is done (and sends its next one). Closing this generator closes every stream
    (which cancels their requests).
    """
    slots: list[Slot] = [s if isinstance(s, Exception) else None for s in streams]
    pending = {
        i: asyncio.ensure_future(anext(s)) for i, s in enumerate(streams) if not isinstance(s, Exception)
    }
    pause = 0.0
    try:
        while pending or any(_is_news(s) for s in slots):
            await _collect(streams, slots, pending, pause)
            yield list(slots)
            slots = [StopIteration if _is_last(s) or s is StopIteration else None for s in slots]
            pause = interval_s()
    finally:
        for task in pending.values():
            task.cancel()
        await asyncio.gather(*pending.values(), return_exceptions=True)
        for stream in streams:
            if hasattr(stream, "aclose"):
                await stream.aclose()


async def _collect(
    streams: Sequence[AsyncIterator[Delta] | Exception], slots: list[Slot],
    pending: dict[int, asyncio.Future], pause: float,
) -> None:
    """Merge arriving deltas into `slots` until there is news and `pause` seconds have
    passed, or a stream has ended, or no stream is left."""
    deadline = asyncio.get_running_loop().time() + pause
    while pending and not any(_is_last(s) for s in slots):
        left = deadline - asyncio.get_running_loop().time()
        news = any(_is_news(s) for s in slots)
        if news and left <= 0:
            return
        await asyncio.wait(pending.values(), timeout=left if left > 0 else None,
                           return_when=asyncio.FIRST_COMPLETED)
        for i in [i for i, task in pending.items() if task.done()]:
            delta = pending.pop(i).result()
            slots[i] = slots[i].merge(delta) if isinstance(slots[i], Delta) else delta
            if not delta.finish_reason:
                pending[i] = asyncio.ensure_future(anext(streams[i]))


def _is_news(slot: Slot) -> bool:
    return slot is not None and slot is not StopIteration


def _is_last(slot: Slot) -> bool:
    return isinstance(slot, Exception) or isinstance(slot, Delta) and slot.finish_reason is not None


def coalescing_interval(full_load_interval_s: float, running: int, full_load_rows: int = 8) -> float:
    """Pause between messages: none for a lone stream (every token at once), growing with the
    number of running rows up to `full_load_interval_s` (where Ray's per-message CPU matters)."""
    return full_load_interval_s * min(1.0, max(running - 1, 0) / full_load_rows)
