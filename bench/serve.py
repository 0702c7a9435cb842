"""Benchmark the Ray Serve application over HTTP against two baselines, all in one run.

A closed loop of N clients (N = each concurrency level) sends OpenAI streaming chat
requests (`stream: true`, `ignore_eos: true`, `temperature: 0`, fixed `max_tokens`), one
after another, from a fixed list of varied short questions, for a fixed number of requests
per level. The systems are measured one after the other (never at the same time):

1. serve: the real application (deployments/app.py) in a private local Ray instance,
   with the args of serve_config.yaml (a few overridable from the command line).
2. engine: the same engine in this process, called directly (engine.chat_request +
   engine.submit) by the same closed-loop clients: what Serve costs.
3. hf-per-request: a small FastAPI app on uvicorn in a background thread, same route and
   SSE shape, that runs ONE Hugging Face `generate` per request, one request at a time
   (a one-worker executor: a FIFO lock), streaming each token as it is generated: the
   seed REST API's way of serving, given streaming so TTFT is not simply its latency.
4. transformers-serve: `transformers serve --continuous-batching` (a subprocess, see
   bench/systems.py) on the same checkpoint, dtype and device: the reference continuous
   batching server of the transformers library.

    python -m bench.serve                                  # full run (minutes on 2 CPU cores)
    python -m bench.serve --quick --plot /tmp/serve.png    # seconds of work, to check the script
    python -m bench.serve --output bench/serve-results.md --plot bench/serve.png
    python -m bench.serve --quick --systems transformers-serve serve   # some systems only

Results go to stdout as markdown tables (and to --output if given), the plot to --plot;
progress goes to logging.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import math
import os
import platform
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from transformers.generation.streamers import BaseStreamer

from bench.cli import (
    add_report_options,
    add_system_options,
    figure,
    label_axis,
    parse_with_quick,
    publish,
    setup_logging,
)
from bench.client import Chunk, Endpoint, RequestFailed, RequestResult, measure, stream_chat
from bench.engine import QUESTIONS, greedy, percentile
from bench.systems import (
    SERVE_CONFIG,
    TransformersServe,
    config_app_args,
    diagnostics,
    our_endpoint,
    replica_threads,
    serve_app,
    transformers_serve,
)
from deployments.protocol import ChatCompletionRequest
from client.bodies import user_message
from client.servers import free_port, wait_until_healthy
from deployments.local import llm_handle
from deployments.settings import AppArgs
from engine.engine import Engine, EngineStats
from engine.loader import LoadedModel, load_model, resolve_device, resolve_dtype
from engine.prompt import ChatMessage, PromptBuilder

log = logging.getLogger("bench.serve")

SYSTEMS = ("serve", "engine", "hf-per-request", "engine-beside-idle-serve", "transformers-serve")
FULL_DEFAULTS = {"concurrency": [1, 8, 32], "requests": None, "max_tokens": 64}
QUICK_DEFAULTS = {"concurrency": [1, 4], "requests": 4, "max_tokens": 16}
MIN_REQUESTS = 8
# Requests per level = WAVES x concurrency: enough turnovers of every client that a level is
# not dominated by its start (all clients arriving at once into an empty batch); run-to-run
# spread of serve / engine at concurrency 32 was about +-0.05 with 2 waves on 2 cores.
WAVES = 4
WARMUP_REQUESTS = 2
WARMUP_TOKENS = 8
ENGINE_TARGET = 0.85  # serve / engine tokens/s at the highest concurrency
HF_TARGET = 10.0  # serve / hf-per-request tokens/s at the highest concurrency
TRANSFORMERS_TARGETS = {1: 1.0, 8: 1.3, 32: 1.3}  # serve / transformers-serve tokens/s per concurrency
MAX_LOGGED_ERRORS = 3


Transport = Callable[[str, int], AsyncIterator[Chunk]]
"""(question, max_tokens) -> the request's stream of Chunks; raises RequestFailed on errors."""

StatsProbe = Callable[[], Awaitable[EngineStats]]
"""Reads our engine's counters (in this process, or the LLM replica's through a handle)."""


@dataclass(frozen=True)
class EngineSteps:
    """Our engine's steps during one level: how busy it was and how big its steps were."""

    steps: int
    seconds: float
    rows: int
    tokens: int

    @classmethod
    def between(cls, before: EngineStats, after: EngineStats) -> EngineSteps:
        return cls(after.steps - before.steps, after.step_seconds - before.step_seconds,
                   after.step_rows - before.step_rows, after.step_tokens - before.step_tokens)

    def cells(self, wall: float) -> str:
        """Table cells: steps, rows per step, ms per step, share of the wall time in steps."""
        if not self.steps:
            return "| 0 | - | - | - "
        return (f"| {self.steps} | {self.rows / self.steps:.1f} | {1000 * self.seconds / self.steps:.1f} "
                f"| {self.seconds / wall:.2f} ")


@dataclass(frozen=True)
class LevelResult:
    """One concurrency level of one system."""

    system: str
    concurrency: int
    wall: float
    results: tuple[RequestResult, ...]
    own_cores: float = math.nan  # CPU cores this process tree kept busy on average
    other_cores: float = math.nan  # CPU cores every other process kept busy on average
    engine: EngineSteps | None = None  # our engine's steps (serve and engine systems only)

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.error is None]

    @property
    def errors(self) -> int:
        return len(self.results) - len(self.ok)

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.ok) / self.wall if self.wall else math.nan

    def ttft(self, q: float) -> float:
        return safe_percentile([r.ttft for r in self.ok if r.ttft is not None], q)

    def latency(self, q: float) -> float:
        return safe_percentile([r.latency for r in self.ok], q)

    def itl(self, q: float) -> float:
        return safe_percentile([g for r in self.ok for g in r.gaps], q)

    def tpot(self, q: float) -> float:
        """Time per output token after the first, per request."""
        return safe_percentile([r.tpot for r in self.ok if r.tpot is not None], q)

    @property
    def chunks_per_token(self) -> float:
        tokens = sum(r.tokens for r in self.ok)
        return sum(r.chunks for r in self.ok) / tokens if tokens else math.nan


@dataclass(frozen=True)
class CpuSnapshot:
    """Busy CPU seconds of the whole machine and of this process tree (Ray's processes included)."""

    machine: float
    own: dict[int, float]

    @classmethod
    def take(cls) -> CpuSnapshot:
        """Now; processes that end between two snapshots lose their last moments (rare here)."""
        t = psutil.cpu_times()
        own: dict[int, float] = {}
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.Error:  # ended meanwhile
                continue
            own[proc.pid] = times.user + times.system
        return cls(t.user + t.nice + t.system + t.irq + t.softirq, own)

    def cores_since(self, earlier: CpuSnapshot, wall: float) -> tuple[float, float]:
        """(cores used by this process tree, cores used by everything else) on average since `earlier`."""
        own = sum(seconds - earlier.own.get(pid, 0.0) for pid, seconds in self.own.items())
        other = self.machine - earlier.machine - own
        return own / wall, max(other, 0.0) / wall


# ----- command line ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; workload sizes default to FULL_DEFAULTS."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (explicit options still win)")
    p.add_argument("--concurrency", type=int, nargs="+", help="closed-loop client counts (levels)")
    p.add_argument("--requests", type=int,
                   help=f"requests per level (default: max({WAVES} x concurrency, {MIN_REQUESTS}))")
    p.add_argument("--max-tokens", type=int, help="new tokens per request (ignore_eos)")
    add_system_options(p, SYSTEMS, SERVE_CONFIG, timeout_s=1800.0)
    p.add_argument("--max-batch-size", type=int, default=32, help="engine rows (serve and engine)")
    p.add_argument("--batch-size", type=int, help="serve: @serve.batch admission group size")
    p.add_argument("--stream-interval-s", type=float, help="serve: least time between two messages of a stream")
    p.add_argument("--num-cpus", type=float, help="serve: CPUs reserved for the LLM replica")
    add_report_options(p, "PNG plot of tokens/s and TTFT p50 against concurrency")
    p.set_defaults(**FULL_DEFAULTS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse options; --quick swaps in QUICK_DEFAULTS under any explicitly given option."""
    parser = build_parser()
    args = parse_with_quick(parser, argv, QUICK_DEFAULTS)
    if min(args.concurrency) < 1 or args.max_tokens < 1 or (args.requests is not None and args.requests < 1):
        parser.error("concurrency levels, --requests and --max-tokens must be positive")
    args.concurrency = sorted(set(args.concurrency))
    return args


def requests_per_level(args: argparse.Namespace, concurrency: int) -> int:
    """--requests if given, else max(WAVES x concurrency, MIN_REQUESTS)."""
    return args.requests or max(WAVES * concurrency, MIN_REQUESTS)


def app_args(args: argparse.Namespace) -> dict[str, Any]:
    """The serve config's application args with the command-line overrides applied."""
    values = config_app_args(args.config)
    values["max_batch_size"] = args.max_batch_size
    batch = dict(values.get("batch") or {})
    if args.batch_size is not None:
        batch["batch_size"] = args.batch_size
    if args.stream_interval_s is not None:
        batch["stream_interval_s"] = args.stream_interval_s
    values["batch"] = batch
    if args.num_cpus is not None:
        values["num_cpus"] = args.num_cpus
    return values


# ----- measuring a closed loop ------------------------------------------------------------


async def run_level(transport: Transport, system: str, concurrency: int, count: int,
                    max_tokens: int, probe: StatsProbe | None = None) -> LevelResult:
    """`concurrency` clients each send requests one after another until `count` were sent;
    `probe` reads our engine's step counters before and after."""
    indexes = iter(range(count))  # shared by the clients: each next() hands out one request
    results: list[RequestResult] = []

    async def client() -> None:
        for i in indexes:
            results.append(await measure(transport(QUESTIONS[i % len(QUESTIONS)], max_tokens)))

    before = await probe() if probe else None
    cpu = CpuSnapshot.take()
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    own, other = CpuSnapshot.take().cores_since(cpu, wall)
    steps = EngineSteps.between(before, await probe()) if probe else None
    level = LevelResult(system, concurrency, wall, tuple(results), own, other, steps)
    log_level(level, max_tokens)
    return level


def log_level(level: LevelResult, max_tokens: int) -> None:
    """One progress line per level, and the first few errors."""
    log.info("%s c=%d: %d requests in %.1f s, %.1f tok/s, TTFT p50 %.3f s, %d errors, "
             "CPU cores: %.2f ours, %.2f others",
             level.system, level.concurrency, len(level.results), level.wall, level.tokens_per_s,
             level.ttft(50), level.errors, level.own_cores, level.other_cores)
    if level.engine and level.engine.steps:
        steps = level.engine
        log.info("%s c=%d: engine %d steps, %.1f rows/step, %.1f ms/step, busy %.2f", level.system,
                 level.concurrency, steps.steps, steps.rows / steps.steps, 1000 * steps.seconds / steps.steps,
                 steps.seconds / level.wall)
    for result in [r for r in level.results if r.error][:MAX_LOGGED_ERRORS]:
        log.warning("%s c=%d: request failed: %s", level.system, level.concurrency, result.error)
    short = [r.tokens for r in level.ok if r.tokens != max_tokens]
    if short:
        log.warning("%s c=%d: token counts other than %d: %s", level.system, level.concurrency, max_tokens, short)


async def run_levels(transport: Transport, system: str, args: argparse.Namespace,
                     probe: StatsProbe | None = None) -> list[LevelResult]:
    """An untimed warm-up, then every concurrency level in turn."""
    log.info("%s: warming up (%d x %d tokens)", system, WARMUP_REQUESTS, WARMUP_TOKENS)
    await run_level(transport, f"{system} warm-up", WARMUP_REQUESTS, WARMUP_REQUESTS, WARMUP_TOKENS)
    levels = []
    for concurrency in args.concurrency:
        count = requests_per_level(args, concurrency)
        log.info("%s: concurrency %d, %d requests x %d tokens", system, concurrency, count, args.max_tokens)
        levels.append(await run_level(transport, system, concurrency, count, args.max_tokens, probe))
    return levels


# ----- clients --------------------------------------------------------------------------------


def question_stream(client: httpx.AsyncClient, endpoint: Endpoint, question: str,
                    max_tokens: int) -> AsyncIterator[Chunk]:
    """A Transport over HTTP: one question, exactly max_tokens tokens (EOS ignored)."""
    return stream_chat(client, endpoint, user_message(question), max_tokens, ignore_eos=True)


async def measure_http(endpoint: Endpoint, system: str, args: argparse.Namespace,
                       probe: StatsProbe | None = None) -> list[LevelResult]:
    """Run every level against an OpenAI-compatible server."""
    async with endpoint.client(max(args.concurrency) + WARMUP_REQUESTS, args.timeout) as client:
        return await run_levels(partial(question_stream, client, endpoint), system, args, probe)


async def engine_stream(engine: Engine, question: str, max_tokens: int) -> AsyncIterator[Chunk]:
    """Submit one chat request to the engine; yield a Chunk per delta with tokens, then usage."""
    request = engine.chat_request([ChatMessage("user", question)], greedy(max_tokens))
    async for delta in engine.submit(request):
        if delta.token_ids:
            yield Chunk("content", len(delta.token_ids))
        if delta.finish_reason:
            if delta.finish_reason == "error" or delta.stats is None:
                raise RequestFailed(delta.error or delta.finish_reason)
            yield Chunk("usage", delta.stats.completion_tokens)


async def measure_engine(values: dict[str, Any], args: argparse.Namespace, system: str = "engine") -> list[LevelResult]:
    """Run every level on the serve app's engine, in this process, without HTTP, with the same
    adapters loaded as a replica preloads (PEFT's wrappers slow the base rows too)."""
    app = AppArgs.model_validate(values)
    config = app.engine_config()
    log.info("engine: loading %s", config.model)
    engine = Engine.from_config(config)
    for name in app.preloaded():
        await engine.load_adapter(name, app.adapter_source(name))
    try:
        return await run_levels(partial(engine_stream, engine), system, args, partial(engine_stats, engine))
    finally:
        await engine.close()


async def engine_stats(engine: Engine) -> EngineStats:
    return engine.stats()


async def replica_stats() -> EngineStats:
    """The LLM replica's engine stats, through a DeploymentHandle (inside `serve_app`)."""
    return (await diagnostics(llm_handle()))["stats"]


# ----- the serve system -----------------------------------------------------------------------


def measure_engine_beside_idle_serve(values: dict[str, Any], args: argparse.Namespace) -> list[LevelResult]:
    """The engine system while the serve app idles in a private local Ray on this machine:
    what Ray's and Serve's own background work (no request) costs the model's two threads."""
    log.info("engine-beside-idle-serve: starting an idle copy of the serve app")
    with serve_app(values, args.ray_logs):
        return asyncio.run(measure_engine(values, args, "engine-beside-idle-serve"))


def measure_serve(values: dict[str, Any], args: argparse.Namespace, notes: list[str]) -> list[LevelResult]:
    """Start the application, run every level over HTTP, shut Serve and Ray down."""
    log.info("serve: starting Ray and the application (%s)", AppArgs.model_validate(values).model_name)
    with serve_app(values, args.ray_logs) as url:
        threads = replica_threads()
        log.info("serve: up at %s; torch threads in the LLM replica: %s", url, threads)
        notes.append(f"serve: torch threads in the LLM replica: {threads}")
        return asyncio.run(measure_http(our_endpoint(url, values), "serve", args, replica_stats))


# ----- the hf-per-request system ----------------------------------------------------------------


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
    import uvicorn

    backend = HFPerRequest(loaded)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_hf_app(backend), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    failure: list[BaseException] = []

    def serve_forever() -> None:
        try:
            server.run()
        except BaseException as err:  # reported by the caller, not lost with the thread
            failure.append(err)

    thread = threading.Thread(target=serve_forever, name="hf-server", daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, timeout_s=120)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        backend.close()
        if failure:
            raise RuntimeError("the hf-per-request server failed") from failure[0]


def measure_hf(values: dict[str, Any], args: argparse.Namespace) -> list[LevelResult]:
    """Load the same model and dtype, serve it one `generate` per request, run every level."""
    app = AppArgs.model_validate(values)
    log.info("hf-per-request: loading %s", app.model)
    loaded = load_model(app.engine_config())
    with hf_server(loaded) as url:
        return asyncio.run(measure_http(our_endpoint(url, values), "hf-per-request", args))


# ----- the transformers-serve system ------------------------------------------------------------


def measure_transformers_serve(values: dict[str, Any], args: argparse.Namespace,
                               notes: list[str]) -> list[LevelResult]:
    """Start transformers serve on the app's checkpoint, run every level over HTTP, stop it."""
    spec = TransformersServe.of(values)
    notes.append(f"transformers-serve: `{' '.join(spec.command('PORT'))}` with HF_HUB_OFFLINE=1")
    with transformers_serve(spec) as endpoint:
        return asyncio.run(measure_http(endpoint, "transformers-serve", args))


# ----- report ---------------------------------------------------------------------------------


def safe_percentile(values: Sequence[float], q: float) -> float:
    """percentile(), or NaN for no values."""
    return percentile(values, q) if values else math.nan


def fmt(value: float | None, digits: int = 2) -> str:
    """A table cell: the number rounded, or "-" when there is none."""
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def header(values: dict[str, Any], args: argparse.Namespace, dtype: str) -> list[str]:
    """Markdown lines describing what was measured where."""
    batch = values.get("batch", {})
    counts = ", ".join(f"{c}: {requests_per_level(args, c)}" for c in args.concurrency)
    return [
        f"# Serve benchmark ({datetime.datetime.now().isoformat(timespec='seconds')})",
        "",
        f"- model: {values.get('model')}, dtype {dtype}, CPU; host {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads in this process",
        f"- workload: closed loop of N clients (N = concurrency), OpenAI streaming chat, {args.max_tokens} tokens "
        f"per request (ignore_eos, temperature 0), {len(QUESTIONS)} short questions in turn; "
        f"requests per level: {counts}",
        f"- serve: args of {args.config.name} with max_batch_size {values.get('max_batch_size')}, "
        f"num_cpus {values.get('num_cpus')}, batch_size {batch.get('batch_size')}, "
        f"stream_interval_s {batch.get('stream_interval_s')}; a private local Ray (2 CPUs), client in this process",
        "- engine: the same engine config in this process, same clients, no HTTP",
        "- engine-beside-idle-serve: the engine system again while the serve app (own model copy) idles "
        "in a private local Ray: the cost of Ray's and Serve's background processes alone",
        "- hf-per-request: FastAPI + uvicorn thread in this process, one greedy `generate` per request "
        "(min_new_tokens = max_new_tokens, explicit attention_mask), one at a time in FIFO order, "
        "each token streamed as one SSE chunk",
        "- transformers-serve: `transformers serve --continuous-batching` (a subprocess of this benchmark) on the "
        "checkpoint folder our loader converts the model to, same dtype and device; its requests carry "
        "`generation_config: {\"eos_token_id\": -1}` instead of `ignore_eos` (which it rejects), its completion "
        "tokens are its own usage count (tokens generated, checked against max_tokens per request)",
        "- tok/s: completion tokens of the level / its wall time; TTFT: first content chunk; ITL: gap between "
        "content chunks / tokens in the later chunk (over HTTP: first chunk = 1 token, the rest share the others); "
        "TPOT: (end-to-end - TTFT) / (tokens - 1) per request; "
        "chunks/token: content chunks / completion tokens (for serve: Ray messages per generated token)",
        "- CPU: cores busy on average during the level, in this benchmark's process tree (client, engine, "
        "Ray, transformers serve) and in every other process (other work on the machine: it skews the figures "
        "when well above 0)",
        "- engine steps (serve and engine): steps that computed something during the level, rows per step "
        "(mean batch), ms per step (forward pass, sampling and bookkeeping on the engine's worker), engine busy "
        "(time in steps / wall time: below 1 the engine waited for requests)",
    ]


def system_table(levels: Sequence[LevelResult]) -> list[str]:
    """One system's levels as markdown table lines."""
    lines = [
        f"## {levels[0].system}",
        "",
        "| concurrency | requests | errors | tok/s | TTFT p50 s | TTFT p95 s | ITL p50 ms | TPOT p50 ms | e2e p50 s "
        "| e2e p95 s | chunks/token | CPU ours | CPU others | engine steps | rows/step | ms/step | engine busy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    return lines + [
        f"| {lv.concurrency} | {len(lv.results)} | {lv.errors} | {fmt(lv.tokens_per_s, 1)} | {fmt(lv.ttft(50), 3)} "
        f"| {fmt(lv.ttft(95), 3)} | {fmt(lv.itl(50) * 1000, 1)} | {fmt(lv.tpot(50) * 1000, 1)} "
        f"| {fmt(lv.latency(50))} | {fmt(lv.latency(95))} "
        f"| {fmt(lv.chunks_per_token)} | {fmt(lv.own_cores)} | {fmt(lv.other_cores)} "
        + (lv.engine.cells(lv.wall) if lv.engine else "| - | - | - | - ") + "|"
        for lv in levels
    ]


def ratio(numerator: LevelResult | None, denominator: LevelResult | None) -> float:
    """tokens/s of one level over another's; NaN when either is missing."""
    if numerator is None or denominator is None or not denominator.tokens_per_s:
        return math.nan
    return numerator.tokens_per_s / denominator.tokens_per_s


def tokens_per_s(level: LevelResult | None) -> str:
    """A table cell: the level's tokens/s, or "-" when it was not measured."""
    return fmt(level.tokens_per_s if level else math.nan, 1)


def ratio_table(results: dict[str, list[LevelResult]], levels: Sequence[int]) -> list[str]:
    """tokens/s of serve against each baseline, per concurrency level, and TPOT at concurrency 1."""
    by_level = {name: {lv.concurrency: lv for lv in runs} for name, runs in results.items()}
    lines = [
        "## Ratios (tokens/s)",
        "",
        f"| concurrency | serve tok/s | engine tok/s | serve / engine (target >= {ENGINE_TARGET} at {max(levels)}) "
        f"| hf-per-request tok/s | serve / hf (target >= {HF_TARGET:g} at {max(levels)}) "
        "| transformers-serve tok/s | serve / transformers-serve | target "
        "| engine-beside-idle-serve / engine |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in levels:
        serve, engine, hf, beside, ts = (by_level.get(name, {}).get(c) for name in (
            "serve", "engine", "hf-per-request", "engine-beside-idle-serve", "transformers-serve"))
        target = TRANSFORMERS_TARGETS.get(c)
        lines.append(
            f"| {c} | {tokens_per_s(serve)} | {tokens_per_s(engine)} | {fmt(ratio(serve, engine))} "
            f"| {tokens_per_s(hf)} | {fmt(ratio(serve, hf), 1)} "
            f"| {tokens_per_s(ts)} | {fmt(ratio(serve, ts))} | {f'>= {target}' if target else '-'} "
            f"| {fmt(ratio(beside, engine))} |"
        )
    return lines + ["", tpot_line(by_level)]


def tpot_line(by_level: dict[str, dict[int, LevelResult]]) -> str:
    """Time per output token p50 of every system at concurrency 1 (the issue compares serve and
    transformers-serve there)."""
    cells = [f"{name} {fmt(runs[1].tpot(50) * 1000, 1)}" for name, runs in by_level.items() if 1 in runs]
    return "Time per output token p50 at concurrency 1, ms: " + (", ".join(cells) or "not measured") + "."


def report(values: dict[str, Any], args: argparse.Namespace, dtype: str,
           results: dict[str, list[LevelResult]], notes: Sequence[str]) -> str:
    """The whole markdown report."""
    lines = header(values, args, dtype) + [f"- {n}" for n in notes] + [""]
    for levels in results.values():
        lines += system_table(levels) + [""]
    lines += ratio_table(results, args.concurrency)
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[LevelResult]], path: Path) -> None:
    """tokens/s and TTFT p50 against concurrency, one line per system."""
    with figure(path) as (left, right):
        for name, levels in results.items():
            xs = [lv.concurrency for lv in levels]
            left.plot(xs, [lv.tokens_per_s for lv in levels], marker="o", label=name)
            right.plot(xs, [lv.ttft(50) for lv in levels], marker="o", label=name)
        ticks = sorted({lv.concurrency for levels in results.values() for lv in levels})
        for axis, title, unit in ((left, "throughput", "tokens/s"), (right, "TTFT p50", "seconds (log)")):
            axis.set_xscale("log", base=2)
            axis.set_xticks(ticks, [str(t) for t in ticks])
            label_axis(axis, title, "concurrent clients", unit)
        right.set_yscale("log")


# ----- main -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> str:
    """Measure the chosen systems one after the other; return the markdown report."""
    values = app_args(args)
    config = AppArgs.model_validate(values).engine_config()
    dtype = str(resolve_dtype(config.dtype, resolve_device(config.device))).removeprefix("torch.")
    results: dict[str, list[LevelResult]] = {}
    notes: list[str] = []
    for system in args.systems:
        if system == "serve":
            results[system] = measure_serve(values, args, notes)
            per_level = ", ".join(f"c={lv.concurrency}: {fmt(lv.chunks_per_token)}" for lv in results[system])
            notes.append(f"serve: Ray messages per generated token (SSE content chunks / tokens): {per_level}")
        elif system == "engine":
            results[system] = asyncio.run(measure_engine(values, args))
        elif system == "engine-beside-idle-serve":
            results[system] = measure_engine_beside_idle_serve(values, args)
        elif system == "transformers-serve":
            results[system] = measure_transformers_serve(values, args, notes)
        else:
            results[system] = measure_hf(values, args)
    if args.plot:
        plot(results, args.plot)
    return report(values, args, dtype, results, notes)


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    args = parse_args(argv)
    publish(run(args), args.output)


if __name__ == "__main__":
    main()
