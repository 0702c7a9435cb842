"""POST /v1/responses: the mapping onto the chat request and the translation back (over a
scripted fake backend), then the openai SDK's `responses.create` / `responses.stream` and the
OpenAI Agents SDK's default model class (OpenAIResponsesModel) as real clients of the served
tiny model."""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool
from fastapi.testclient import TestClient

from client.stream import event_data
from deployments.contract.errors import ApiError
from deployments.contract.messages import GenerateCall
from deployments.http.api import ApiSettings, Finished, build_api
from engine.request import TokenLogprob
from engine.prompt import ChatMessage
from engine.request import Delta
from engine.tools import ToolCall
from tests.fakes import STATS, ScriptedBackend, ScriptedStream, ended, served_on_a_port
from tests.test_structured_clients import Person  # the same bounded model the chat clients parse
from tests.serve_fixtures import SERVED_MODEL as MODEL

PERSON = {
    "type": "object", "additionalProperties": False, "required": ["name", "age"],
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
}
CITY = {"type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"enum": ["Paris", "Rome"]}}}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "parameters": CITY,
           "strict": True}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def make_client(script: list) -> tuple[TestClient, ScriptedBackend, list]:
    finished = []
    backend = ScriptedBackend(script)
    return TestClient(build_api(backend, ApiSettings("base", (), (), on_finish=finished.append))), backend, finished


def same_call(one: GenerateCall, other: GenerateCall) -> bool:
    """The calls ask for the same (their request ids differ)."""
    return {**vars(one), "request_id": ""} == {**vars(other), "request_id": ""}


def events_of(reply: httpx.Response) -> list[dict]:
    return [json.loads(data) for data in event_data(reply)]


# --- the mapping onto the chat request (fake backend) ---


def test_input_items_become_the_chat_history():
    client, backend, _ = make_client(ended([Delta("ok", finish_reason="stop", stats=STATS)]))
    body = {"model": "base", "instructions": "Be brief.", "tools": [WEATHER], "input": [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in "},
                                                       {"type": "input_text", "text": "Paris and Rome?"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me look.", "annotations": [], "logprobs": None}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Paris"}', "status": "completed"},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "Rain"}]},
        {"role": "user", "content": "Thanks"},
    ]}
    assert client.post("/v1/responses", json=body).status_code == 200
    call = backend.calls[0]
    assert call.messages == [
        ChatMessage("system", "Be brief."), ChatMessage("system", "Use tools."),
        ChatMessage("user", "Weather in Paris and Rome?"),
        ChatMessage("assistant", "Let me look.", (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
                                                  ToolCall("call_2", "get_weather", '{"city": "Rome"}'))),
        ChatMessage("tool", "Sunny", tool_call_id="call_1"), ChatMessage("tool", "Rain", tool_call_id="call_2"),
        ChatMessage("user", "Thanks"),
    ]
    assert call.tools == [CHAT_WEATHER]


@pytest.mark.parametrize("responses_fields, chat_fields", [
    ({"max_output_tokens": 7, "temperature": 0.3, "top_p": 0.9},
     {"max_completion_tokens": 7, "temperature": 0.3, "top_p": 0.9}),
    ({"text": {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}},
     {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}}),
    ({"text": {"format": {"type": "json_object"}}}, {"response_format": {"type": "json_object"}}),
    ({"tools": [WEATHER], "tool_choice": "required"}, {"tools": [CHAT_WEATHER], "tool_choice": "required"}),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}},
     {"tools": [CHAT_WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ({"tools": [WEATHER], "tool_choice": "none"}, {"tools": [CHAT_WEATHER], "tool_choice": "none"}),
    ({"include": ["message.output_text.logprobs"], "top_logprobs": 3}, {"logprobs": True, "top_logprobs": 3}),
])
def test_a_response_makes_the_call_the_equivalent_chat_makes(responses_fields, chat_fields):
    """One contract: the GenerateCall is the chat route's for the same conversation and settings."""
    client, backend, _ = make_client(ended([Delta("{}", finish_reason="stop", stats=STATS)]))
    assert client.post("/v1/responses", json={"model": "base", "input": "hi", **responses_fields}).status_code == 200
    assert client.post("/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": "hi"}], **chat_fields}).status_code == 200
    from_responses, from_chat = backend.calls
    assert same_call(from_responses, from_chat) and from_responses.request_id.startswith("resp_")


IGNORED = {"store": True, "metadata": {"k": "v"}, "user": "u1", "service_tier": "auto", "safety_identifier": "h",
           "prompt_cache_key": "k", "prompt_cache_retention": "24h", "parallel_tool_calls": False,
           "truncation": "disabled", "max_tool_calls": 3, "include": ["reasoning.encrypted_content"],
           "reasoning": {"effort": "minimal"}, "text": {"verbosity": "low"}, "background": False,
           "stream_options": {"include_obfuscation": False}, "previous_response_id": None, "conversation": None}


def test_fields_that_cannot_change_the_reply_are_accepted_and_ignored():
    client, backend, _ = make_client(ended([Delta("ok", finish_reason="stop", stats=STATS)]))
    reply = client.post("/v1/responses", json={"model": "base", "input": "hi", **IGNORED})
    assert reply.status_code == 200 and reply.json()["metadata"] == {"k": "v"} and reply.json()["store"] is False
    assert client.post("/v1/responses", json={"model": "base", "input": "hi"}).status_code == 200
    with_ignored, without = backend.calls
    assert same_call(with_ignored, without)


@pytest.mark.parametrize("fields, param, words", [
    ({"previous_response_id": "resp_123"}, "previous_response_id", "not stored"),
    ({"conversation": "conv_1"}, "conversation", None),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", None),
    ({"background": True}, "background", "not supported"),
    ({"tools": [{"type": "web_search"}]}, "tools.0", "'web_search' are not supported"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools.0", "not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input.0.message.content.0", "'input_image' are not supported"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input.0", "'reasoning' are not supported"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0", "not supported"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{nope"}]},
     "input.0.function_call.arguments", "JSON"),
    ({"reasoning": {"effort": "high"}}, "reasoning.effort", "do not reason"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objectx"}}}},
     "text.format.json_schema.schema", None),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, None, "not among the tools"),
    ({"tool_choice": "required"}, None, "tool_choice needs tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "text": {"format": {"type": "json_object"}}}, None,
     "text.format cannot be combined"),
    ({"input": []}, "input", None),
    ({"max_output_tokens": 0}, "max_output_tokens", None),
    ({"top_logprobs": 21}, "top_logprobs", None),
    ({"n": 2}, "n", "Extra inputs"),
])
def test_what_this_server_does_not_do_is_a_400_naming_the_field(fields, param, words):
    client, backend, _ = make_client(ended([Delta("ok", finish_reason="stop", stats=STATS)]))
    reply = client.post("/v1/responses", json={"model": "base", "input": "hi", **fields})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and (words is None or words in error["message"]) and not backend.calls


def test_an_unknown_model_is_openais_404():
    client, _, _ = make_client([])
    reply = client.post("/v1/responses", json={"model": "nope", "input": "hi"})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"


# --- the result and the events (fake backend) ---


def test_text_and_usage_as_a_response():
    client, backend, finished = make_client(ended([Delta("Hel"), Delta("lo", finish_reason="stop", stats=STATS)]))
    reply = client.post("/v1/responses", json={"model": "base", "input": "hi", "instructions": "x"}).json()
    (message,) = reply["output"]
    assert (reply["object"], reply["status"], reply["incomplete_details"], reply["instructions"]) == (
        "response", "completed", None, "x")
    assert message["type"] == "message" and message["status"] == "completed" and message["id"].startswith("msg_")
    assert message["content"] == [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": None}]
    assert {k: reply["usage"][k] for k in ("input_tokens", "output_tokens", "total_tokens")} == {
        "input_tokens": 5, "output_tokens": 2, "total_tokens": 7}
    assert reply["usage"]["input_tokens_details"] == {"cached_tokens": 4}
    assert finished == [Finished(reply["id"], "base", "responses", 200, STATS)] and backend.calls[0].request_id == reply["id"]


def test_a_tool_call_becomes_a_function_call_item():
    client, _, _ = make_client(ended([Delta("Checking. "), Delta(CALL_TEXT, finish_reason="stop", stats=STATS)]))
    reply = client.post("/v1/responses", json={"model": "base", "input": "hi", "tools": [WEATHER]}).json()
    message, call = reply["output"]
    assert message["content"][0]["text"] == "Checking. " and reply["status"] == "completed"
    assert (call["type"], call["name"], json.loads(call["arguments"]), call["status"]) == (
        "function_call", "get_weather", {"city": "Paris"}, "completed")
    assert call["call_id"].startswith("call_") and call["id"] == "fc_" + call["call_id"].removeprefix("call_")


def test_a_reply_cut_by_max_output_tokens_is_incomplete():
    client, _, _ = make_client(ended([Delta("abc", finish_reason="length", stats=STATS)]))
    reply = client.post("/v1/responses", json={"model": "base", "input": "hi", "max_output_tokens": 2}).json()
    assert (reply["status"], reply["incomplete_details"], reply["output"][0]["status"]) == (
        "incomplete", {"reason": "max_output_tokens"}, "incomplete")
    events = events_of(client.post("/v1/responses", json={"model": "base", "input": "hi", "stream": True}))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_stream_events_are_openais_in_order():
    client, _, _ = make_client(ended([Delta("Chec"), Delta("king. "), Delta(CALL_TEXT, finish_reason="stop", stats=STATS)]))
    events = events_of(client.post("/v1/responses", json={"model": "base", "input": "hi", "tools": [WEATHER],
                                                          "stream": True}))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    completed = events[-1]["response"]
    assert completed["output"] == [events[8]["item"], events[12]["item"]]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Checking. "
    assert events[9]["item"]["arguments"] == "" and events[10]["delta"] == completed["output"][1]["arguments"]
    assert completed["usage"]["total_tokens"] == 7 and events[0]["response"]["status"] == "in_progress"


def test_an_empty_streamed_reply_still_has_its_message():
    client, _, _ = make_client(ended([Delta("", finish_reason="stop", stats=STATS)]))
    events = events_of(client.post("/v1/responses", json={"model": "base", "input": "hi", "stream": True}))
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == ""
    non_streamed = client.post("/v1/responses", json={"model": "base", "input": "hi"}).json()
    assert non_streamed["output"][0]["content"][0]["text"] == ""


def test_logprobs_come_with_the_text():
    lp = [TokenLogprob(5, "a", -0.5, [(5, "a", -0.5), (6, "b", -1.5)])]
    client, _, _ = make_client(ended([Delta("a", token_ids=[5], logprobs=lp, finish_reason="stop", stats=STATS)]))
    body = {"model": "base", "input": "hi", "include": ["message.output_text.logprobs"], "top_logprobs": 1}
    (entry,) = client.post("/v1/responses", json=body).json()["output"][0]["content"][0]["logprobs"]
    assert (entry["token"], entry["logprob"], [t["token"] for t in entry["top_logprobs"]]) == ("a", -0.5, ["a", "b"])
    events = events_of(client.post("/v1/responses", json={**body, "stream": True}))
    assert [e["logprobs"] for e in events if e["type"] == "response.output_text.delta"] == [[entry]]
    assert events[-1]["response"]["output"][0]["content"][0]["logprobs"] == [entry]


def test_a_failure_mid_stream_ends_with_response_failed(caplog):
    client, backend, finished = make_client(ended([Delta("a"), Delta(finish_reason="error", error="boom", stats=STATS)]))
    events = events_of(client.post("/v1/responses", json={"model": "base", "input": "hi", "stream": True}))
    failed = events[-1]
    request_id = backend.calls[0].request_id
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert request_id in failed["response"]["error"]["message"] and "boom" not in failed["response"]["error"]["message"]
    assert failed["response"]["output"] == []  # the message was never finished
    assert any("boom" in r.getMessage() for r in caplog.records) and finished[0].status == 500
    client, _, _ = make_client([Delta("a"), RuntimeError("replica died")])
    events = events_of(client.post("/v1/responses", json={"model": "base", "input": "hi", "stream": True}))
    assert events[-1]["type"] == "response.failed" and "replica died" not in json.dumps(events[-1])


def test_a_refusal_mid_stream_is_an_error_event_and_before_it_the_status():
    client, _, _ = make_client([Delta("a"), ApiError(503, "busy")])
    events = events_of(client.post("/v1/responses", json={"model": "base", "input": "hi", "stream": True}))
    assert {k: events[-1][k] for k in ("type", "message")} == {"type": "error", "message": "busy"}
    client, _, _ = make_client([ApiError(503, "busy")])
    for stream in (False, True):
        reply = client.post("/v1/responses", json={"model": "base", "input": "hi", "stream": stream})
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1"


def _checked_by_schemathesis(app, content: bytes):
    """Validate one /v1/responses stream against the app's OpenAPI document."""
    import schemathesis

    schema = schemathesis.openapi.from_dict(app.openapi())
    reply = httpx.Client(transport=httpx.MockTransport(
        lambda _: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=content))).post(
        "http://test/v1/responses")
    reply.elapsed = datetime.timedelta(0)
    return schema["/v1/responses"]["POST"].validate_response(reply)


def test_streams_match_the_events_the_route_declares():
    for script in (ended([Delta("a"), Delta(CALL_TEXT, finish_reason="length", stats=STATS)]),
                   [Delta("a"), RuntimeError("replica died")], [Delta("a"), ApiError(400, "no")]):
        client, _, _ = make_client(script)
        reply = client.post("/v1/responses", json={"model": "base", "input": "hi", "tools": [WEATHER], "stream": True})
        assert _checked_by_schemathesis(client.app, reply.content) is None
    paths = client.get("/openapi.json").json()["paths"]
    assert paths["/v1/responses"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ResponseObject")
    with pytest.raises(Exception, match="SSE event violates schema"):
        _checked_by_schemathesis(client.app, b'event: response.created\ndata: {"type": "response.created"}\n\n')


# --- the served tiny model, through the openai SDK ---


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=60)


def test_sdk_create_with_a_string_or_messages_and_instructions(client):
    plain = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=6)
    assert plain.status in ("completed", "incomplete") and plain.output[0].type == "message"
    assert plain.output_text == plain.output[0].content[0].text and 0 < plain.usage.output_tokens <= 6
    assert plain.usage.total_tokens == plain.usage.input_tokens + plain.usage.output_tokens
    instructed = client.responses.create(model=MODEL, input=[{"role": "user", "content": "Hello there"}],
                                         instructions="Answer in French.", max_output_tokens=6)
    assert instructed.usage.input_tokens > plain.usage.input_tokens and instructed.instructions == "Answer in French."


def test_sdk_max_output_tokens_cut_is_incomplete(client):
    """A JSON object cannot end within 3 tokens, so the limit cuts it whatever the model prefers."""
    reply = client.responses.create(model=MODEL, input="Name a person.", max_output_tokens=3, text={
        "format": {"type": "json_schema", "name": "person", "schema": PERSON}})
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 3


def test_sdk_json_schema_and_parse(client):
    reply = client.responses.create(model=MODEL, input="Name a person.", max_output_tokens=200, text={
        "format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    assert reply.status == "completed"
    jsonschema.validate(json.loads(reply.output_text), PERSON)
    parsed = client.responses.parse(model=MODEL, input="Name a person.", max_output_tokens=200, text_format=Person)
    assert isinstance(parsed.output_parsed, Person)


def test_sdk_function_call_then_its_output_round_trip(client):
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                                    max_output_tokens=100)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and first.status == "completed"
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    second = client.responses.create(model=MODEL, tools=[WEATHER], max_output_tokens=5, input=[
        {"role": "user", "content": "Weather in Paris?"}, *first.output,
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}])
    assert second.status in ("completed", "incomplete") and second.usage.input_tokens > first.usage.input_tokens


def test_sdk_logprobs(client):
    reply = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, top_logprobs=2,
                                    include=["message.output_text.logprobs"])
    entries = reply.output[0].content[0].logprobs
    assert len(entries) == reply.usage.output_tokens and all(len(e.top_logprobs) == 2 for e in entries)


def test_sdk_stream_text_deltas_add_up_to_the_final_text(client):
    with client.responses.stream(model=MODEL, input="Name a person.", max_output_tokens=200, text_format=Person) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == final.output_text
    assert isinstance(final.output_parsed, Person)
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_sdk_stream_function_call_argument_deltas(client):
    with client.responses.stream(model=MODEL, input="Weather?", tools=[WEATHER], tool_choice="required",
                                 max_output_tokens=100) as stream:
        events = list(stream)
        final = stream.get_final_response()
    (call,) = final.output
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert call.type == "function_call" and arguments == call.arguments
    assert json.loads(arguments)["city"] in ("Paris", "Rome")
    assert [e.type for e in events][-1] == "response.completed"


def test_sdk_previous_response_id_is_a_400_saying_nothing_is_stored(client):
    with pytest.raises(openai.BadRequestError, match="not stored"):
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_1")


# --- the OpenAI Agents SDK's default model class ---


@function_tool
def get_weather(city: Literal["Paris", "Rome"]) -> str:
    """The weather in a city."""
    return f"Sunny in {city}"


def _agent(base_url: str, **settings) -> Agent:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    return Agent(name="weather", instructions="Answer weather questions.", tools=[get_weather],
                 model=OpenAIResponsesModel(model=MODEL, openai_client=client), **settings)


NO_TRACING = RunConfig(tracing_disabled=True)


def test_an_agent_calls_its_tool_through_the_served_model(served):
    """A forced first turn: the call's arguments come from the served model's grammar, the tool runs."""
    agent = _agent(served, model_settings=ModelSettings(tool_choice="required", max_tokens=100),
                   tool_use_behavior="stop_on_first_tool")
    result = Runner.run_sync(agent, "Weather in Paris?", run_config=NO_TRACING)
    assert result.final_output in ("Sunny in Paris", "Sunny in Rome")


class Turns:
    """A fake backend whose n-th call plays the n-th script (a tool call, then an answer)."""

    def __init__(self, *scripts: list):
        self.scripts, self.calls = list(scripts), []

    def stream(self, call) -> ScriptedStream:
        self.calls.append(call)
        return ScriptedStream(self.scripts[len(self.calls) - 1])


async def _run_streamed(agent: Agent, question: str):
    """Runner.run_streamed read to its end (the Agents SDK then uses the Responses event stream)."""
    result = Runner.run_streamed(agent, question, run_config=NO_TRACING)
    async for _ in result.stream_events():
        pass
    return result


@pytest.mark.parametrize("streamed", [False, True])
def test_an_agent_runs_a_tool_loop_to_its_answer(streamed):
    """Two turns as the Agents SDK drives them: a function_call, then its function_call_output sent
    back with the whole history (nothing is stored), then the answer."""
    backend = Turns(ended([Delta(CALL_TEXT, finish_reason="stop", stats=STATS)]),
                    ended([Delta("It is sunny.", finish_reason="stop", stats=STATS)]))
    with served_on_a_port(build_api(backend, ApiSettings(MODEL, (), ()))) as url:
        agent = _agent(url)
        if streamed:
            result = asyncio.run(_run_streamed(agent, "Weather in Paris?"))
        else:
            result = Runner.run_sync(agent, "Weather in Paris?", run_config=NO_TRACING)
    assert result.final_output == "It is sunny."
    first, second = backend.calls
    assert [m.role for m in first.messages] == ["system", "user"] and first.tools[0]["function"]["name"] == "get_weather"
    assert [m.role for m in second.messages] == ["system", "user", "assistant", "tool"]
    (made,) = second.messages[2].tool_calls
    assert (made.name, json.loads(made.arguments)) == ("get_weather", {"city": "Paris"})
    assert second.messages[3] == ChatMessage("tool", "Sunny in Paris", tool_call_id=made.id)
