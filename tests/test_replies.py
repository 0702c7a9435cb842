"""The replica's stream over Ray: the last delta rides inside the ReplyEnd (one message, not
two), and the front end's handle stream unpacks it, so readers see the same items either way."""

from __future__ import annotations

from collections.abc import AsyncIterator

from deployments.contract.replies import ReplyEnd, carry_last_delta
from deployments.frontend.handle import ShedWhenFull
from engine.request import Delta, RequestEnd
from tests.fakes import STATS


async def engine_stream(items: list) -> AsyncIterator:
    for item in items:
        yield item


class RayResponse:
    """What ShedWhenFull reads of a DeploymentResponseGenerator: items in order, then the end."""

    def __init__(self, items: list):
        self._items = iter(items)

    async def __anext__(self):
        try:
            return next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        pass


def one_choice() -> list:
    last = Delta("lo", [2], finish_reason="stop", stats=STATS)
    return [Delta("Hel", [1]), last, RequestEnd.of([last])]


async def test_the_last_delta_rides_inside_the_end() -> None:
    sent = [item async for item in carry_last_delta(engine_stream(one_choice()), "r1@n1")]
    assert len(sent) == 2  # two Ray messages for three items
    assert sent[0].text == "Hel"
    assert isinstance(sent[1], ReplyEnd) and sent[1].replica == "r1@n1"
    assert sent[1].last.text == "lo" and sent[1].end.stats.completion_tokens == STATS.completion_tokens


async def test_the_front_end_reads_the_engines_items_in_order() -> None:
    items = one_choice()
    sent = [item async for item in carry_last_delta(engine_stream(items), "r1@n1")]
    read = [item async for item in ShedWhenFull(RayResponse(sent))]
    assert read[:2] == items[:2]
    assert isinstance(read[2], ReplyEnd) and read[2].end == items[2] and read[2].last is None


async def test_an_earlier_choices_last_delta_goes_out_with_the_next_item() -> None:
    first_done = Delta("a", [1], finish_reason="length", stats=STATS, index=0)
    second = Delta("b", [2], index=1)
    second_done = Delta("c", [3], finish_reason="stop", stats=STATS, index=1)
    items = [first_done, second, second_done, RequestEnd.of([first_done, second_done])]
    sent = [item async for item in carry_last_delta(engine_stream(items), "r")]
    assert sent[:2] == [first_done, second]
    assert sent[2].last == second_done and len(sent) == 3
    read = [item async for item in ShedWhenFull(RayResponse(sent))]
    assert read[:3] == items[:3] and read[3].end == items[3]


async def test_a_stream_that_stops_early_keeps_its_held_delta() -> None:
    last = Delta("x", [1], finish_reason="stop", stats=STATS)
    sent = [item async for item in carry_last_delta(engine_stream([last]), "r")]
    assert sent == [last]
