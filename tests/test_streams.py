"""merge_streams: the fan-in behind @serve.batch, on plain asyncio streams."""

from __future__ import annotations

import asyncio

from deployments.streams import coalescing_interval, merge_streams
from engine.request import Delta


async def scripted(deltas: list[Delta], delay: float = 0.0):
    for delta in deltas:
        await asyncio.sleep(delay)
        yield delta


async def test_each_slot_gets_its_deltas_then_stop():
    a = scripted([Delta("a1"), Delta("a2", finish_reason="stop")])
    b = scripted([Delta("b1", finish_reason="length")], delay=0.01)
    rejected = ValueError("bad request")
    steps = [step async for step in merge_streams([a, rejected, b])]
    per_slot = list(zip(*steps))
    assert [d.text for d in per_slot[0] if isinstance(d, Delta)] == ["a1", "a2"]
    assert per_slot[1][0] is rejected and set(per_slot[1][1:]) <= {StopIteration}
    assert [d.text for d in per_slot[2] if isinstance(d, Delta)] == ["b1"]
    for slot in per_slot:
        last = max(i for i, item in enumerate(slot) if item is not None and item is not StopIteration)
        assert all(item is StopIteration for item in slot[last + 1 :])


async def test_interval_paces_messages_of_a_merging_stream():
    """Like an engine stream, this one merges what piled up since it was last read."""
    produced = [Delta(str(i)) for i in range(20)] + [Delta("end", finish_reason="stop")]
    pile: list[Delta] = []

    async def produce():
        for d in produced:
            await asyncio.sleep(0.002)
            pile.append(d)

    async def merging():
        while True:
            while not pile:
                await asyncio.sleep(0.001)
            merged = pile.pop(0)
            while pile:
                merged = merged.merge(pile.pop(0))
            yield merged
            if merged.finish_reason:
                return

    producer = asyncio.create_task(produce())
    steps = [step async for step in merge_streams([merging()], interval_s=lambda: 0.02)]
    await producer
    texts = [s[0].text for s in steps if isinstance(s[0], Delta)]
    assert len(texts) < len(produced) / 2
    assert "".join(texts) == "".join(d.text for d in produced)


async def test_closing_the_merge_closes_the_streams():
    closed = []

    async def endless(name):
        try:
            while True:
                await asyncio.sleep(0.001)
                yield Delta(name)
        finally:
            closed.append(name)

    merged = merge_streams([endless("x"), endless("y")])
    await anext(merged)
    await merged.aclose()
    assert sorted(closed) == ["x", "y"]


def test_coalescing_grows_with_load():
    assert coalescing_interval(0.25, running=1) == 0.0
    assert 0 < coalescing_interval(0.25, running=3) < coalescing_interval(0.25, running=6) < 0.25
    assert coalescing_interval(0.25, running=40) == 0.25


async def test_a_last_delta_does_not_wait_for_the_interval():
    """The end of a request goes out at once, even in the middle of a long pause."""
    quick = scripted([Delta("q1"), Delta("q2", finish_reason="stop")], delay=0.01)
    slow = scripted([Delta(f"s{i}") for i in range(100)] + [Delta("end", finish_reason="stop")], delay=0.01)
    merged = merge_streams([quick, slow], interval_s=lambda: 10.0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    first = await anext(merged)
    second = await anext(merged)
    assert loop.time() - start < 1.0  # not 10 s
    assert first[0].text == "q1" and second[0].text == "q2" and second[0].finish_reason == "stop"
    assert second[1].text.startswith("s")  # the other stream's output rode along
    await merged.aclose()
