"""The benchmark clients' side of a stream: its Chunks, timing one stream, the OpenAI HTTP client.

Every benchmark that talks to a server (bench.serve, bench.chat) sends OpenAI streaming
chat requests through `stream_chat` and times them with `measure`; the in-process engine
baseline of bench.serve yields the same Chunks without HTTP.

Servers differ in how they are asked for what the benchmarks need, which `Endpoint` states:
ours (and the hf-per-request baseline) take `ignore_eos` and `stream_options.include_usage`
and end a stream with `data: [DONE]`; `transformers serve` rejects `ignore_eos` (HTTP 422),
ignores `stream_options` (it always sends usage, with the finish chunk) and sends no [DONE].
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from client.bodies import chat_body
from client.stream import aevent_data, completion_tokens, decode_chunk

OUR_EXTRA_FIELDS: Mapping[str, Any] = {"stream_options": {"include_usage": True}}
OUR_IGNORE_EOS_FIELDS: Mapping[str, Any] = {"ignore_eos": True}


@dataclass(frozen=True)
class Chunk:
    """What a client sees in a stream: content (text, with its token count when known) or usage."""

    kind: Literal["content", "usage"]
    tokens: int | None = None  # content: tokens in this chunk when known; usage: completion tokens
    text: str = ""  # content only
    prompt_tokens: int | None = None  # usage only, when the server reports it
    cached_tokens: int | None = None  # usage only: prompt tokens from the server's prefix cache, when reported


class RequestFailed(Exception):
    """The server answered with an error status or cut the stream short (an error event raises
    client.stream.ErrorEvent)."""


@dataclass(frozen=True)
class RequestResult:
    """One request as its client measured it; times in seconds from sending it."""

    ttft: float | None
    latency: float
    tokens: int
    chunks: int
    gaps: tuple[float, ...]  # inter-token latencies (per token) between content chunks
    error: str | None = None
    text: str = ""  # the streamed content
    prompt_tokens: int | None = None  # from the server's usage
    cached_tokens: int | None = None  # of prompt_tokens, from the server's prefix cache (usage's details)

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (latency - TTFT) / (tokens - 1); None below 2 tokens."""
        if self.ttft is None or self.tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.tokens - 1)


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible chat server: where it is, the `model` to name, and the extra request
    fields it needs (sent with every request, and to make a request ignore end-of-sequence)."""

    url: str
    model: str
    extra_fields: Mapping[str, Any] = field(default_factory=lambda: dict(OUR_EXTRA_FIELDS))
    ignore_eos_fields: Mapping[str, Any] = field(default_factory=lambda: dict(OUR_IGNORE_EOS_FIELDS))

    def chat_body(self, messages: Sequence[Mapping[str, str]], max_tokens: int, ignore_eos: bool) -> dict[str, Any]:
        """A greedy streaming chat request of at most max_tokens (exactly, with ignore_eos)."""
        body = chat_body(self.model, messages, max_tokens=max_tokens, temperature=0, **self.extra_fields)
        return body | (dict(self.ignore_eos_fields) if ignore_eos else {})

    def client(self, connections: int, timeout_s: float) -> httpx.AsyncClient:
        """An HTTP client for this server with room for `connections` streams at once."""
        return httpx.AsyncClient(base_url=self.url, limits=httpx.Limits(max_connections=connections),
                                 timeout=httpx.Timeout(timeout_s, connect=30.0))


def parse_chunk(chunk: dict[str, Any]) -> list[Chunk]:
    """The Chunks of one chat.completion.chunk (none for a role-only or finish-only chunk)."""
    chunks = [Chunk("content", text=text) for c in chunk.get("choices", [])
              if (text := (c.get("delta") or {}).get("content"))]
    if (tokens := completion_tokens(chunk)) is not None:
        usage = chunk["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        chunks.append(Chunk("usage", tokens, prompt_tokens=usage.get("prompt_tokens"), cached_tokens=cached))
    return chunks


async def stream_chat(client: httpx.AsyncClient, endpoint: Endpoint, messages: Sequence[Mapping[str, str]],
                      max_tokens: int, ignore_eos: bool) -> AsyncIterator[Chunk]:
    """POST /v1/chat/completions and yield the Chunks of its SSE stream.

    The stream is complete at `data: [DONE]`, or when the server closes it after the usage
    chunk (transformers serve sends no [DONE]); anything else raises RequestFailed.
    """
    body = endpoint.chat_body(messages, max_tokens, ignore_eos)
    usage_seen = False
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise RequestFailed(f"HTTP {response.status_code}: {text[:200]}")
        async for data in aevent_data(response):
            if (event := decode_chunk(data)) is None:
                return
            for chunk in parse_chunk(event):
                usage_seen = usage_seen or chunk.kind == "usage"
                yield chunk
    if not usage_seen:
        raise RequestFailed("the stream ended without [DONE] or usage")


def per_token_gaps(times: Sequence[float], counts: Sequence[int | None], total: int) -> list[float]:
    """Inter-token latencies: each gap between content chunks over the tokens of the later chunk.

    When chunk sizes are unknown (HTTP), the first chunk is taken to hold one token and
    the others to share the remaining tokens equally.
    """
    if len(times) < 2:
        return []
    if all(c is not None for c in counts):
        sizes = list(counts[1:])
    else:
        sizes = [max(total - 1, 1) / (len(times) - 1)] * (len(times) - 1)
    return [(later - earlier) / max(size, 1) for earlier, later, size in zip(times, times[1:], sizes)]


async def measure(stream: AsyncIterator[Chunk]) -> RequestResult:
    """Read one request's stream to its end and time it; errors become a failed result.

    Completion tokens are the server's usage count when it sends one, else the content
    chunks' token counts (one per chunk when unknown).
    """
    start = time.perf_counter()
    times: list[float] = []
    counts: list[int | None] = []
    texts: list[str] = []
    usage: Chunk | None = None
    error: str | None = None
    try:
        async for chunk in stream:
            if chunk.kind == "usage":
                usage = chunk
            else:
                times.append(time.perf_counter() - start)
                counts.append(chunk.tokens)
                texts.append(chunk.text)
    except Exception as err:  # a failed request is a measurement, not a crash
        error = f"{type(err).__name__}: {err}"
    latency = time.perf_counter() - start
    tokens = usage.tokens if usage is not None and usage.tokens is not None else sum(c or 1 for c in counts)
    return RequestResult(times[0] if times else None, latency, tokens, len(times),
                         tuple(per_token_gaps(times, counts, tokens)), error, "".join(texts),
                         usage.prompt_tokens if usage is not None else None,
                         usage.cached_tokens if usage is not None else None)
