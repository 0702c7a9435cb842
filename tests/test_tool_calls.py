"""Tool calls read out of a reply streamed in pieces (deployments/tool_calls.py)."""

from __future__ import annotations

import json

import pytest

from deployments.tool_calls import ToolCallSplitter, parse_tool_calls

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
