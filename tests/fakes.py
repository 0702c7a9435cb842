"""Fakes shared by the HTTP-layer tests: a backend that plays back a script, the stats and
chat body they use, and an ASGI app served on a local port. (The engine itself is tested on
real tiny models, not with these.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from client.servers import free_port

from deployments.contract.errors import ApiError
from deployments.contract.messages import GenerateCall, TokenizeCall, Tokenized
from deployments.contract.replies import ReplyEnd
from deployments.contract.runtime_adapters import RuntimeAdapter
from engine.request import Delta, RequestEnd, RequestStats

STATS = RequestStats(prompt_tokens=5, completion_tokens=2, dropped_messages=0, latency=0.1,
                     time_to_first_token=0.05, tokens_per_second=20.0, cached_prompt_tokens=4)
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}


FAKE_WINDOW = 64


def ended(script: list) -> list:
    """`script` followed by the ReplyEnd a replica sends after it: the engine's RequestEnd made
    from the script's last deltas (`RequestEnd.of`, as the engine makes it)."""
    return [*script, ReplyEnd(RequestEnd.of([item for item in script if isinstance(item, Delta) and item.finish_reason]))]


class ScriptedStream:
    """One call's items played back from a script (an ItemStream, deployments/frontend/service.py):
    refusals (ApiError) as items, other exceptions raised; records whether it was cancelled."""

    def __init__(self, script: list):
        self.items, self.cancelled = iter(script), False

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self):
        item = next(self.items, None)
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, Exception) and not isinstance(item, ApiError):  # refusals are items
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedBackend:
    """Plays back a list of items for every call (`ScriptedStream`; its streams kept in `streams`).
    Its tokenizer: one token per character (its code point), a chat as its contents joined by newlines.
    It loads every runtime adapter except from a folder named `bad`."""

    def __init__(self, script: list):
        self.script, self.calls, self.streams = script, [], []

    def stream(self, call: GenerateCall) -> ScriptedStream:
        self.calls.append(call)
        self.streams.append(ScriptedStream(self.script))
        return self.streams[-1]

    async def tokenize(self, call: TokenizeCall) -> Tokenized:
        self.calls.append(call)
        text = "\n".join(m.content for m in call.messages) if call.messages is not None else call.prompt
        tokens = [ord(c) for c in text]
        return Tokenized(tokens, FAKE_WINDOW, list(text) if call.return_token_strs else None)

    async def detokenize(self, tokens: list[int]) -> str | ApiError:
        if any(not 0 <= t < 0x110000 for t in tokens):
            return ApiError(400, "tokens out of range", param="tokens")
        return "".join(map(chr, tokens))

    async def load_adapter(self, adapter: RuntimeAdapter) -> ApiError | None:
        self.calls.append(adapter)
        return ApiError(400, "lora_path: no such folder", param="lora_path") if adapter.source.endswith("bad") else None


@contextmanager
def served_on_a_port(app) -> Iterator[str]:
    """`app` (ASGI) on uvicorn in a thread; yields its URL and stops it afterwards."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))  # clients may keep streams open
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
