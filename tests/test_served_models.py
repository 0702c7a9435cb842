"""Model names decided once (deployments/served_models.py); the layers below keep invariants only."""

from __future__ import annotations

import pytest

from deployments.chat_state import Conversation
from deployments.llm import LLMServer, UnlistedAdapterError
from deployments.messages import ApiError
from deployments.runtime_adapters import InMemoryAdapters
from deployments.served_models import ServedModel, ServedModels
from deployments.service import RequestService
from deployments.settings import AppArgs
from deployments.ui import stream_reply
from engine.config import SamplingOverrides
from engine.request import Delta
from tests.fakes import STATS, ScriptedBackend


async def test_each_kind_of_name_resolves_and_an_unknown_one_is_the_404():
    runtime = InMemoryAdapters()
    models = ServedModels("base", ("base-alias",), ("lora",), runtime)
    loaded = await runtime.add("new", "/adapters/new")
    assert await models.resolve("base") == await models.resolve("base-alias") == ServedModel()
    assert await models.resolve("lora") == ServedModel("lora")
    assert await models.resolve("new") == ServedModel(loaded.id, "/adapters/new")
    assert await models.names() == ["base", "lora", "new"]
    with pytest.raises(ApiError) as unknown:
        await models.resolve("ghost")
    assert (unknown.value.status, unknown.value.param, unknown.value.code) == (404, "model", "model_not_found")
    assert models.is_configured("lora") and not models.is_configured("new")


async def test_the_page_resolves_names_as_the_api_does():
    backend = ScriptedBackend([Delta("x", finish_reason="stop", stats=STATS)])
    service, models = RequestService(backend), ServedModels("base", adapters=("lora",))
    reply = [c async for c in stream_reply(service, Conversation().ask("hi"), "", "lora", SamplingOverrides(), models)]
    assert [call.adapter for call in backend.calls] == ["lora"] and reply[-1].exchanges[-1].reply == "x"
    refused = [c async for c in stream_reply(service, Conversation().ask("hi"), "", "ghost", SamplingOverrides(),
                                             models)]
    assert len(backend.calls) == 1 and "`ghost` does not exist" in refused[-1].exchanges[-1].footer


async def test_the_replica_never_hands_an_unlisted_name_to_the_multiplexer():
    """An internal invariant (a 500 when a caller skipped resolution), not a second 404."""
    server = LLMServer.__new__(LLMServer)  # no engine, no Serve: only the adapter guard
    server.args, server.runtime_sources, loads = AppArgs(adapters={"lora": "/adapters/lora"}), {}, []

    async def multiplexer(name: str) -> None:
        loads.append(name)

    server.adapter = multiplexer
    with pytest.raises(UnlistedAdapterError):
        await server._hold_adapter("ghost", None)
    assert ApiError.from_error(UnlistedAdapterError("x")).status == 500
    await server._hold_adapter("lora", None)
    await server._hold_adapter("runtime:new:1", "/adapters/new")
    assert loads == ["lora", "runtime:new:1"] and server.runtime_sources == {"runtime:new:1": "/adapters/new"}
