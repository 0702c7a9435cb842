"""The HTTP layer over a scripted fake backend (no Ray, no model): errors, SSE framing, logging."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from deployments.api import ApiSettings, build_api
from deployments.messages import GenerateCall, RequestRejected
from deployments.protocol import ChatCompletionRequest, GenerationDefaults
from engine.errors import (
    EngineDeadError, EngineOverloadedError, InvalidRequestError, PromptTooLongError, UnknownAdapterError,
)
from engine.prompt import Instruction
from engine.request import Delta, RequestStats

STATS = RequestStats(prompt_tokens=5, completion_tokens=2, dropped_messages=0, latency=0.1,
                     time_to_first_token=0.05, tokens_per_second=20.0)
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}


class ScriptedBackend:
    """Plays back a list of items (or raises an exception placed in it) for every call."""

    def __init__(self, script: list):
        self.script, self.calls = script, []

    async def stream(self, call: GenerateCall):
        self.calls.append(call)
        for item in self.script:
            if isinstance(item, Exception):
                raise item
            yield item


def make_client(script: list) -> tuple[TestClient, ScriptedBackend, list]:
    finished = []
    backend = ScriptedBackend(script)
    settings = ApiSettings("base", ("base-alias",), ("lora",), on_finish=lambda *a: finished.append(a))
    return TestClient(build_api(backend, settings)), backend, finished


def sse_events(text: str) -> list:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def test_an_error_mid_stream_becomes_an_error_event_then_done():
    client, _, finished = make_client([Delta("Hel"), Delta("lo", finish_reason="error", error="boom", stats=STATS)])
    events = sse_events(client.post("/v1/chat/completions", json={**CHAT, "stream": True}).text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == "boom"
    assert [json.loads(e)["choices"][0]["delta"].get("content") for e in events[1:3]] == ["Hel", "lo"]
    assert finished == [("base", "chat", 500, STATS)]


def test_a_failing_backend_mid_stream_still_ends_with_done():
    client, _, finished = make_client([Delta("a"), RuntimeError("replica died")])
    events = sse_events(client.post("/v1/completions", json={"model": "base", "prompt": "x", "stream": True}).text)
    assert events[-1] == "[DONE]" and "replica died" in json.loads(events[-2])["error"]["message"]
    assert finished[0][2] == 500


def test_overload_is_503_with_retry_after():
    client, _, _ = make_client([RequestRejected(503, "overloaded_error", "too many requests")])
    for stream in (False, True):
        response = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "overloaded_error"


def test_non_streaming_failure_is_500_json():
    client, _, _ = make_client([Delta("x", finish_reason="error", error="NaN logits")])
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 500 and response.json()["error"]["message"] == "NaN logits"


def test_success_is_logged_with_stats_and_model_resolution():
    client, backend, finished = make_client([Delta("ok", finish_reason="stop", stats=STATS)])
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "lora"}).json()["usage"]["total_tokens"] == 7
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "base-alias"}).status_code == 200
    assert [c.adapter for c in backend.calls] == ["lora", None]
    assert finished[0] == ("lora", "chat", 200, STATS)


def test_generate_returns_stripped_output():
    client, backend, _ = make_client([Delta(" Hello!\n", finish_reason="stop", stats=STATS)])
    body = {"prompt_config": {"instruction": "Greet", "input": ""}, "generation_config": {"max_new_tokens": 7}}
    assert client.post("/generate", json=body).json() == {"output": "Hello!"}
    assert backend.calls[0].prompt == Instruction("Greet", "")
    assert backend.calls[0].sampling.max_tokens == 7


@pytest.mark.parametrize("extra", [{"logprobs": True}, {"echo": True}, {"best_of": 2}, {"suffix": "x"}])
def test_unsupported_completion_options_are_400(extra):
    client, _, _ = make_client([])
    response = client.post("/v1/completions", json={"model": "base", "prompt": "x", **extra})
    assert response.status_code == 400 and response.json()["error"]["param"] == next(iter(extra))


def test_request_fields_become_engine_params():
    request = ChatCompletionRequest.model_validate(
        {**CHAT, "max_completion_tokens": 9, "stop": "END", "top_k": -1, "seed": 3, "presence_penalty": 0.5}
    )
    params = request.to_sampling_params(GenerationDefaults(temperature=0.3, top_k=20))
    assert (params.max_tokens, params.stop, params.top_k, params.seed) == (9, ["END"], 0, 3)
    assert params.temperature == 0.3 and params.presence_penalty == 0.5
    assert ChatCompletionRequest.model_validate(CHAT).to_sampling_params(GenerationDefaults()).top_k == 0


@pytest.mark.parametrize("error, status", [
    (UnknownAdapterError("x"), 404), (PromptTooLongError("x"), 413), (InvalidRequestError("x"), 400),
    (EngineOverloadedError("x"), 503), (EngineDeadError("x"), 503), (RuntimeError("x"), 500),
])
def test_engine_errors_map_to_http_statuses(error, status):
    """A dead engine is the replica's trouble, not the client's: 503, so a retry goes elsewhere."""
    assert RequestRejected.from_error(error).status == status
