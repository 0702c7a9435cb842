"""The HTTP layer over a scripted fake backend (no Ray, no model): errors, SSE framing, logging."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
from fastapi.testclient import TestClient

from client.stream import event_data
from deployments.contract.errors import ApiError, ErrorResponse
from deployments.contract.messages import GenerateCall
from deployments.frontend.guard import client_id
from deployments.http.api import ApiSettings, Finished, build_api
from deployments.http.protocol import ChatCompletionRequest
from engine.config import GenerationDefaults
from engine.errors import (
    EngineDeadError, EngineOverloadedError, InvalidRequestError, PromptTooLongError, UnknownAdapterError,
)
from engine.prompt import Instruction
from engine.request import Delta
from tests.error_bodies import error_payloads, leaks
from tests.fakes import CHAT, STATS, ScriptedBackend, ended


def make_client(script: list) -> tuple[TestClient, ScriptedBackend, list]:
    finished = []
    backend = ScriptedBackend(script)
    settings = ApiSettings("base", ("base-alias",), ("lora",), on_finish=finished.append)
    return TestClient(build_api(backend, settings)), backend, finished


def test_an_error_mid_stream_becomes_an_error_event_then_done(caplog):
    client, backend, finished = make_client(ended([Delta("Hel"), Delta("lo", finish_reason="error", error="boom",
                                                                        stats=STATS)]))
    events = list(event_data(client.post("/v1/chat/completions", json={**CHAT, "stream": True})))
    assert events[-1] == "[DONE]"
    message = json.loads(events[-2])["error"]["message"]
    request_id = backend.calls[0].request_id
    assert request_id in message and "boom" not in message  # the details are in the log only
    assert any(request_id in r.getMessage() and "boom" in r.getMessage() for r in caplog.records)
    assert [json.loads(e)["choices"][0]["delta"].get("content") for e in events[1:3]] == ["Hel", "lo"]
    assert finished == [Finished(request_id, "base", "chat", 500, STATS)]


def test_a_failing_backend_mid_stream_still_ends_with_done():
    client, _, finished = make_client([Delta("a"), RuntimeError("replica died")])
    events = list(event_data(client.post("/v1/completions", json={"model": "base", "prompt": "x", "stream": True})))
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
    assert "replica died" not in events[-2]
    assert finished[0].status == 500


def test_overload_is_503_with_retry_after():
    client, _, _ = make_client([ApiError(503, "too many requests")])
    for stream in (False, True):
        response = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "overloaded_error"


def test_non_streaming_failure_is_500_json_with_the_request_id():
    for script in (ended([Delta("x", finish_reason="error", error="NaN logits")]),
                   [ApiError(500, "internal error: KeyError('x') in pid=12")]):
        client, backend, _ = make_client(script)
        response = client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
        assert backend.calls[0].request_id in response.json()["error"]["message"]


def test_success_is_logged_with_stats_and_model_resolution():
    client, backend, finished = make_client(ended([Delta("ok", finish_reason="stop", stats=STATS)]))
    reply = client.post("/v1/chat/completions", json={**CHAT, "model": "lora"}).json()
    assert reply["usage"]["total_tokens"] == 7 and reply["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "base-alias"}).status_code == 200
    assert [c.adapter for c in backend.calls] == ["lora", None]
    # one id: the response's, the engine request's (the call's) and the request log's
    assert finished[0] == Finished(reply["id"], "lora", "chat", 200, STATS) and backend.calls[0].request_id == reply["id"]


def test_a_call_carries_its_api_keys_hash_as_tenant_never_the_key():
    backend = ScriptedBackend(ended([Delta("ok", finish_reason="stop", stats=STATS)]))
    client = TestClient(build_api(backend, ApiSettings("base", (), (), api_keys=("sk-one", "sk-two"))))
    generate = {"prompt_config": {"instruction": "Greet", "input": ""}, "generation_config": {"max_new_tokens": 2}}
    for key, path, body in [("sk-one", "/v1/chat/completions", CHAT), ("sk-two", "/v1/completions", {"model": "base", "prompt": "x"}),
                            ("sk-one", "/generate", generate)]:
        response = client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
    assert [call.tenant for call in backend.calls] == [client_id("sk-one"), client_id("sk-two"), client_id("sk-one")]
    assert not any("sk-" in repr(call) or b"sk-" in pickle.dumps(call) for call in backend.calls)
    open_api, open_backend, _ = make_client(ended([Delta("ok", finish_reason="stop", stats=STATS)]))
    assert open_api.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-one"}).status_code == 200
    assert open_backend.calls[0].tenant is None  # no keys: everyone is one tenant


def test_generate_returns_stripped_output():
    client, backend, _ = make_client(ended([Delta(" Hello!\n", finish_reason="stop", stats=STATS)]))
    body = {"prompt_config": {"instruction": "Greet", "input": ""}, "generation_config": {"max_new_tokens": 7}}
    assert client.post("/generate", json=body).json() == {"output": "Hello!"}
    assert backend.calls[0].prompt == Instruction("Greet", "")
    assert backend.calls[0].overrides.max_tokens == 7


@pytest.mark.parametrize("extra", [{"logprobs": True}, {"logprobs": 21}, {"best_of": 2}, {"suffix": "x"}, {"n": 0}])
def test_unsupported_completion_options_are_400(extra):
    client, _, _ = make_client([])
    response = client.post("/v1/completions", json={"model": "base", "prompt": "x", **extra})
    assert response.status_code == 400 and response.json()["error"]["param"] == next(iter(extra))


def test_request_fields_become_engine_params():
    request = ChatCompletionRequest.model_validate(
        {**CHAT, "max_completion_tokens": 9, "stop": "END", "top_k": -1, "seed": 3, "presence_penalty": 0.5}
    )
    overrides = request.to_overrides()
    assert overrides.temperature is None and overrides.top_p is None  # left to the server's defaults
    params = overrides.resolve(GenerationDefaults(temperature=0.3, top_k=20))
    assert (params.max_tokens, params.stop, params.top_k, params.seed) == (9, ["END"], 0, 3)
    assert params.temperature == 0.3 and params.presence_penalty == 0.5
    plain = ChatCompletionRequest.model_validate(CHAT).to_overrides().resolve(GenerationDefaults(top_k=20))
    assert plain.top_k == 20 and plain.max_tokens == GenerationDefaults().max_tokens


@pytest.mark.parametrize("error, status", [
    (UnknownAdapterError("x"), 404), (PromptTooLongError("x"), 413), (InvalidRequestError("x"), 400),
    (EngineOverloadedError("x"), 503), (EngineDeadError("x"), 503), (RuntimeError("x"), 500),
])
def test_engine_errors_map_to_http_statuses(error, status):
    """A dead engine is the replica's trouble, not the client's: 503, so a retry goes elsewhere."""
    assert ApiError.from_error(error).status == status


def test_a_refusal_crosses_ray_intact():
    """The replica yields refusals as values: they are pickled on the way to the ingress."""
    refusal = ApiError(429, "slow down", param="model", code="rate_limit_exceeded", retry_after=2.5)
    copy = pickle.loads(pickle.dumps(refusal))
    assert copy == refusal and copy.type == "rate_limit_error" and copy.retry_after == 2.5
    assert copy.body.model_dump() == {"error": {"message": "slow down", "type": "rate_limit_error", "param": "model",
                                                "code": "rate_limit_exceeded"}}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a\ud800"}]}, "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "system", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {**CHAT, "stop": ["ok", "\ud83d"]}, "stop.1"),
    ("/v1/completions", {"model": "base", "prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"model": "base\ud800", "prompt": "x"}, "model"),
    ("/generate", {"prompt_config": {"instruction": "x", "input": "\udc80"}}, "prompt_config.input"),
])
def test_text_that_cannot_be_encoded_is_400_naming_the_field(path, body, param):
    client, backend, _ = make_client([])
    response = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert backend.calls == []


def test_bytes_that_are_not_utf8_are_400_naming_the_field():
    client, _, _ = make_client([])
    body = b'{"model": "base", "messages": [{"role": "user", "content": "caf\xe9 \xff"}]}'
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0.content"
    bad_key = client.post("/v1/chat/completions", content=b'{"\xff": 1}', headers={"content-type": "application/json"})
    assert bad_key.status_code == 400 and bad_key.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, status", [
    (b"[" * 100_000 + b"]" * 100_000, 400), (b"{bad json", 400), (b'{"model": 1}', 400), (b"", 400),
])
def test_errors_before_our_code_runs_use_openai_error_json(body, status):
    client, _, _ = make_client([])
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status and set(response.json()) == {"error"}
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    for response in (client.get("/v1/nowhere"), client.get("/v1/chat/completions")):
        assert response.status_code in (404, 405) and response.json()["error"]["message"]


def test_every_error_answer_is_the_declared_error_model_serialised():
    """HTTP error bodies and SSE error events are ErrorResponse.model_dump_json() byte for byte,
    so they cannot drift from the schema the OpenAPI document declares for them."""
    client, _, _ = make_client([Delta("a"), ApiError(503, "busy")])
    small = TestClient(build_api(ScriptedBackend([]), ApiSettings("base", (), (), max_body_bytes=64)))
    answers = [
        client.post("/v1/chat/completions", content=b"{bad json", headers={"content-type": "application/json"}),
        client.post("/v1/chat/completions", json={**CHAT, "model": "nobody"}),
        client.get("/v1/nowhere"),
        small.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "x" * 128}]}),
    ]
    assert [a.status_code for a in answers] == [400, 404, 404, 413]
    bodies = [a.content for a in answers]
    streamed = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    bodies += [event.encode() for event in event_data(streamed) if event.startswith('{"error"')]
    assert len(bodies) == 5
    for body in bodies:
        assert body == ErrorResponse.model_validate_json(body).model_dump_json().encode()
    declared = client.app.openapi()["paths"]["/v1/chat/completions"]["post"]["responses"]["404"]["content"]
    assert declared["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


class BrokenBackend:
    def stream(self, call: GenerateCall):
        raise RuntimeError(f"actor ServeReplica:llm died (pid=4242, ip=10.1.2.3) for {call.request_id}")


def test_an_unexpected_exception_is_a_generic_500_and_logged(caplog):
    client = TestClient(build_api(BrokenBackend(), ApiSettings("base", (), ())), raise_server_exceptions=False)
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    error = response.json()["error"]
    assert response.status_code == 500 and error["type"] == "server_error"
    request_id = error["message"].split("request ")[1].split(";")[0]
    assert any(request_id in r.getMessage() for r in caplog.records)


def test_the_error_body_check_finds_internals():
    ray_style = ('{"error": {"message": "ray::ServeReplica:llm:LLMServer.stream() (pid=4242, ip=10.1.2.3, '
                 'actor_id=ab12) RuntimeError: boom"}}')
    assert leaks(error_payloads(500, ray_style.encode()))
    assert leaks(error_payloads(200, b'data: {"chunk": 1}\n\ndata: {"error": {"message": "Traceback (most"}}\n\n'))
    assert not leaks(error_payloads(500, b'{"error": {"message": "The server had an error while processing '
                                         b'request 3f2a; its log has the details."}}'))
    assert not leaks(error_payloads(200, b'data: {"text": "Traceback is fine in generated text"}\n\n'))


@pytest.mark.parametrize("body", [
    b'data:{"error": {"message": "pid=1"}}\n\n',  # no space after the colon
    b'data: {"error":\ndata: {"message": "pid=1"}}\n\n',  # one event's data on two lines
    b'data: {"chunk": 1}\r\n\r\ndata: {"error": {"message": "pid=1"}}',  # CRLF; the stream cut before its blank line
])
def test_error_events_are_found_as_the_client_reads_a_stream(body):
    assert error_payloads(200, body) and leaks(error_payloads(200, body))
    assert error_payloads(200, body.replace(b'"error"', b'"choices"')) == []


@pytest.mark.parametrize("extra, param", [
    ({"stop": ["s"] * 17}, "stop"), ({"stop": "x" * 129}, "stop"), ({"stop": [""]}, "stop"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_costly_fields_are_bounded(extra, param):
    client, _, _ = make_client([])
    response = client.post("/v1/chat/completions", json={**CHAT, **extra})
    assert response.status_code == 400 and response.json()["error"]["param"].startswith(param)


def test_a_guard_stop_is_told_as_vllms_stop_reason():
    looped = dataclasses.replace(STATS, stop_reason="repetition")
    client, _, _ = make_client(ended([Delta("La vida", finish_reason="stop", stats=looped)]))
    choice = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "repetition")
    events = list(event_data(client.post("/v1/completions", json={"model": "base", "prompt": "x", "stream": True})))
    assert json.loads(events[-2])["choices"][0]["stop_reason"] == "repetition"
    client, _, _ = make_client(ended([Delta("ok", finish_reason="stop", stats=STATS)]))
    assert client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["stop_reason"] is None


def test_routes_declare_their_reply_schemas():
    client, _, _ = make_client([])
    paths = client.get("/openapi.json").json()["paths"]
    declared = {path: paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
                for path, method in [("/v1/chat/completions", "post"), ("/v1/completions", "post"),
                                     ("/generate", "post"), ("/v1/models", "get")]}
    assert [ref.rsplit("/", 1)[-1] for ref in declared.values()] == [
        "ChatCompletion", "Completion", "GenerateResponse", "ModelList"]
    streams = {path: paths[path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
               for path in ("/v1/chat/completions", "/v1/completions")}
    payloads = {path: [s["$ref"].rsplit("/", 1)[-1] for s in event["properties"]["data"]["anyOf"][1]["contentSchema"]["anyOf"]]
                for path, event in streams.items()}
    assert payloads == {"/v1/chat/completions": ["ChatCompletionChunk", "ErrorResponse"],
                        "/v1/completions": ["Completion", "ErrorResponse"]}
    assert not [path for path in paths if path.startswith("/_")]  # the routes that document the streams are hidden


def _checked_by_schemathesis(path: str, status: int, content: bytes):
    """Validate one reply of `path` against the app's OpenAPI document as the fuzzing test does."""
    import datetime

    import httpx
    import schemathesis

    schema = schemathesis.openapi.from_dict(make_client([])[0].app.openapi())
    schema.validate()
    reply = httpx.Client(transport=httpx.MockTransport(
        lambda _: httpx.Response(status, headers={"content-type": "text/event-stream"}, content=content))).post(
        f"http://test{path}")
    reply.elapsed = datetime.timedelta(0)  # what schemathesis reads; a mock transport leaves it unset
    return schema[path]["POST"].validate_response(reply)


@pytest.mark.parametrize("path, script", [
    ("/v1/chat/completions", ended([Delta("a"), Delta("b", finish_reason="stop", stats=STATS)])),
    ("/v1/completions", ended([Delta("a"), Delta("b", finish_reason="stop", stats=STATS)])),
    ("/v1/chat/completions", [Delta("a"), ApiError(503, "busy")]),
    ("/v1/completions", [Delta("a"), RuntimeError("replica died")]),
])
def test_streams_match_the_events_their_route_declares(path, script):
    client, _, _ = make_client(script)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    if path == "/v1/completions":
        body = {"model": "base", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    reply = client.post(path, json=body)
    assert reply.status_code == 200 and reply.text.endswith("data: [DONE]\n\n")
    assert _checked_by_schemathesis(path, 200, reply.content) is None


@pytest.mark.parametrize("events", [
    b'data: {"id": "x", "object": "text_completion", "created": 1, "model": "m", "choices": []}\n\n',
    b'data: {"error": {"message": 3}}\n\n', b"data: [NOPE]\n\n",
])
def test_a_stream_the_route_does_not_declare_fails_the_schema_check(events):
    from schemathesis.openapi.checks import JsonSchemaError

    with pytest.raises(JsonSchemaError, match="SSE event violates schema"):
        _checked_by_schemathesis("/v1/chat/completions", 200, events)


def test_n_choices_end_after_the_last_one_with_summed_usage():
    script = ended([Delta("a", index=0), Delta("b", index=1), Delta(finish_reason="stop", stats=STATS, index=1),
                    Delta("c", finish_reason="length", stats=STATS, index=0)])
    client, _, finished = make_client(script)
    reply = client.post("/v1/chat/completions", json={**CHAT, "n": 2}).json()
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in reply["choices"]] == [
        (0, "ac", "length"), (1, "b", "stop")]
    assert reply["usage"]["completion_tokens"] == 2 * STATS.completion_tokens
    assert finished[0].status == 200 and finished[0].stats.completion_tokens == 2 * STATS.completion_tokens
    events = list(event_data(client.post("/v1/chat/completions", json={**CHAT, "n": 2, "stream": True})))
    finishes = [(c["index"], c["finish_reason"]) for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
    assert finishes == [(1, "stop"), (0, "length")] and events[-1] == "[DONE]"


def test_one_failed_choice_fails_the_request():
    client, _, finished = make_client(ended([Delta("a", index=0), Delta(finish_reason="error", error="NaN", stats=STATS, index=1)]))
    assert client.post("/v1/chat/completions", json={**CHAT, "n": 2}).status_code == 500
    assert finished[0].status == 500


def test_one_model_card_or_openais_404():
    client, _, _ = make_client([])
    assert client.get("/v1/models/lora").json() == {"id": "lora", "object": "model", "created": 0,
                                                   "owned_by": "lora-serve", "root": "base", "parent": "base"}
    assert client.get("/v1/models/base-alias").json()["id"] == "base"
    missing = client.get("/v1/models/org/nope")
    assert missing.status_code == 404
    assert missing.json()["error"] == {"message": "The model `org/nope` does not exist", "type": "invalid_request_error",
                                       "param": "model", "code": "model_not_found"}


HARMLESS = {"store": True, "metadata": {"team": "a"}, "user": "u1", "service_tier": "auto",
            "parallel_tool_calls": False, "prediction": None, "prompt_cache_key": "k", "safety_identifier": "s",
            "prompt_cache_retention": "24h", "prompt_cache_options": {"mode": "implicit", "ttl": "30m"},
            "reasoning_effort": "low", "verbosity": "high", "audio": None, "web_search_options": None,
            "moderation": None, "functions": None, "function_call": None,
            "modalities": ["text"], "stream_options": {"include_usage": True, "include_obfuscation": False}}


def test_fields_that_cannot_change_the_reply_are_ignored_with_one_debug_line(caplog):
    client, backend, _ = make_client(ended([Delta("ok", finish_reason="stop", stats=STATS)]))
    with caplog.at_level("DEBUG", logger="deployments.http.ignored_fields"):
        reply = client.post("/v1/chat/completions", json={**CHAT, **HARMLESS})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "ok"
    lines = [r.getMessage() for r in caplog.records if r.name == "deployments.http.ignored_fields"]
    assert len(lines) == 1 and reply.json()["id"] in lines[0] and "store" in lines[0] and "verbosity" in lines[0]
    assert "prediction" not in lines[0]  # null: not a field the request set to anything
    assert backend.calls[0].overrides == ChatCompletionRequest.model_validate(CHAT).to_overrides()


def test_a_text_parts_cache_breakpoint_is_ignored():
    client, backend, _ = make_client(ended([Delta("ok", finish_reason="stop", stats=STATS)]))
    part = {"type": "text", "text": "hi", "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "30m"}}
    assert client.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": [part]}]}).status_code == 200
    assert backend.calls[0].messages[0].content == "hi"


@pytest.mark.parametrize("extra, param", [
    ({"modalities": ["text", "audio"]}, "modalities"), ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"), ({"web_search_options": {}}, "web_search_options"),
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"), ({"function_call": "auto"}, "function_call"),
    ({"max_token": 5}, "max_token"), ({"temprature": 0.5}, "temprature"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
     "messages.0.content"),
])
def test_fields_that_would_change_the_reply_are_still_400_naming_the_field(extra, param):
    """Work the server does not do, content it cannot read, and unknown (misspelt) fields."""
    client, backend, _ = make_client([])
    response = client.post("/v1/chat/completions", json={**CHAT, **extra})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"].startswith(param)
    if not param.startswith(("messages", "max_token", "temprature")):
        assert "not supported" in error["message"]
    assert backend.calls == []


@pytest.mark.parametrize("bias, param", [
    ({"abc": 1}, "logit_bias.abc"), ({"-3": 1}, "logit_bias.-3"), ({"1.5": 1}, "logit_bias.1.5"),
    ({"7": 100.5}, "logit_bias.7"), ({"7": -101}, "logit_bias.7"), ({str(i): 1 for i in range(301)}, "logit_bias"),
])
@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT), ("/v1/completions", {"model": "base", "prompt": "x"})])
def test_a_bad_logit_bias_is_a_400_naming_the_entry(path, body, bias, param):
    client, backend, _ = make_client([])
    response = client.post(path, json={**body, "logit_bias": bias})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert backend.calls == []


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT), ("/v1/completions", {"model": "base", "prompt": "x"})])
def test_logit_bias_reaches_the_engine_with_integer_ids(path, body):
    client, backend, _ = make_client(ended([Delta("ok", finish_reason="stop", stats=STATS)]))
    assert client.post(path, json={**body, "logit_bias": {"5": 100, "300": -100, "7": 0.5}}).status_code == 200
    assert backend.calls[0].overrides.logit_bias == {5: 100.0, 300: -100.0, 7: 0.5}


CONTINUOUS = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}


def _usages(events: list[str]) -> list[tuple[int | None, dict | None]]:
    """(choice index or None for the usage-only chunk, usage) of each chunk."""
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    return [(c["choices"][0]["index"] if c["choices"] else None, c["usage"]) for c in chunks]


def _usage(prompt: int, completion: int, cached: int = 4) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT), ("/v1/completions", {"model": "base", "prompt": "x"})])
def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(path, body):
    client, _, _ = make_client(ended([Delta("Hel", token_ids=[1], prompt_tokens=5, cached_prompt_tokens=4),
                                      Delta("lo", token_ids=[2], finish_reason="stop", stats=STATS, prompt_tokens=5)]))
    usages = _usages(list(event_data(client.post(path, json={**body, **CONTINUOUS}))))
    role = [(0, _usage(5, 0))] if path == "/v1/chat/completions" else []
    assert usages == role + [(0, _usage(5, 1)), (0, _usage(5, 2)), (0, _usage(5, 2)), (None, _usage(5, 2))]


def test_continuous_usage_counts_each_choice_on_its_own():
    stats = dataclasses.replace(STATS, completion_tokens=1)
    client, _, _ = make_client(ended([Delta("a", token_ids=[1], index=0, prompt_tokens=5, cached_prompt_tokens=4),
                                      Delta("b", token_ids=[2], index=1, prompt_tokens=5, cached_prompt_tokens=4),
                                      Delta("c", token_ids=[3], index=1, finish_reason="stop", stats=dataclasses.replace(stats, completion_tokens=2), prompt_tokens=5),
                                      Delta("", index=0, finish_reason="stop", stats=stats, prompt_tokens=5)]))
    usages = _usages(list(event_data(client.post("/v1/completions", json={"model": "base", "prompt": "x", "n": 2, **CONTINUOUS}))))
    assert usages == [(0, _usage(5, 1)), (1, _usage(5, 1)), (1, _usage(5, 2)), (1, _usage(5, 2)), (0, _usage(5, 1)),
                      (None, _usage(5, 3))]


def test_continuous_usage_stats_need_include_usage_as_in_vllm():
    client, _, _ = make_client(ended([Delta("ok", token_ids=[1], finish_reason="stop", stats=STATS, prompt_tokens=5)]))
    body = {**CHAT, "stream": True, "stream_options": {"continuous_usage_stats": True}}
    assert {usage for _, usage in _usages(list(event_data(client.post("/v1/chat/completions", json=body))))} == {None}
