"""The chat page's rate limit: per client address, the API's token bucket, told on the page."""

from __future__ import annotations

import gradio as gr
import pytest
from starlette.requests import Request

from deployments.chat_state import Conversation
from deployments.page_limit import PageLimit, page_client
from deployments.served_models import ServedModels
from deployments.service import RequestService
from deployments.ui import ModelInfo, build_ui, stream_reply
from engine.config import GenerationDefaults, SamplingOverrides
from engine.request import Delta
from tests.fakes import STATS, ScriptedBackend


def from_address(host: str) -> gr.Request:
    return gr.Request(request=Request({"type": "http", "client": (host, 5000), "headers": []}))


def test_each_address_has_its_own_bucket():
    limit = PageLimit(1)
    assert limit.refusal(from_address("10.0.0.1")) is None
    refused = limit.refusal(from_address("10.0.0.1"))
    assert refused.status == 429 and refused.retry_after > 0 and "wait" in refused.message
    assert limit.refusal(from_address("10.0.0.2")) is None
    assert page_client(from_address("10.0.0.3")) == "address:10.0.0.3" and page_client(None) == "anonymous"
    assert all(PageLimit(None).refusal(from_address("10.0.0.1")) is None for _ in range(100))


async def test_a_refused_reply_shows_the_message_and_never_reaches_the_backend():
    backend = ScriptedBackend([Delta("x", finish_reason="stop", stats=STATS)])
    refusal = PageLimit(1)
    refusal.refusal(None)
    shown = [c async for c in stream_reply(RequestService(backend), Conversation().ask("hi"), "", "base",
                                           SamplingOverrides(), ServedModels("base"), refusal.refusal(None))]
    assert backend.calls == [] and "wait" in shown[-1].notice and "wait" in shown[-1].exchanges[-1].footer


@pytest.fixture
def limited_page():
    """The page on a scripted backend, at one reply per minute, served by Gradio (no Ray)."""
    backend = ScriptedBackend([Delta("hello", finish_reason="stop", stats=STATS)])
    info = ModelInfo(models=("base",), template="auto", defaults=GenerationDefaults())
    ui = build_ui(RequestService(backend), info, limit=PageLimit(1))
    _, url, _ = ui.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url, backend
    ui.close()


def test_the_page_counts_replies_per_client(limited_page):
    from gradio_client import Client

    url, backend = limited_page
    client = Client(url, verbose=False)
    settings = [0.0, 0.95, 0, 64, 1.0]
    bubbles, notice, _ = client.predict("Hi", "", "base", *settings, api_name="/chat")
    assert "hello" in bubbles[-1]["content"][0]["text"] and notice == ""
    bubbles, notice, _ = client.predict("Again", "", "base", *settings, api_name="/chat")
    assert "Too many replies" in notice and len(backend.calls) == 1
