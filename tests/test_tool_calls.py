"""Tool calls read out of a reply streamed in pieces (deployments/http/tool_calls.py)."""

from __future__ import annotations

import json

import pytest

from deployments.http.structured import OfferedTools
from deployments.http.tool_calls import ToolCallSplitter, parse_tool_calls, with_tool_calls
from engine.request import Delta

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def split(pieces: list[str]) -> tuple[str, list]:
    splitter = ToolCallSplitter()
    content = "".join(splitter.feed(piece) for piece in pieces)
    rest, calls = splitter.finish()
    return content + rest, calls


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_content_streams_and_calls_are_parsed_whatever_the_piece_size(size):
    text = "Let me look.\n" + CALL + "\n" + CALL.replace("Paris", "Rome")
    content, calls = split([text[i : i + size] for i in range(0, len(text), size)])
    assert content == "Let me look.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert calls[0].id != calls[1].id


def test_a_piece_that_may_start_the_tag_waits_and_plain_text_passes():
    splitter = ToolCallSplitter()
    assert splitter.feed("a <tool") == "a "
    assert splitter.feed("s are fun") == "<tools are fun"
    assert splitter.finish() == ("", [])


@pytest.mark.parametrize("text", ["<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                                  "<tool_call>[1, 2]"])
def test_a_malformed_call_stays_content(text):
    assert parse_tool_calls(text) is None
    assert split([text]) == (text, [])


def test_an_unclosed_last_call_still_counts():
    (call,) = parse_tool_calls('<tool_call>{"name": "f", "parameters": {"x": 1}}')
    assert call.name == "f" and json.loads(call.arguments) == {"x": 1}


def test_a_whole_call_before_a_cut_closing_tag_counts():
    (call,) = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_')
    assert call.name == "f" and json.loads(call.arguments) == {"x": 1}
    assert parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {}} and more') is None


WEATHER_ONLY = OfferedTools(("get_weather",), forced=True)


def cut(text: str, offered: OfferedTools) -> tuple[str, list]:
    splitter = ToolCallSplitter(offered)
    content = "".join(splitter.feed(piece) for piece in text)  # one character at a time
    rest, calls = splitter.finish(cut=True)
    return content + rest, calls


@pytest.mark.parametrize("text, arguments", [
    ('<tool_call>\n{"name":"get_weather","arguments":{"city":"Pa', '{"city":"Pa'),
    ('<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}', '{"city":"Paris"}'),
    ('<tool_call>\n{"name":"get_weather","argu', ""),
    ('<tool_call>\n{"name":"get_wea', ""),  # forced: the only offered name that begins so
    ("<tool_c", ""),
])
def test_a_forced_call_cut_by_max_tokens_is_a_call_with_the_arguments_so_far(text, arguments):
    content, (call,) = cut(text, WEATHER_ONLY)
    assert content == "" and call.name == "get_weather" and call.arguments == arguments


def test_a_forced_cut_name_that_begins_two_offered_names_is_dropped_not_content():
    offered = OfferedTools(("get_weather", "get_time"), forced=True)
    assert cut('<tool_call>\n{"name":"get_', offered) == ("", [])
    assert cut('<tool_call>\n{"name":"get_t', offered)[1][0].name == "get_time"


def test_an_auto_reply_cut_in_its_second_call_keeps_its_text_and_both_calls():
    offered = OfferedTools(("get_weather",), forced=False)
    text = "Let me look.\n" + CALL + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Ro'
    content, calls = cut(text, offered)
    assert content == "Let me look.\n"
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", json.dumps({"city": "Paris"})), ("get_weather", '{"city": "Ro')]
    # unforced, a name not yet whole is not guessed; the markup is dropped all the same
    assert cut('Hm.\n<tool_call>\n{"name": "get_wea', offered) == ("Hm.\n", [])
    # before the whole tag, the text may be anything: it stays content
    assert cut("a < b and <tool_c", offered) == ("a < b and <tool_c", [])


async def test_each_choice_keeps_its_own_finish_reason_and_cut_calls():
    async def items():
        yield Delta(CALL[:30], index=0)
        yield Delta(CALL[:53], index=1)
        yield Delta(CALL[30:], index=0, finish_reason="stop")
        yield Delta("", index=1, finish_reason="length")

    out = [item async for item in with_tool_calls(items(), WEATHER_ONLY)]
    ends = {item.index: item for item in out if item.finish_reason}
    assert all(item.text == "" for item in out)
    assert ends[0].finish_reason == "tool_calls" and json.loads(ends[0].tool_calls[0].arguments) == {"city": "Paris"}
    assert ends[1].finish_reason == "length"
    assert [(c.name, c.arguments) for c in ends[1].tool_calls] == [("get_weather", '{"ci')]
