"""API keys, rate limits and body-size limits: unit level and through the HTTP layer (fake backend)."""

from __future__ import annotations

import pytest

from deployments.frontend.guard import RateLimiter, bearer_token, client_id, key_matches, resolve_keys
from engine.request import Delta
from tests.fakes import CHAT, STATS, ScriptedBackend, ended

from fastapi.testclient import TestClient

from deployments.http.api import ApiSettings, build_api


def make_client(**settings) -> TestClient:
    backend = ScriptedBackend(ended([Delta("ok", finish_reason="stop", stats=STATS)]))
    return TestClient(build_api(backend, ApiSettings("base", (), (), **settings)))


def test_keys_from_config_and_environment(monkeypatch):
    monkeypatch.setenv("LLM_API_KEYS", " k2 , ,k3")
    assert resolve_keys(["k1", "k2"]) == ("k1", "k2", "k3")
    monkeypatch.delenv("LLM_API_KEYS")
    assert resolve_keys() == ()
    assert key_matches("k2", ["k1", "k2"]) and not key_matches("k", ["k1", "k2"]) and not key_matches("", [])
    assert bearer_token("Bearer  abc ") == "abc" and bearer_token("Basic abc") == "" and bearer_token(None) == ""
    assert client_id("secret") != "secret" and len(client_id("secret")) == 12


def test_rate_limiter_refills_over_time():
    limiter = RateLimiter(per_minute=2)
    assert limiter.retry_after("a", now=0.0) == 0 and limiter.retry_after("a", now=0.0) == 0
    assert limiter.retry_after("a", now=0.0) == pytest.approx(30.0)
    assert limiter.retry_after("b", now=0.0) == 0  # buckets are per client
    assert limiter.retry_after("a", now=30.0) == 0


def test_api_routes_need_a_key_when_keys_are_set():
    client = make_client(api_keys=("sk-right",))
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-right"}):
        response = client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer" and "sk-right" not in response.text
    ok = {"Authorization": "Bearer sk-right"}
    assert client.post("/v1/chat/completions", json=CHAT, headers=ok).status_code == 200
    assert client.get("/v1/models").status_code == 401 and client.get("/v1/models", headers=ok).status_code == 200
    assert client.post("/generate", json={"prompt_config": {"instruction": "x"}}).status_code == 401
    assert client.post("/v1/chat/completions", content=b"{bad", headers={}).status_code == 401  # key first
    assert client.get("/health").status_code == 200


def test_rate_limit_answers_429_with_retry_after():
    client = make_client(api_keys=("a", "b"), rate_limit_per_minute=2)
    as_a, as_b = {"Authorization": "Bearer a"}, {"Authorization": "Bearer b"}
    assert [client.post("/v1/chat/completions", json=CHAT, headers=as_a).status_code for _ in range(3)] == [200, 200, 429]
    limited = client.post("/v1/chat/completions", json=CHAT, headers=as_a)
    assert limited.json()["error"]["type"] == "rate_limit_error" and int(limited.headers["retry-after"]) >= 1
    assert client.post("/v1/chat/completions", json=CHAT, headers=as_b).status_code == 200


def test_large_bodies_and_long_chats_are_refused():
    client = make_client(max_body_bytes=2048, max_messages=3)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 4096}]}
    response = client.post("/v1/chat/completions", json=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"

    def chunks():
        for _ in range(10):
            yield b" " * 512

    streamed = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413  # no content-length: counted as it arrives
    many = {**CHAT, "messages": [{"role": "user", "content": "hi"}] * 4}
    response = client.post("/v1/chat/completions", json=many)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
