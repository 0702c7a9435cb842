"""The hf-per-request baseline of bench.serve: a small FastAPI app on uvicorn in a background
thread, with the serve app's streaming chat route and SSE shape, that runs ONE Hugging Face
`generate` per request, one request at a time (a one-worker executor: a FIFO lock), streaming
each token as it is generated: the seed REST API's way of serving.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from transformers.generation.streamers import BaseStreamer

from bench.systems import uvicorn_thread
from deployments.http.protocol import ChatCompletionRequest
from engine.loader import LoadedModel
from engine.prompt import ChatMessage, PromptBuilder


class QueueStreamer(BaseStreamer):
    """A transformers streamer that hands each new token id list to an asyncio queue.

    `generate` first puts the prompt (skipped), then each new token, then calls `end`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[list[int] | None]):
        self.loop, self.queue = loop, queue
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def hf_generate_one(loaded: LoadedModel, prompt_ids: list[int], max_tokens: int, streamer: QueueStreamer) -> None:
    """One greedy `generate` of exactly max_tokens tokens with an explicit attention mask."""
    try:
        input_ids = torch.tensor([prompt_ids], device=loaded.device)
        with torch.inference_mode():
            loaded.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                pad_token_id=loaded.tokenizer.pad_token_id,
                streamer=streamer,
            )
    except BaseException:
        streamer.end()  # generate ends the stream itself only when it succeeds
        raise


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"


def text_chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
    """A minimal chat.completion.chunk."""
    delta: dict[str, str] = {"content": text} if text else {}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


class HFPerRequest:
    """Generates each request alone with `model.generate`, one at a time (FIFO), streaming tokens."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.prompts = PromptBuilder(loaded.tokenizer, "auto", loaded.context_window)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")

    async def frames(self, messages: list[ChatMessage], max_tokens: int) -> AsyncIterator[str]:
        """SSE frames of one request: the text as it grows, the finish chunk, usage, [DONE]."""
        prompt_ids = self.prompts.chat(messages, max_tokens).token_ids
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
        done = loop.run_in_executor(self.worker, hf_generate_one, self.loaded, prompt_ids, max_tokens,
                                    QueueStreamer(loop, queue))
        ids: list[int] = []
        sent = ""
        while (new := await queue.get()) is not None:
            ids += new
            text = self.loaded.tokenizer.decode(ids, skip_special_tokens=True)
            if len(text) > len(sent) and not text.endswith("\ufffd"):  # hold back split characters
                yield sse(text_chunk(text[len(sent):]))
                sent = text
        try:
            await done
        except Exception as err:
            yield sse({"error": {"message": f"generation failed: {err}", "type": "server_error"}})
        else:
            text = self.loaded.tokenizer.decode(ids, skip_special_tokens=True)
            yield sse(text_chunk(text[len(sent):], "length"))  # with whatever was held back
            yield sse({"object": "chat.completion.chunk", "choices": [],
                       "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids),
                                 "total_tokens": len(prompt_ids) + len(ids)}})
        yield "data: [DONE]\n\n"

    def close(self) -> None:
        self.worker.shutdown(wait=True)


def build_hf_app(backend: HFPerRequest) -> FastAPI:
    """FastAPI app with the serve app's streaming chat route shape and /health.

    The body is validated by the serve app's own ChatCompletionRequest; sampling is always
    greedy and every request streams.
    """
    app = FastAPI(title="hf-per-request baseline")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> StreamingResponse:
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        return StreamingResponse(backend.frames(body.chat_messages(), max_tokens), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


@contextmanager
def hf_server(loaded: LoadedModel) -> Iterator[str]:
    """The hf-per-request app on uvicorn in a background thread; yields its base URL."""
    backend = HFPerRequest(loaded)
    try:
        with uvicorn_thread(build_hf_app(backend), "hf-server") as url:
            yield url
    finally:
        backend.close()
