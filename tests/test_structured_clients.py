"""Structured output and tools through the served tiny app, driven by the openai SDK and
LangChain's ChatOpenAI as their users would (the SDK and LangChain parse the replies)."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field

from tests.serve_fixtures import SERVED_MODEL as MODEL

PERSON = {
    "type": "object", "additionalProperties": False, "required": ["name", "age"],
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"enum": ["Paris", "Rome"]}}},
    },
}
USER = [{"role": "user", "content": "Weather in Paris?"}]


class Person(BaseModel):
    """Bounded fields and no extra keys: a random model's reply must end well within max_tokens."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=99)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chat_model(served):
    return ChatOpenAI(model=MODEL, base_url=f"{served}/v1", api_key="unused", temperature=0, max_tokens=200,
                      max_retries=0, timeout=60)


def test_json_schema_reply_validates(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


def test_sdk_parse_reads_a_pydantic_model(client):
    reply = client.chat.completions.parse(model=MODEL, messages=USER, temperature=0, max_tokens=200,
                                          response_format=Person)
    assert isinstance(reply.choices[0].message.parsed, Person)


def test_json_object_reply_starts_an_object_and_parses_when_it_ends(client):
    for seed in range(4):
        reply = client.chat.completions.create(model=MODEL, messages=USER, temperature=1, seed=seed, max_tokens=60,
                                               response_format={"type": "json_object"})
        text = reply.choices[0].message.content
        assert text.startswith("{")
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_is_parsed_into_tool_calls(client, choice):
    reply = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=200,
                                           tools=[WEATHER], tool_choice=choice)
    choice0 = reply.choices[0]
    assert choice0.finish_reason == "tool_calls" and not choice0.message.content
    (call,) = choice0.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Rome")


def test_forced_tool_call_streams_as_delta_tool_calls(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=200,
                                                 tools=[WEATHER], tool_choice="required", stream=True))
    calls = [c for chunk in chunks if chunk.choices for c in chunk.choices[0].delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["get_weather"] and calls[0].id and calls[0].index == 0
    assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "Rome")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_history_with_tool_calls_and_results_is_accepted(client):
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=8,
                                           tools=[WEATHER], tool_choice="none")
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.choices[0].message.tool_calls is None


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format.json_schema.json_schema.schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
    ({"tool_choice": "required"}, None),
])
def test_bad_structured_requests_are_400(served, body, param):
    response = httpx.post(f"{served}/v1/chat/completions", json={"model": MODEL, "messages": USER, **body})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(chat_model, method):
    person = chat_model.with_structured_output(Person, method=method).invoke("Name a person.")
    assert isinstance(person, Person)


def test_langchain_bind_tools_round_trip(chat_model):
    """bind_tools with a forced call gives an AIMessage with tool_calls; the result goes back."""

    class get_weather(BaseModel):  # noqa: N801 (the tool's name)
        """The weather in a city."""

        city: Literal["Paris", "Rome"]

    model = chat_model.bind_tools([get_weather], tool_choice="get_weather")
    question = HumanMessage("Weather in Paris?")
    ai = model.invoke([question])
    assert isinstance(ai, AIMessage) and ai.tool_calls[0]["name"] == "get_weather"
    assert ai.tool_calls[0]["args"]["city"] in ("Paris", "Rome")
    streamed = None
    for chunk in model.stream([question]):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls[0]["name"] == "get_weather"
    result = ToolMessage("Sunny", tool_call_id=ai.tool_calls[0]["id"])
    answer = chat_model.bind_tools([get_weather]).invoke([question, ai, result])
    assert isinstance(answer, AIMessage)
