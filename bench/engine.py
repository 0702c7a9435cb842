"""Benchmark the engine against plain Hugging Face `generate`, both measured in the same run.

Two scenarios on one loaded model (the engine's own weights serve the baselines too):

1. Throughput: N chat prompts x T new tokens (greedy, ignore_eos), all submitted to the
   engine at once, versus the same prompts as ONE static left-padded `model.generate` batch
   generating exactly T tokens per row.
2. Staggered arrivals: requests arrive one every few milliseconds, each with its own
   max_tokens (seeded). The engine gets each request at its arrival time and streams; the
   baseline is the seeds' "batch mode": whatever arrived while the previous batch ran forms
   the next batch (up to the batch size), run with `generate` to the batch's longest
   max_tokens, with no streaming, so a request's first token reaches its client when its
   batch ends. Both use a real clock.

    python -m bench.engine                    # full run (minutes on 2 CPU cores)
    python -m bench.engine --quick            # a few seconds of work, to check the script
    python -m bench.engine --output bench/results.md

Results go to stdout as a markdown table (and to --output if given); progress goes to logging.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import math
import platform
import random
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch

from bench.cli import parse_with_quick, publish, setup_logging
from bench.percentiles import percentile
from engine.config import Dtype, EngineConfig, SamplingParams
from engine.engine import Engine
from engine.loader import LoadedModel
from engine.prompt import ChatMessage
from engine.request import RequestEnd, RequestOutput

log = logging.getLogger("bench.engine")

QUESTIONS = (
    "What is the capital of France?",
    "How do plants make their food?",
    "Give me three tips for better sleep.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "What is the difference between a virus and a bacterium?",
    "Explain recursion to a ten-year-old.",
    "How many legs does a spider have?",
    "Suggest a name for a small coffee shop.",
    "What causes the seasons on Earth?",
    "How do I boil an egg?",
    "What is machine learning in one paragraph?",
    "Translate 'good morning' into Spanish and German.",
    "Why do cats purr?",
    "List five fruits that are high in vitamin C.",
    "What is the Pythagorean theorem?",
    "How does a bicycle stay upright?",
    "Write a short thank-you note to a teacher.",
    "What were the main causes of World War I?",
    "How can I save money on groceries?",
    "Explain what a black hole is.",
    "What is the boiling point of water at sea level?",
    "Describe the water cycle.",
    "Tell me a fun fact about octopuses.",
    "What is the difference between weather and climate?",
    "How do vaccines work?",
    "Give me a simple recipe for pancakes.",
    "Why do we have leap years?",
    "What is photosynthesis?",
    "How should I prepare for a job interview?",
    "What does a CPU do in a computer?",
    "Write two sentences about the ocean.",
)

FULL_DEFAULTS = {
    "requests": 32,
    "max_tokens": 128,
    "stagger_requests": 48,
    "interval_ms": 20.0,
    "min_stagger_tokens": 16,
    "max_stagger_tokens": 256,
}
QUICK_DEFAULTS = {
    "requests": 4,
    "max_tokens": 16,
    "stagger_requests": 6,
    "interval_ms": 20.0,
    "min_stagger_tokens": 4,
    "max_stagger_tokens": 24,
}
WARMUP_REQUESTS = 4
WARMUP_TOKENS = 8
THROUGHPUT_TARGET = 0.9


@dataclass(frozen=True)
class BenchRequest:
    """One request of a scenario: prompt token ids, tokens wanted, arrival (s after start)."""

    prompt_ids: list[int]
    max_tokens: int
    arrival: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """One request as measured; times in seconds after the start of its scenario."""

    arrival: float
    first_token: float
    finished: float
    tokens: int
    token_ids: list[int]

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def latency(self) -> float:
        return self.finished - self.arrival


@dataclass(frozen=True)
class ResultRow:
    """One line of the results table."""

    metric: str
    engine: float
    baseline: float
    better: str

    @property
    def ratio(self) -> float:
        return self.engine / self.baseline if self.baseline else math.nan


# ----- command line ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; scenario sizes default to FULL_DEFAULTS."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (explicit options still win)")
    p.add_argument("--requests", type=int, help="throughput: number of requests")
    p.add_argument("--max-tokens", type=int, help="throughput: new tokens per request")
    p.add_argument("--stagger-requests", type=int, help="staggered: number of requests")
    p.add_argument("--interval-ms", type=float, help="staggered: milliseconds between arrivals")
    p.add_argument("--min-stagger-tokens", type=int, help="staggered: smallest max_tokens")
    p.add_argument("--max-stagger-tokens", type=int, help="staggered: largest max_tokens")
    p.add_argument("--batch-size", type=int, default=32, help="engine and static batch size limit")
    p.add_argument("--seed", type=int, default=0, help="seed of the staggered max_tokens draw")
    p.add_argument("--dtype", choices=get_args(Dtype), default="auto", help="model dtype")
    p.add_argument("--model", default=EngineConfig().model, help="model name, hub id or folder")
    p.add_argument("--skip", choices=("throughput", "staggered"), action="append", default=[],
                   help="skip a scenario (repeatable)")
    p.add_argument("--output", type=Path, help="also write the results as markdown to this file")
    p.set_defaults(**FULL_DEFAULTS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse options; --quick swaps in QUICK_DEFAULTS under any explicitly given option."""
    parser = build_parser()
    args = parse_with_quick(parser, argv, QUICK_DEFAULTS)
    if not 1 <= args.min_stagger_tokens <= args.max_stagger_tokens:
        parser.error("need 1 <= --min-stagger-tokens <= --max-stagger-tokens")
    if min(args.requests, args.max_tokens, args.stagger_requests, args.batch_size) < 1:
        parser.error("request counts, token counts and the batch size must be positive")
    return args


# ----- workloads ------------------------------------------------------------------------


def chat_prompt_ids(engine: Engine, count: int) -> list[list[int]]:
    """Token ids of `count` chat prompts (cycling through QUESTIONS), as the engine builds them."""
    params = SamplingParams(max_tokens=1)
    return [
        engine.chat_request([ChatMessage("user", QUESTIONS[i % len(QUESTIONS)])], params).prompt_ids
        for i in range(count)
    ]


def throughput_workload(engine: Engine, count: int, max_tokens: int) -> list[BenchRequest]:
    """`count` different prompts, all arriving at once, each wanting `max_tokens` tokens."""
    return [BenchRequest(ids, max_tokens) for ids in chat_prompt_ids(engine, count)]


def staggered_workload(engine: Engine, args: argparse.Namespace) -> list[BenchRequest]:
    """Requests arriving every `interval_ms`, each with a seeded max_tokens in the given range."""
    rng = random.Random(args.seed)
    return [
        BenchRequest(ids, rng.randint(args.min_stagger_tokens, args.max_stagger_tokens),
                     i * args.interval_ms / 1000)
        for i, ids in enumerate(chat_prompt_ids(engine, args.stagger_requests))
    ]


def greedy(max_tokens: int) -> SamplingParams:
    """Greedy sampling of exactly `max_tokens` tokens."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


# ----- the engine -----------------------------------------------------------------------


async def consume(stream: AsyncIterator[RequestOutput], start: float) -> tuple[float, float, list[int], int]:
    """Read a stream to its end: (first delta time, last delta time, token ids, completion tokens)."""
    first = last = None
    token_ids: list[int] = []
    async for item in stream:
        if isinstance(item, RequestEnd):
            if item.failed or item.stats is None or first is None:
                raise RuntimeError(f"request failed: {item.error or 'cancelled'}")
            return first, last, token_ids, item.stats.completion_tokens
        last = time.perf_counter() - start
        first = last if first is None else first
        token_ids += item.token_ids
    raise RuntimeError("the stream ended without its RequestEnd")


async def engine_request(engine: Engine, request: BenchRequest, start: float) -> Outcome:
    """Submit `request` at its arrival time and measure it until its last delta."""
    delay = request.arrival - (time.perf_counter() - start)
    if delay > 0:  # no await otherwise, so requests arriving together are admitted together
        await asyncio.sleep(delay)
    stream = engine.submit(engine.completion_request(request.prompt_ids, greedy(request.max_tokens)))
    first, finished, token_ids, tokens = await consume(stream, start)
    return Outcome(request.arrival, first, finished, tokens, token_ids)


async def run_engine(engine: Engine, requests: Sequence[BenchRequest]) -> list[Outcome]:
    """Run one scenario on the engine; every request is submitted at its own arrival time."""
    start = time.perf_counter()
    return list(await asyncio.gather(*(engine_request(engine, r, start) for r in requests)))


# ----- Hugging Face generate baselines --------------------------------------------------


@contextmanager
def standard_attention(model: torch.nn.Module) -> Iterator[None]:
    """transformers' SDPA attention for a while: the engine set its model to paged attention,
    which only runs inside the engine's steps."""
    saved = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(saved)


def hf_generate(loaded: LoadedModel, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
    """One static left-padded greedy `generate` batch of exactly `new_tokens` tokens per row."""
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": [list(p) for p in prompts]}, padding=True, return_tensors="pt")
    with torch.inference_mode(), standard_attention(loaded.model):
        out = loaded.model.generate(
            input_ids=batch["input_ids"].to(loaded.device),
            attention_mask=batch["attention_mask"].to(loaded.device),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[:, batch["input_ids"].shape[1]:].tolist()


def run_hf_static(loaded: LoadedModel, requests: Sequence[BenchRequest]) -> list[Outcome]:
    """All requests as one `generate` batch to the longest max_tokens (throughput baseline)."""
    start = time.perf_counter()
    outputs = hf_generate(loaded, [r.prompt_ids for r in requests], max(r.max_tokens for r in requests))
    done = time.perf_counter() - start
    return [
        Outcome(r.arrival, done, done, min(len(ids), r.max_tokens), ids[: r.max_tokens])
        for r, ids in zip(requests, outputs)
    ]


def arrived(requests: Sequence[BenchRequest], first: int, now: float, limit: int) -> int:
    """Index one past the last request (from `first`, at most `limit` of them) arrived by `now`."""
    end = first
    while end < len(requests) and end - first < limit and requests[end].arrival <= now:
        end += 1
    return end


def run_batch_mode(loaded: LoadedModel, requests: Sequence[BenchRequest], batch_size: int) -> list[Outcome]:
    """The seeds' batch mode on a real clock: wait for arrivals, batch them, generate, repeat.

    Requests must be sorted by arrival. A request's first token reaches its client when its
    batch finishes (no streaming); only the tokens it asked for count as useful.
    """
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    while len(outcomes) < len(requests):
        wait = requests[len(outcomes)].arrival - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        end = arrived(requests, len(outcomes), time.perf_counter() - start, batch_size)
        batch = requests[len(outcomes):end]
        outputs = hf_generate(loaded, [r.prompt_ids for r in batch], max(r.max_tokens for r in batch))
        done = time.perf_counter() - start
        log.info("batch mode: %d requests to %d tokens, done at %.2f s",
                 len(batch), max(r.max_tokens for r in batch), done)
        outcomes += [
            Outcome(r.arrival, done, done, min(len(ids), r.max_tokens), ids[: r.max_tokens])
            for r, ids in zip(batch, outputs)
        ]
    return outcomes


# ----- measurements -----------------------------------------------------------------------


def tokens_per_second(outcomes: Sequence[Outcome]) -> float:
    """Useful tokens over the time from the first arrival to the last completion."""
    elapsed = max(o.finished for o in outcomes) - min(o.arrival for o in outcomes)
    return sum(o.tokens for o in outcomes) / elapsed


def matching_outputs(engine: Sequence[Outcome], hf: Sequence[Outcome], eos_ids: frozenset[int]) -> int:
    """How many rows have the same greedy tokens in both, compared up to the engine's first EOS.

    With ignore_eos the engine keeps going after an EOS while `generate` (min_new_tokens)
    never picks one, so only the part before it is comparable.
    """
    same = 0
    for mine, theirs in zip(engine, hf):
        cut = next((i for i, t in enumerate(mine.token_ids) if t in eos_ids), len(mine.token_ids))
        same += mine.token_ids[:cut] == theirs.token_ids[:cut]
    return same


async def warm_up(engine: Engine, requests: Sequence[BenchRequest]) -> None:
    """One small untimed run on each side, so lazy initialization is not measured."""
    small = [BenchRequest(r.prompt_ids, WARMUP_TOKENS) for r in requests[:WARMUP_REQUESTS]]
    log.info("warming up the engine and HF generate (%d x %d tokens)", len(small), WARMUP_TOKENS)
    await run_engine(engine, small)
    run_hf_static(engine.loaded, small)


async def bench_throughput(engine: Engine, args: argparse.Namespace) -> tuple[list[ResultRow], str]:
    """Scenario 1: result rows and a note on whether both sides produced the same text."""
    requests = throughput_workload(engine, args.requests, args.max_tokens)
    log.info("throughput: engine, %d requests x %d tokens", len(requests), args.max_tokens)
    mine = await run_engine(engine, requests)
    log.info("throughput: HF generate, one static batch of %d", len(requests))
    theirs = run_hf_static(engine.loaded, requests)
    short = [o.tokens for o in mine + theirs if o.tokens != args.max_tokens]
    if short:
        log.warning("some requests produced other token counts than asked: %s", short)
    same = matching_outputs(mine, theirs, engine.loaded.eos_token_ids)
    label = f"throughput tok/s ({len(requests)} x {args.max_tokens}) vs one HF generate batch"
    row = ResultRow(label, tokens_per_second(mine), tokens_per_second(theirs),
                    f"higher (target >= {THROUGHPUT_TARGET})")
    return [row], f"throughput: greedy outputs identical to HF generate in {same}/{len(requests)} rows"


async def bench_staggered(engine: Engine, args: argparse.Namespace) -> list[ResultRow]:
    """Scenario 2: TTFT percentiles, latency and useful tokens/s, engine versus batch mode."""
    requests = staggered_workload(engine, args)
    log.info("staggered: engine, %d requests every %.0f ms, max_tokens %d..%d (seed %d)",
             len(requests), args.interval_ms, args.min_stagger_tokens, args.max_stagger_tokens, args.seed)
    mine = await run_engine(engine, requests)
    log.info("staggered: batch mode with HF generate (batch size %d)", args.batch_size)
    theirs = run_batch_mode(engine.loaded, requests, args.batch_size)
    rows = [
        ResultRow(f"staggered TTFT p{q} s vs batch mode", percentile([o.ttft for o in mine], q),
                  percentile([o.ttft for o in theirs], q), "lower")
        for q in (50, 95)
    ]
    rows.append(ResultRow("staggered latency p50 s (arrival to last token)",
                          percentile([o.latency for o in mine], 50),
                          percentile([o.latency for o in theirs], 50), "lower"))
    rows.append(ResultRow("staggered useful tok/s vs batch mode", tokens_per_second(mine),
                          tokens_per_second(theirs), "higher"))
    return rows


# ----- report -------------------------------------------------------------------------------


def header(engine: Engine, args: argparse.Namespace) -> list[str]:
    """Markdown lines describing what was measured where."""
    loaded = engine.loaded
    return [
        f"# Engine benchmark ({datetime.datetime.now().isoformat(timespec='seconds')})",
        "",
        f"- model: {loaded.name}, dtype {str(loaded.dtype).removeprefix('torch.')}, device {loaded.device}",
        f"- host: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads",
        f"- throughput: {args.requests} requests x {args.max_tokens} tokens, greedy, ignore_eos",
        f"- staggered: {args.stagger_requests} requests, one every {args.interval_ms:g} ms, max_tokens "
        f"{args.min_stagger_tokens}..{args.max_stagger_tokens} (seed {args.seed}), "
        f"batch size {args.batch_size}",
        "- baselines: HF `generate` on the same model object, left-padded static batches",
        "- TTFT: first streamed delta (engine) or end of its batch (batch mode) minus scheduled arrival; "
        "tok/s: useful tokens / (last completion - first arrival)",
    ]


def results_table(rows: Sequence[ResultRow]) -> list[str]:
    """The results as markdown table lines."""
    lines = ["| metric | engine | baseline | engine / baseline | better |", "|---|---:|---:|---:|---|"]
    return lines + [
        f"| {r.metric} | {r.engine:.2f} | {r.baseline:.2f} | {r.ratio:.2f} | {r.better} |" for r in rows
    ]


def report(engine: Engine, args: argparse.Namespace, rows: Sequence[ResultRow], notes: Sequence[str]) -> str:
    """The whole markdown report."""
    lines = header(engine, args) + [""] + results_table(rows) + [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> str:
    """Load the model, run the chosen scenarios and return the markdown report."""
    log.info("loading %s (dtype %s)", args.model, args.dtype)
    config = EngineConfig(model=args.model, dtype=args.dtype, max_batch_size=args.batch_size)
    engine = Engine.from_config(config)
    try:
        await warm_up(engine, throughput_workload(engine, WARMUP_REQUESTS, WARMUP_TOKENS))
        rows: list[ResultRow] = []
        notes: list[str] = []
        if "throughput" not in args.skip:
            throughput_rows, note = await bench_throughput(engine, args)
            rows += throughput_rows
            notes.append(note)
        if "staggered" not in args.skip:
            rows += await bench_staggered(engine, args)
        return report(engine, args, rows, notes)
    finally:
        await engine.close()


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    args = parse_args(argv)
    publish(asyncio.run(run(args)), args.output)


if __name__ == "__main__":
    main()
