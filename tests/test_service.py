"""The shared request path (deployments/frontend/service.py): one finish record per request, whatever happens."""

from __future__ import annotations

import pytest

from deployments.contract.errors import ApiError
from deployments.contract.messages import GenerateCall
from deployments.frontend.service import Finished, RequestService
from engine.config import SamplingOverrides
from engine.prompt import ChatMessage
from engine.request import Delta
from tests.fakes import STATS, ScriptedBackend, ended


def service_for(script: list, max_messages: int = 4) -> tuple[RequestService, ScriptedBackend, list[Finished]]:
    finished: list[Finished] = []
    backend = ScriptedBackend(script)
    return RequestService(backend, finished.append, max_messages), backend, finished


def call(messages: int = 1) -> GenerateCall:
    return GenerateCall(SamplingOverrides(), messages=[ChatMessage("user", "hi")] * messages, request_id="r1")


@pytest.mark.parametrize("script, status", [
    (ended([Delta("a"), Delta("b", finish_reason="stop", stats=STATS)]), 200),
    (ended([Delta("a"), Delta("", finish_reason="error", error="boom")]), 500),
    ([ApiError(503, "busy")], 503),
    ([Delta("a")], 500),  # ended without a last delta
])
async def test_each_ending_is_recorded_once(script, status):
    service, backend, finished = service_for(script)
    items = [item async for item in service.stream(call(), "m", "chat")]
    assert items == script
    assert finished == [Finished("r1", "m", "chat", status, STATS if status == 200 else None)]
    assert not backend.streams[0].cancelled


async def test_a_consumer_that_leaves_cancels_and_is_recorded_as_499():
    service, backend, finished = service_for(ended([Delta("a"), Delta("b"), Delta("c", finish_reason="stop")]))
    stream = service.stream(call(), "m", "chat")
    assert (await anext(stream)).text == "a"
    await stream.aclose()
    assert backend.streams[0].cancelled and finished == [Finished("r1", "m", "chat", 499)]


async def test_a_failing_backend_is_recorded_as_500_and_raises():
    service, _, finished = service_for([Delta("a"), RuntimeError("replica died")])
    with pytest.raises(RuntimeError, match="replica died"):
        _ = [item async for item in service.stream(call(), "m", "chat")]
    assert finished == [Finished("r1", "m", "chat", 500)]


async def test_too_many_messages_are_refused_before_anything_runs():
    service, backend, finished = service_for(ended([Delta("a", finish_reason="stop")]), max_messages=2)
    with pytest.raises(ApiError) as refused:
        await anext(service.stream(call(messages=3), "m", "chat"))
    assert refused.value.status == 400 and not backend.streams and not finished
