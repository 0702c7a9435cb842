"""client/: OpenAI streams and chat bodies read and built from wire text (no server)."""

from __future__ import annotations

import httpx
import pytest
from httpx_sse import SSEError

from client.bodies import chat_body, user_message
from client.stream import (
    ErrorEvent, StreamError, achunks, aevent_data, chunks, completion_tokens, delta_text, event_data,
)

CHAT_CHUNK = '{"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}]}'
TEXT_CHUNK = '{"choices": [{"index": 0, "text": " there", "finish_reason": null}]}'
USAGE_CHUNK = '{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}'


def stream(*data: str, content_type: str = "text/event-stream") -> httpx.Response:
    """A response whose body is one `data:` event per item."""
    return httpx.Response(200, headers={"content-type": content_type}, text="".join(f"data: {d}\n\n" for d in data))


def test_chunks_end_at_done_and_give_text_and_usage():
    read = list(chunks(event_data(stream(CHAT_CHUNK, TEXT_CHUNK, USAGE_CHUNK, "[DONE]", CHAT_CHUNK))))
    assert [delta_text(c) for c in read] == ["Hi", " there", ""]
    assert [completion_tokens(c) for c in read] == [None, None, 2]


async def test_async_reading_gives_the_same_chunks():
    read = [c async for c in achunks(aevent_data(stream(CHAT_CHUNK, USAGE_CHUNK, "[DONE]")))]
    assert read == list(chunks(event_data(stream(CHAT_CHUNK, USAGE_CHUNK, "[DONE]"))))


@pytest.mark.parametrize("data, error, message", [
    ((CHAT_CHUNK, '{"error": {"message": "boom", "type": "server_error"}}', "[DONE]"), ErrorEvent, "^boom$"),
    (('{"error": {"message": 3}}',), ErrorEvent, "^3$"),
    ((CHAT_CHUNK,), StreamError, "^the reply stream ended before it was complete$"),
    (("{not json",), StreamError, "^the server sent a malformed event: {not json$"),
])
def test_broken_streams_raise(data, error, message):
    with pytest.raises(error, match=message):
        list(chunks(event_data(stream(*data))))


def test_a_reply_that_is_not_an_event_stream_is_a_transport_error():
    with pytest.raises(SSEError):
        list(event_data(stream(CHAT_CHUNK, content_type="application/json")))
    assert issubclass(SSEError, httpx.TransportError)


def test_chat_body_leaves_unset_fields_to_the_server():
    assert chat_body("m", user_message("hi"), temperature=None, max_tokens=8, seed=0) == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 8, "seed": 0}
    assert chat_body("m", [], stream=False)["stream"] is False
