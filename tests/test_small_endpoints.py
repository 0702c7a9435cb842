"""vLLM's small endpoints through the HTTP layer over the fake backend: /tokenize, /detokenize
(and the runtime adapter routes). The served versions are in tests/test_serve.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from deployments.contract.messages import TokenizeCall
from deployments.contract.runtime_adapters import InMemoryAdapters, RuntimeAdapter
from deployments.contract.settings import AppArgs
from deployments.http.api import ApiSettings, build_api
from engine.prompt import ChatMessage
from engine.request import Delta
from tests.fakes import CHAT, FAKE_WINDOW, STATS, ScriptedBackend, ended


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


def runtime_client() -> tuple[TestClient, ScriptedBackend]:
    return make_client(runtime_adapters=InMemoryAdapters())


def test_runtime_adapter_routes_are_off_by_default_with_a_404_saying_how_to_switch_them_on():
    client, backend = make_client()
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/a"}),
                       ("/v1/unload_lora_adapter", {"lora_name": "x"})):
        reply = client.post(path, json=body)
        assert reply.status_code == 404 and "allow_runtime_adapters: true" in reply.json()["error"]["message"]
    assert backend.calls == [] and AppArgs(model="m").allow_runtime_adapters is False


def test_a_loaded_adapter_is_a_model_until_it_is_unloaded():
    client, backend = runtime_client()
    reply = client.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/adapters/new"})
    assert reply.status_code == 200 and "added" in reply.text
    assert backend.calls == [RuntimeAdapter("new", "/adapters/new", "runtime:new:1")]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "lora", "new"]
    assert client.get("/v1/models/new").json()["parent"] == "base"
    backend.script = ended([Delta("ok", finish_reason="stop", stats=STATS)])
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "new"}).status_code == 200
    assert (backend.calls[-1].adapter, backend.calls[-1].adapter_source) == ("runtime:new:1", "/adapters/new")
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "new"}).status_code == 200
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "new"}).status_code == 404
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "lora"]
    again = client.post("/v1/unload_lora_adapter", json={"lora_name": "new"})
    assert again.status_code == 404 and again.json()["error"]["param"] == "lora_name"
    client.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/adapters/other"})
    assert backend.calls[-1] == RuntimeAdapter("new", "/adapters/other", "runtime:new:2")  # a reload: a new id


@pytest.mark.parametrize("body, param", [
    ({"lora_name": "lora", "lora_path": "/a"}, "lora_name"), ({"lora_name": "base-alias", "lora_path": "/a"}, "lora_name"),
    ({"lora_name": "x", "lora_path": "/adapters/bad"}, "lora_path"), ({"lora_name": "", "lora_path": "/a"}, "lora_name"),
    ({"lora_name": "x y", "lora_path": "/a"}, "lora_name"), ({"lora_name": "x"}, "lora_path"),
])
def test_a_bad_load_is_400_naming_the_field_and_leaves_no_model(body, param):
    client, _ = runtime_client()
    reply = client.post("/v1/load_lora_adapter", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.json()
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "lora"]


def test_loading_a_name_twice_is_400_and_configured_adapters_cannot_be_unloaded():
    client, _ = runtime_client()
    body = {"lora_name": "x", "lora_path": "/a"}
    assert client.post("/v1/load_lora_adapter", json=body).status_code == 200
    twice = client.post("/v1/load_lora_adapter", json=body)
    assert twice.status_code == 400 and "already been loaded" in twice.json()["error"]["message"]
    configured = client.post("/v1/unload_lora_adapter", json={"lora_name": "lora"})
    assert configured.status_code == 400 and configured.json()["error"]["param"] == "lora_name"


def test_runtime_adapter_routes_need_the_api_key():
    client, backend = make_client(runtime_adapters=InMemoryAdapters(), api_keys=("sk-right",))
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/a"}).status_code == 401
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 401
    assert backend.calls == []
