"""What no error answer may carry: tracebacks, exception names, actor names, process ids, addresses.

`conftest.py` records the body of every HTTP error and every SSE error event the suite's
clients read (httpx underlies TestClient, the openai SDK and the tests' own calls) and fails
the test that received one carrying any of these.
"""

from __future__ import annotations

import re

import httpx

from client.stream import ErrorEvent, StreamError, decode_chunk, event_data

INTERNALS = re.compile(
    r"Traceback|File \"|\bpid\b|\bip=|\bactor|Actor|ServeReplica|ray::|node_id|"
    r"\b\d{1,3}(?:\.\d{1,3}){3}\b|0x[0-9a-fA-F]{6,}|\b[A-Z][A-Za-z]*(?:Error|Exception)\b"
)


PARSING = "tests.error_bodies.parsing"  # marks the responses error_payloads reads itself (not recorded)


def error_payloads(status: int, body: bytes) -> list[str]:
    """The error bodies in one response: all of it for a 4xx/5xx, else the data of its SSE error
    events, parsed as the client parses a stream (multi-line data, `data:` with or without a space)."""
    if status >= 400:
        return [body.decode("utf-8", "replace")]
    # read as an event stream whatever its type (a JSON body has no events); the blank line ends
    # a last event that a cut stream left open, which the SSE parser would otherwise drop
    stream = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body + b"\n\n",
                            extensions={PARSING: True})
    return [data for data in event_data(stream) if _is_error_event(data)]


def _is_error_event(data: str) -> bool:
    try:
        decode_chunk(data)
    except ErrorEvent:
        return True
    except StreamError:  # not JSON: not an error event (a chunk the client could not read either)
        return False
    return False


def leaks(payloads: list[str]) -> list[str]:
    return [p for p in payloads if INTERNALS.search(p)]
