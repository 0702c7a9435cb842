"""vLLM's small endpoints through the HTTP layer over the fake backend: /tokenize, /detokenize
(and the runtime adapter routes). The served versions are in tests/test_serve.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from deployments.api import ApiSettings, build_api
from deployments.messages import TokenizeCall
from engine.prompt import ChatMessage
from tests.fakes import FAKE_WINDOW, ScriptedBackend


def make_client(**settings) -> tuple[TestClient, ScriptedBackend]:
    backend = ScriptedBackend([])
    return TestClient(build_api(backend, ApiSettings("base", ("base-alias",), ("lora",), **settings))), backend


def test_tokenize_a_prompt_answers_vllms_body():
    client, backend = make_client()
    reply = client.post("/tokenize", json={"model": "base", "prompt": "hi", "add_special_tokens": False})
    assert reply.status_code == 200
    assert reply.json() == {"count": 2, "max_model_len": FAKE_WINDOW, "tokens": [104, 105], "token_strs": None}
    assert backend.calls == [TokenizeCall(prompt="hi", add_special_tokens=False)]


def test_tokenize_a_chat_passes_the_messages_as_a_chat_request_would():
    client, backend = make_client()
    body = {"model": "lora", "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "yo"}],
            "add_generation_prompt": False, "return_token_strs": True}
    reply = client.post("/tokenize", json=body).json()
    assert reply["count"] == len("be brief\nyo") and reply["token_strs"] == list("be brief\nyo")
    assert backend.calls == [TokenizeCall(messages=[ChatMessage("system", "be brief"), ChatMessage("user", "yo")],
                                          add_generation_prompt=False, return_token_strs=True)]


def test_tokenize_without_a_model_uses_the_base_model():
    client, _ = make_client()
    assert client.post("/tokenize", json={"prompt": "a"}).json()["tokens"] == [97]


def test_detokenize_answers_the_text_and_bad_ids_are_400_naming_tokens():
    client, _ = make_client()
    assert client.post("/detokenize", json={"model": "base-alias", "tokens": [104, 105]}).json() == {"prompt": "hi"}
    bad = client.post("/detokenize", json={"model": "base", "tokens": [-1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert client.post("/detokenize", json={"model": "base", "tokens": ["x"]}).status_code == 400


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {"model": "nope", "prompt": "hi"}), ("/detokenize", {"model": "nope", "tokens": [1]}),
])
def test_an_unknown_model_is_openais_404(path, body):
    client, backend = make_client()
    reply = client.post(path, json=body)
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found" and backend.calls == []


@pytest.mark.parametrize("body", [
    {"model": "base"}, {"model": "base", "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
    {"model": "base", "prompt": "a", "add_generation_prompt": True}, {"model": "base", "messages": []},
])
def test_a_body_that_is_neither_shape_is_400(body):
    client, backend = make_client()
    reply = client.post("/tokenize", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error" and backend.calls == []


@pytest.mark.parametrize("path, body", [("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})])
def test_they_need_the_api_key(path, body):
    client, _ = make_client(api_keys=("sk-right",))
    assert client.post(path, json=body).status_code == 401
    assert client.post(path, json=body, headers={"Authorization": "Bearer sk-right"}).status_code == 200
