"""The chat page's rate limit, the API's token bucket, told on the page: per API key (the key a
session logged in with) when keys are set, else per client address."""

from __future__ import annotations

import gradio as gr
import pytest
from starlette.requests import Request

from deployments.frontend.guard import client_id
from deployments.frontend.served_models import ServedModels
from deployments.frontend.service import RequestService
from deployments.ui.chat_state import Conversation
from deployments.ui.page import ModelInfo, build_ui, page_app, stream_reply
from deployments.ui.page_limit import PageLimit, PageLogins, page_client
from engine.config import GenerationDefaults, SamplingOverrides
from engine.request import Delta
from tests.fakes import STATS, ScriptedBackend, ended, served_on_a_port

SETTINGS = [0.0, 0.95, 0, 64, 1.0]  # temperature, top_p, top_k, max new tokens, repetition penalty


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
    backend = ScriptedBackend(ended([Delta("x", finish_reason="stop", stats=STATS)]))
    refusal = PageLimit(1)
    refusal.refusal(None)
    shown = [c async for c in stream_reply(RequestService(backend), Conversation().ask("hi"), "", "base",
                                           SamplingOverrides(), ServedModels("base"), refusal.refusal(None))]
    assert backend.calls == [] and "wait" in shown[-1].notice and "wait" in shown[-1].exchanges[-1].footer


@pytest.fixture
def limited_page():
    """The page on a scripted backend, at one reply per minute, served by Gradio (no Ray)."""
    backend = ScriptedBackend(ended([Delta("hello", finish_reason="stop", stats=STATS)]))
    info = ModelInfo(models=("base",), template="auto", defaults=GenerationDefaults())
    ui = build_ui(RequestService(backend), info, limit=PageLimit(1))
    _, url, _ = ui.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url, backend
    ui.close()


def test_the_page_counts_replies_per_client(limited_page):
    from gradio_client import Client

    url, backend = limited_page
    client = Client(url, verbose=False)
    bubbles, notice, _ = client.predict("Hi", "", "base", *SETTINGS, api_name="/chat")
    assert "hello" in bubbles[-1]["content"][0]["text"] and notice == ""
    bubbles, notice, _ = client.predict("Again", "", "base", *SETTINGS, api_name="/chat")
    assert "Too many replies" in notice and len(backend.calls) == 1


def with_cookies(**cookies: str) -> gr.Request:
    header = "; ".join(f"{name}={value}" for name, value in cookies.items()).encode()
    return gr.Request(request=Request({"type": "http", "client": ("10.0.0.1", 5000), "headers": [(b"cookie", header)]}))


def test_with_keys_each_key_has_its_own_bucket_whatever_the_address():
    logins = PageLogins(("sk-a", "sk-b"))
    logins.bind("token-a1", "sk-a"), logins.bind("token-a2", "sk-a"), logins.bind("token-b", "sk-b")
    logins.bind("token-x", "sk-wrong")  # a failed login binds nothing
    assert logins.client(with_cookies(**{"access-token-x": "token-a1"})) == client_id("sk-a")
    limit = PageLimit(1, logins)
    assert limit.refusal(with_cookies(**{"access-token-x": "token-a1"})) is None
    refused = limit.refusal(with_cookies(**{"access-token-x": "token-a2"}))  # another login, the same key
    assert refused.status == 429 and "for this API key" in refused.message
    assert limit.refusal(with_cookies(**{"access-token-x": "token-b"})) is None
    assert limit.refusal(with_cookies(**{"access-token-x": "token-x"})).status == 401
    assert limit.refusal(with_cookies(other="token-b")).status == 401  # only the login cookie counts


@pytest.fixture
def keyed_page():
    """The page behind its login (keys sk-a, sk-b) at one reply per minute per key, on uvicorn."""
    backend = ScriptedBackend(ended([Delta("hello", finish_reason="stop", stats=STATS)]))
    info = ModelInfo(models=("base",), template="auto", defaults=GenerationDefaults())
    logins = PageLogins(("sk-a", "sk-b"))
    ui = build_ui(RequestService(backend), info, limit=PageLimit(1, logins))
    with served_on_a_port(page_app(ui, logins)) as url:
        yield url, backend
    ui.close()


def test_the_page_counts_replies_per_key_not_per_user_name_or_address(keyed_page):
    """Logging in again under another name does not give a key more replies; another key has its own."""
    from gradio_client import Client

    url, backend = keyed_page
    _, notice, _ = Client(url, auth=("alice", "sk-a"), verbose=False).predict("Hi", "", "base", *SETTINGS,
                                                                            api_name="/chat")
    assert notice == "" and len(backend.calls) == 1
    _, notice, _ = Client(url, auth=("bob", "sk-a"), verbose=False).predict("Hi", "", "base", *SETTINGS,
                                                                          api_name="/chat")
    assert "Too many replies for this API key" in notice and len(backend.calls) == 1
    _, notice, _ = Client(url, auth=("alice", "sk-b"), verbose=False).predict("Hi", "", "base", *SETTINGS,
                                                                            api_name="/chat")
    assert notice == "" and len(backend.calls) == 2
