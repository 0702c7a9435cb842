"""Reading an OpenAI streaming reply: its SSE events (parsed by httpx-sse), the JSON chunk each
carries, `data: [DONE]` and error events.

The server's contract (README, Streaming and Errors): every event's data is one JSON object;
a failure after streaming began is an error event `{"error": {"message": ...}}` followed by
`data: [DONE]`; `[DONE]` ends every complete stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import httpx
from httpx_sse import EventSource

DONE = "[DONE]"


class StreamError(Exception):
    """A stream that cannot be read to its end: a malformed event, or no [DONE]."""


class ErrorEvent(StreamError):
    """The server's error event; the exception's text is the error's message."""


def event_data(response: httpx.Response) -> Iterator[str]:
    """The data of each server-sent event of `response`, in order ([DONE] included).

    Raises httpx_sse.SSEError (an httpx.TransportError) unless the response is text/event-stream.
    """
    for event in EventSource(response).iter_sse():
        yield event.data


async def aevent_data(response: httpx.Response) -> AsyncIterator[str]:
    """`event_data` of a response read asynchronously."""
    async for event in EventSource(response).aiter_sse():
        yield event.data


def decode_chunk(data: str) -> dict[str, Any] | None:
    """One event's JSON object, or None for [DONE].

    Raises ErrorEvent for an error event and StreamError for data that is not a JSON object.
    """
    if data == DONE:
        return None
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        chunk = None
    if not isinstance(chunk, dict):
        raise StreamError(f"the server sent a malformed event: {one_line(data, 80)}")
    if "error" in chunk:
        raise ErrorEvent(error_text(chunk) or "the server failed during the reply")
    return chunk


def chunks(data: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON chunks of a stream up to [DONE]; StreamError when it ends without [DONE]."""
    for item in data:
        chunk = decode_chunk(item)
        if chunk is None:
            return
        yield chunk
    raise StreamError("the reply stream ended before it was complete")


async def achunks(data: AsyncIterable[str]) -> AsyncIterator[dict[str, Any]]:
    """`chunks` of an asynchronous stream."""
    async for item in data:
        chunk = decode_chunk(item)
        if chunk is None:
            return
        yield chunk
    raise StreamError("the reply stream ended before it was complete")


def delta_text(chunk: dict[str, Any]) -> str:
    """The text of a chunk's first choice: a chat delta's content or a completion's text
    ("" for the role chunk, a finish or usage chunk)."""
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def completion_tokens(chunk: dict[str, Any]) -> int | None:
    """The usage chunk's completion token count; None in any other chunk."""
    usage = chunk.get("usage")
    return usage.get("completion_tokens") if isinstance(usage, dict) else None


def error_text(payload: object) -> str:
    """The message of OpenAI's error JSON ({"error": {"message": ...}}) or FastAPI's {"detail": ...}."""
    if not isinstance(payload, dict):
        return ""
    error = payload.get("error", payload.get("detail"))
    if isinstance(error, dict):
        error = error.get("message") or json.dumps(error)
    if error is not None and not isinstance(error, str):  # a message that is not text, too
        error = json.dumps(error)
    return one_line(error or "")


def one_line(text: str, limit: int = 500) -> str:
    """Whitespace folded to single spaces, cut at `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
