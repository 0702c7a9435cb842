"""Model names decided once (deployments/frontend/served_models.py); the layers below keep invariants only."""

from __future__ import annotations

import pytest

from deployments.contract.errors import ApiError
from deployments.contract.messages import GenerateCall
from deployments.contract.runtime_adapters import InMemoryAdapters
from deployments.contract.settings import AppArgs
from deployments.frontend.served_models import ServedModel, ServedModels
from deployments.frontend.service import RequestService
from deployments.replica.llm import LLMServer, UnlistedAdapterError
from deployments.ui.chat_state import Conversation
from deployments.ui.page import stream_reply
from engine.config import SamplingOverrides
from engine.errors import AdapterNotFoundError, AdapterTimeoutError
from engine.request import Delta
from tests.fakes import STATS, ScriptedBackend, ended


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
    backend = ScriptedBackend(ended([Delta("x", finish_reason="stop", stats=STATS)]))
    service, models = RequestService(backend), ServedModels("base", adapters=("lora",))
    reply = [c async for c in stream_reply(service, Conversation().ask("hi"), "", "lora", SamplingOverrides(), models)]
    assert [call.adapter for call in backend.calls] == ["lora"] and reply[-1].exchanges[-1].reply == "x"
    refused = [c async for c in stream_reply(service, Conversation().ask("hi"), "", "ghost", SamplingOverrides(),
                                             models)]
    assert len(backend.calls) == 1 and "`ghost` does not exist" in refused[-1].exchanges[-1].footer


def test_the_replica_never_loads_an_unlisted_name_without_stores():
    """An internal invariant (a 500 when a caller skipped resolution), not a second 404; with
    adapter stores any name goes to the stores, which answer the 404."""
    server = LLMServer.__new__(LLMServer)  # no engine, no Serve: only the adapter guard
    server.args = AppArgs(adapters={"lora": "/adapters/lora"})
    params = SamplingOverrides()
    with pytest.raises(UnlistedAdapterError):
        server._check_adapter(GenerateCall(params, adapter="ghost", prompt="x"))
    assert ApiError.from_error(UnlistedAdapterError("x")).status == 500
    server._check_adapter(GenerateCall(params, adapter="lora", prompt="x"))
    server._check_adapter(GenerateCall(params, adapter="runtime:new:1", adapter_source="/adapters/new", prompt="x"))
    server.args = AppArgs(adapter_stores=["/adapters"])
    server._check_adapter(GenerateCall(params, adapter="ghost", prompt="x"))


async def test_with_stores_any_valid_name_goes_to_the_replica_and_listing_merges():
    async def stored() -> list[str]:
        return ["team/a", "lora"]

    models = ServedModels("base", adapters=("lora",), stored=stored)
    assert (await models.resolve("team/a")).adapter == "team/a"
    assert (await models.resolve("not/in/listing")).adapter == "not/in/listing"  # the replica decides
    with pytest.raises(ApiError) as bad:
        await models.resolve("../escape")
    assert bad.value.status == 404
    assert await models.names() == ["base", "lora", "team/a"]
    assert ApiError.from_error(AdapterNotFoundError("adapter 'x' is in no store")).code == "model_not_found"
    assert ApiError.from_error(AdapterTimeoutError("slow")).status == 504
