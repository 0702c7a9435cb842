"""The systems bench.serve measures, each run through every concurrency level (bench.load):
serve (our app in a private local Ray, over HTTP), engine (the same engine in this process,
no HTTP), engine-beside-idle-serve, hf-per-request (bench/hf_per_request.py) and
transformers-serve (bench/systems.py starts it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

import httpx

from bench.client import Chunk, Endpoint, RequestFailed, stream_chat
from bench.engine import greedy
from bench.hf_per_request import hf_server
from bench.load import LevelResult, StatsProbe, WARMUP_REQUESTS, run_levels
from bench.systems import (
    TransformersServe,
    diagnostics,
    our_endpoint,
    replica_threads,
    serve_app,
    transformers_serve,
)
from client.bodies import user_message
from deployments.contract.settings import AppArgs
from deployments.local import llm_handle
from engine.config import SamplingParams
from engine.engine import Engine, EngineStats
from engine.loader import load_model
from engine.prompt import ChatMessage
from engine.request import RequestEnd

log = logging.getLogger("bench.serve")


def question_stream(client: httpx.AsyncClient, endpoint: Endpoint, question: str,
                    max_tokens: int) -> AsyncIterator[Chunk]:
    """A Transport over HTTP: one question, exactly max_tokens tokens (EOS ignored)."""
    return stream_chat(client, endpoint, user_message(question), max_tokens, ignore_eos=True)


async def measure_http(endpoint: Endpoint, system: str, args: argparse.Namespace,
                       probe: StatsProbe | None = None) -> list[LevelResult]:
    """Run every level against an OpenAI-compatible server."""
    async with endpoint.client(max(args.concurrency) + WARMUP_REQUESTS, args.timeout) as client:
        return await run_levels(partial(question_stream, client, endpoint), system, args, probe)


def engine_stream(engine: Engine, question: str, max_tokens: int) -> AsyncIterator[Chunk]:
    """A Transport to the engine in this process: one question, exactly max_tokens tokens."""
    return engine_chunks(engine, [ChatMessage("user", question)], greedy(max_tokens))


async def engine_chunks(engine: Engine, messages: Sequence[ChatMessage],
                        params: SamplingParams) -> AsyncIterator[Chunk]:
    """Submit one chat request to the engine; yield a Chunk per delta with tokens (and its text),
    then usage (with the prompt's and the cached tokens, as our HTTP API reports them)."""
    request = engine.chat_request(list(messages), params)
    async for item in engine.submit(request):
        if isinstance(item, RequestEnd):
            if item.failed or item.stats is None:
                raise RequestFailed(item.error or "the request was cancelled")
            yield Chunk("usage", item.stats.completion_tokens, prompt_tokens=item.stats.prompt_tokens,
                        cached_tokens=item.stats.cached_prompt_tokens)
        elif item.token_ids:
            yield Chunk("content", len(item.token_ids), item.text)


async def measure_engine(values: dict[str, Any], args: argparse.Namespace, system: str = "engine") -> list[LevelResult]:
    """Run every level on the serve app's engine, in this process, without HTTP, with the same
    adapters loaded as a replica preloads (PEFT's wrappers slow the base rows too)."""
    app = AppArgs.model_validate(values)
    config = app.engine_config()
    log.info("engine: loading %s", config.model)
    engine = Engine.from_config(config, preload=app.preloaded())
    try:
        return await run_levels(partial(engine_stream, engine), system, args, partial(engine_stats, engine))
    finally:
        await engine.close()


async def engine_stats(engine: Engine) -> EngineStats:
    return engine.stats()


async def replica_stats() -> EngineStats:
    """The LLM replica's engine stats, through a DeploymentHandle (inside `serve_app`)."""
    return (await diagnostics(llm_handle()))["stats"]


def measure_engine_beside_idle_serve(values: dict[str, Any], args: argparse.Namespace) -> list[LevelResult]:
    """The engine system while the serve app idles in a private local Ray on this machine:
    what Ray's and Serve's own background work (no request) costs the model's two threads."""
    log.info("engine-beside-idle-serve: starting an idle copy of the serve app")
    with serve_app(values, args.ray_logs, args.ray_worker_niceness):
        return asyncio.run(measure_engine(values, args, "engine-beside-idle-serve"))


def measure_serve(values: dict[str, Any], args: argparse.Namespace, notes: list[str]) -> list[LevelResult]:
    """Start the application, run every level over HTTP, shut Serve and Ray down."""
    log.info("serve: starting Ray and the application (%s)", AppArgs.model_validate(values).model_name)
    with serve_app(values, args.ray_logs, args.ray_worker_niceness) as url:
        threads = replica_threads()
        log.info("serve: up at %s; torch threads in the LLM replica: %s", url, threads)
        notes.append(f"serve: torch threads in the LLM replica: {threads}")
        return asyncio.run(measure_http(our_endpoint(url, values), "serve", args, replica_stats))


def measure_hf(values: dict[str, Any], args: argparse.Namespace) -> list[LevelResult]:
    """Load the same model and dtype, serve it one `generate` per request, run every level."""
    app = AppArgs.model_validate(values)
    log.info("hf-per-request: loading %s", app.model)
    loaded = load_model(app.engine_config())
    with hf_server(loaded) as url:
        return asyncio.run(measure_http(our_endpoint(url, values), "hf-per-request", args))


def measure_transformers_serve(values: dict[str, Any], args: argparse.Namespace,
                               notes: list[str]) -> list[LevelResult]:
    """Start transformers serve on the app's checkpoint, run every level over HTTP, stop it."""
    spec = TransformersServe.of(values)
    notes.append(f"transformers-serve: `{' '.join(spec.command('PORT'))}` with HF_HUB_OFFLINE=1")
    with transformers_serve(spec) as endpoint:
        return asyncio.run(measure_http(endpoint, "transformers-serve", args))
