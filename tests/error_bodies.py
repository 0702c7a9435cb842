"""What no error answer may carry: tracebacks, exception names, actor names, process ids, addresses.

`conftest.py` records the body of every HTTP error and every SSE error event the suite's
clients read (httpx underlies TestClient, the openai SDK and the tests' own calls) and fails
the test that received one carrying any of these.
"""

from __future__ import annotations

import re

INTERNALS = re.compile(
    r"Traceback|File \"|\bpid\b|\bip=|\bactor|Actor|ServeReplica|ray::|node_id|"
    r"\b\d{1,3}(?:\.\d{1,3}){3}\b|0x[0-9a-fA-F]{6,}|\b[A-Z][A-Za-z]*(?:Error|Exception)\b"
)


def error_payloads(status: int, body: bytes) -> list[str]:
    """The error bodies in one response: all of it for a 4xx/5xx, else its SSE error events."""
    text = body.decode("utf-8", "replace")
    if status >= 400:
        return [text]
    return [line for line in text.splitlines() if line.startswith('data: {"error"')]


def leaks(payloads: list[str]) -> list[str]:
    return [p for p in payloads if INTERNALS.search(p)]
