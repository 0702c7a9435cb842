"""Benchmark the Ray Serve application over HTTP against two baselines, all in one run.

A closed loop of N clients (N = each concurrency level) sends OpenAI streaming chat
requests (`stream: true`, `ignore_eos: true`, `temperature: 0`, fixed `max_tokens`), one
after another, from a fixed list of varied short questions, for a fixed number of requests
per level. Three systems are measured one after the other (never at the same time):

1. serve: the real application (deployments/app.py) in a private local Ray instance,
   with the args of serve_config.yaml (a few overridable from the command line).
2. engine: the same engine in this process, called directly (engine.chat_request +
   engine.submit) by the same closed-loop clients: what Serve costs.
3. hf-per-request: a small FastAPI app on uvicorn in a background thread, same route and
   SSE shape, that runs ONE Hugging Face `generate` per request, one request at a time
   (a one-worker executor: a FIFO lock), streaming each token as it is generated: the
   seed REST API's way of serving, given streaming so TTFT is not simply its latency.

    python -m bench.serve                                  # full run (minutes on 2 CPU cores)
    python -m bench.serve --quick --plot /tmp/serve.png    # seconds of work, to check the script
    python -m bench.serve --output bench/serve-results.md --plot bench/serve.png

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
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil
import torch
import yaml
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from transformers.generation.streamers import BaseStreamer

from bench.cli import parse_with_quick, publish, setup_logging
from bench.engine import QUESTIONS, greedy, percentile
from deployments.protocol import ChatCompletionRequest
from deployments.settings import AppArgs
from engine.engine import Engine
from engine.loader import LoadedModel, load_model, resolve_device, resolve_dtype
from engine.prompt import ChatMessage, PromptBuilder
from tests.serve_fixtures import free_port, wait_until_healthy

log = logging.getLogger("bench.serve")

ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = ROOT / "serve_config.yaml"
APP_NAME = "llm"
SYSTEMS = ("serve", "engine", "hf-per-request", "engine-beside-idle-serve")
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
SETTLE_TIMEOUT_S = 60.0
MAX_LOGGED_ERRORS = 3


@dataclass(frozen=True)
class Chunk:
    """What a client sees in a stream: content (with its token count when known) or usage."""

    kind: Literal["content", "usage"]
    tokens: int | None = None


Transport = Callable[[str, int], AsyncIterator[Chunk]]
"""(question, max_tokens) -> the request's stream of Chunks; raises RequestFailed on errors."""


class RequestFailed(Exception):
    """The server answered with an error status or sent an error event."""


@dataclass(frozen=True)
class RequestResult:
    """One request as its client measured it; times in seconds from sending it."""

    ttft: float | None
    latency: float
    tokens: int
    chunks: int
    gaps: tuple[float, ...]  # inter-token latencies (per token) between content chunks
    error: str | None = None


@dataclass(frozen=True)
class LevelResult:
    """One concurrency level of one system."""

    system: str
    concurrency: int
    wall: float
    results: tuple[RequestResult, ...]
    own_cores: float = math.nan  # CPU cores this process tree kept busy on average
    other_cores: float = math.nan  # CPU cores every other process kept busy on average

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
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                   help="which systems to measure, in this order")
    p.add_argument("--config", type=Path, default=SERVE_CONFIG,
                   help="serve config whose first application's args the serve system uses")
    p.add_argument("--max-batch-size", type=int, default=32, help="engine rows (serve and engine)")
    p.add_argument("--batch-size", type=int, help="serve: @serve.batch admission group size")
    p.add_argument("--stream-interval-s", type=float, help="serve: least time between two messages of a stream")
    p.add_argument("--num-cpus", type=float, help="serve: CPUs reserved for the LLM replica")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a request may take")
    p.add_argument("--ray-logs", action="store_true", help="show the Ray workers' logs")
    p.add_argument("--output", type=Path, help="also write the results as markdown to this file")
    p.add_argument("--plot", type=Path, help="PNG plot of tokens/s and TTFT p50 against concurrency")
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
    config = yaml.safe_load(args.config.read_text())
    values = dict(config["applications"][0].get("args") or {})
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
    """Read one request's stream to its end and time it; errors become a failed result."""
    start = time.perf_counter()
    times: list[float] = []
    counts: list[int | None] = []
    usage: int | None = None
    error: str | None = None
    try:
        async for chunk in stream:
            if chunk.kind == "usage":
                usage = chunk.tokens
            else:
                times.append(time.perf_counter() - start)
                counts.append(chunk.tokens)
    except Exception as err:  # a failed request is a measurement, not a crash
        error = f"{type(err).__name__}: {err}"
    latency = time.perf_counter() - start
    tokens = usage if usage is not None else sum(c or 1 for c in counts)
    return RequestResult(times[0] if times else None, latency, tokens, len(times),
                         tuple(per_token_gaps(times, counts, tokens)), error)


async def run_level(transport: Transport, system: str, concurrency: int, count: int,
                    max_tokens: int) -> LevelResult:
    """`concurrency` clients each send requests one after another until `count` were sent."""
    indexes = iter(range(count))  # shared by the clients: each next() hands out one request
    results: list[RequestResult] = []

    async def client() -> None:
        for i in indexes:
            results.append(await measure(transport(QUESTIONS[i % len(QUESTIONS)], max_tokens)))

    cpu = CpuSnapshot.take()
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    own, other = CpuSnapshot.take().cores_since(cpu, wall)
    level = LevelResult(system, concurrency, wall, tuple(results), own, other)
    log_level(level, max_tokens)
    return level


def log_level(level: LevelResult, max_tokens: int) -> None:
    """One progress line per level, and the first few errors."""
    log.info("%s c=%d: %d requests in %.1f s, %.1f tok/s, TTFT p50 %.3f s, %d errors, "
             "CPU cores: %.2f ours, %.2f others",
             level.system, level.concurrency, len(level.results), level.wall, level.tokens_per_s,
             level.ttft(50), level.errors, level.own_cores, level.other_cores)
    for result in [r for r in level.results if r.error][:MAX_LOGGED_ERRORS]:
        log.warning("%s c=%d: request failed: %s", level.system, level.concurrency, result.error)
    short = [r.tokens for r in level.ok if r.tokens != max_tokens]
    if short:
        log.warning("%s c=%d: token counts other than %d: %s", level.system, level.concurrency, max_tokens, short)


async def run_levels(transport: Transport, system: str, args: argparse.Namespace) -> list[LevelResult]:
    """An untimed warm-up, then every concurrency level in turn."""
    log.info("%s: warming up (%d x %d tokens)", system, WARMUP_REQUESTS, WARMUP_TOKENS)
    await run_level(transport, f"{system} warm-up", WARMUP_REQUESTS, WARMUP_REQUESTS, WARMUP_TOKENS)
    levels = []
    for concurrency in args.concurrency:
        count = requests_per_level(args, concurrency)
        log.info("%s: concurrency %d, %d requests x %d tokens", system, concurrency, count, args.max_tokens)
        levels.append(await run_level(transport, system, concurrency, count, args.max_tokens))
    return levels


# ----- clients --------------------------------------------------------------------------------


def chat_body(model: str, question: str, max_tokens: int) -> dict[str, Any]:
    """An OpenAI streaming chat request: greedy, exactly max_tokens tokens, usage at the end."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def parse_event(data: str) -> list[Chunk]:
    """The Chunks of one SSE `data:` payload (none for the role chunk or a finish chunk)."""
    payload = json.loads(data)
    if "error" in payload:
        raise RequestFailed(payload["error"].get("message", "error event"))
    chunks = [Chunk("content") for c in payload.get("choices", []) if (c.get("delta") or {}).get("content")]
    if payload.get("usage"):
        chunks.append(Chunk("usage", payload["usage"]["completion_tokens"]))
    return chunks


async def http_stream(client: httpx.AsyncClient, model: str, question: str, max_tokens: int) -> AsyncIterator[Chunk]:
    """POST /v1/chat/completions and yield the Chunks of its SSE stream until [DONE]."""
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(model, question, max_tokens)) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            raise RequestFailed(f"HTTP {response.status_code}: {body[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                return
            for chunk in parse_event(data):
                yield chunk
    raise RequestFailed("the stream ended without [DONE]")


async def measure_http(url: str, model: str, system: str, args: argparse.Namespace) -> list[LevelResult]:
    """Run every level against an OpenAI-compatible server at `url`."""
    limits = httpx.Limits(max_connections=max(args.concurrency) + WARMUP_REQUESTS)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        return await run_levels(partial(http_stream, client, model), system, args)


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
        return await run_levels(partial(engine_stream, engine), system, args)
    finally:
        await engine.close()


# ----- the serve system -----------------------------------------------------------------------


@contextmanager
def serve_app(values: dict[str, Any], ray_logs: bool) -> Iterator[str]:
    """A private local Ray instance running the application; yields its base URL."""
    import ray
    from ray import serve

    from deployments.app import build_app

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}},
        log_to_driver=ray_logs,
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(build_app(values), name=APP_NAME, route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(url, timeout_s=120)
            yield url
        finally:
            serve.shutdown()
    finally:
        started = psutil.Process().children(recursive=True)  # GCS, raylet, agents, workers
        ray.shutdown()
        wait_for_exit(started)


def measure_engine_beside_idle_serve(values: dict[str, Any], args: argparse.Namespace) -> list[LevelResult]:
    """The engine system while the serve app idles in a private local Ray on this machine:
    what Ray's and Serve's own background work (no request) costs the model's two threads."""
    log.info("engine-beside-idle-serve: starting an idle copy of the serve app")
    with serve_app(values, args.ray_logs):
        return asyncio.run(measure_engine(values, args, "engine-beside-idle-serve"))


def wait_for_exit(processes: Sequence[psutil.Process], timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Wait until Ray's processes have ended, so they use no CPU during the next system."""
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    if alive:
        log.warning("%d Ray processes still running %g s after ray.shutdown(): %s",
                    len(alive), timeout_s, [p.pid for p in alive])


def _torch_threads(_actor: object) -> tuple[int, str | None]:
    """Runs inside a Ray actor (via __ray_call__): torch's intra-op threads and OMP_NUM_THREADS there."""
    return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


def replica_threads() -> str:
    """torch threads inside the LLM replica (Ray sets OMP_NUM_THREADS from the actor's num_cpus)."""
    import ray

    try:
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "LLMServer" in a["name"]]
        actor = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])
        threads, omp = ray.get(actor.__ray_call__.remote(_torch_threads), timeout=60)
    except Exception as err:  # a diagnostic only
        log.warning("could not ask the LLM replica for its torch threads: %s", err)
        return "unknown"
    return f"{threads} (OMP_NUM_THREADS={omp})"


def measure_serve(values: dict[str, Any], args: argparse.Namespace, notes: list[str]) -> list[LevelResult]:
    """Start the application, run every level over HTTP, shut Serve and Ray down."""
    model = AppArgs.model_validate(values).model_name
    log.info("serve: starting Ray and the application (%s)", model)
    with serve_app(values, args.ray_logs) as url:
        threads = replica_threads()
        log.info("serve: up at %s; torch threads in the LLM replica: %s", url, threads)
        notes.append(f"serve: torch threads in the LLM replica: {threads}")
        return asyncio.run(measure_http(url, model, "serve", args))


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
        return asyncio.run(measure_http(url, app.model_name, "hf-per-request", args))


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
        "- tok/s: completion tokens of the level / its wall time; TTFT: first content chunk; ITL: gap between "
        "content chunks / tokens in the later chunk (over HTTP: first chunk = 1 token, the rest share the others); "
        "chunks/token: content chunks / completion tokens (for serve: Ray messages per generated token)",
        "- CPU: cores busy on average during the level, in this benchmark's process tree (client, engine, "
        "Ray) and in every other process (other work on the machine: it skews the figures when well above 0)",
    ]


def system_table(levels: Sequence[LevelResult]) -> list[str]:
    """One system's levels as markdown table lines."""
    lines = [
        f"## {levels[0].system}",
        "",
        "| concurrency | requests | errors | tok/s | TTFT p50 s | TTFT p95 s | ITL p50 ms | e2e p50 s | e2e p95 s "
        "| chunks/token | CPU ours | CPU others |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    return lines + [
        f"| {lv.concurrency} | {len(lv.results)} | {lv.errors} | {fmt(lv.tokens_per_s, 1)} | {fmt(lv.ttft(50), 3)} "
        f"| {fmt(lv.ttft(95), 3)} | {fmt(lv.itl(50) * 1000, 1)} | {fmt(lv.latency(50))} | {fmt(lv.latency(95))} "
        f"| {fmt(lv.chunks_per_token)} | {fmt(lv.own_cores)} | {fmt(lv.other_cores)} |"
        for lv in levels
    ]


def ratio(numerator: LevelResult | None, denominator: LevelResult | None) -> float:
    """tokens/s of one level over another's; NaN when either is missing."""
    if numerator is None or denominator is None or not denominator.tokens_per_s:
        return math.nan
    return numerator.tokens_per_s / denominator.tokens_per_s


def ratio_table(results: dict[str, list[LevelResult]], levels: Sequence[int]) -> list[str]:
    """tokens/s of serve against each baseline, per concurrency level."""
    by_level = {name: {lv.concurrency: lv for lv in runs} for name, runs in results.items()}
    lines = [
        "## Ratios (tokens/s)",
        "",
        f"| concurrency | serve tok/s | engine tok/s | serve / engine (target >= {ENGINE_TARGET} at {max(levels)}) "
        f"| hf-per-request tok/s | serve / hf (target >= {HF_TARGET:g} at {max(levels)}) "
        "| engine-beside-idle-serve / engine |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in levels:
        serve, engine, hf, beside = (by_level.get(name, {}).get(c) for name in
                                     ("serve", "engine", "hf-per-request", "engine-beside-idle-serve"))
        lines.append(
            f"| {c} | {fmt(serve.tokens_per_s if serve else math.nan, 1)} "
            f"| {fmt(engine.tokens_per_s if engine else math.nan, 1)} | {fmt(ratio(serve, engine))} "
            f"| {fmt(hf.tokens_per_s if hf else math.nan, 1)} | {fmt(ratio(serve, hf), 1)} "
            f"| {fmt(ratio(beside, engine))} |"
        )
    return lines


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, levels in results.items():
        xs = [lv.concurrency for lv in levels]
        left.plot(xs, [lv.tokens_per_s for lv in levels], marker="o", label=name)
        right.plot(xs, [lv.ttft(50) for lv in levels], marker="o", label=name)
    for axis, title, unit in ((left, "throughput", "tokens/s"), (right, "TTFT p50", "seconds (log)")):
        axis.set_xscale("log", base=2)
        ticks = sorted({lv.concurrency for levels in results.values() for lv in levels})
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend()
    right.set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info("plot written to %s", path)


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
