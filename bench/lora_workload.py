"""The workload of bench.lora_serving: S-LoRA's, scaled to this machine. Pure and seeded (no model,
no clock), so every system and every run gets the same requests.

- Adapters: N of them, `lora-000` the most popular; request i picks adapter k (from 0) with
  probability proportional to 1 / (k + 1) ** alpha (a power law; alpha 0 is uniform).
- Lengths: prompt tokens uniform in [8, 256], output tokens uniform in [8, 128] (inclusive).
- Arrivals over `duration` seconds at a mean `rate` per second: Poisson (exponential gaps) or
  bursty (gamma gaps with coefficient of variation 4, S-LoRA's burstier setting).

Streams are independent: request i has the same adapter, lengths and prompt at every rate and
arrival kind (only its arrival time changes), and the gaps of one kind are the same sequence
at every rate, scaled by 1 / rate.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from bench.chat_text import sentences

ArrivalKind = Literal["poisson", "bursty"]
ARRIVAL_KINDS: tuple[ArrivalKind, ...] = ("poisson", "bursty")
BURSTY_CV = 4.0  # coefficient of variation of the bursty gaps (std / mean)
INPUT_TOKENS = (8, 256)
OUTPUT_TOKENS = (8, 128)
OFFSETS = 2**31  # a request's text offset is uniform below this (reduced modulo the corpus)
CORPUS_COPIES = 8  # the corpus: bench.chat_text's sentences this many times, each in its own order


def adapter_name(index: int) -> str:
    """The name (and store folder name) of adapter `index` (from 0; 0 is the most popular)."""
    return f"lora-{index:03d}"


@dataclass(frozen=True)
class WorkloadSpec:
    """What to draw: N adapters and their popularity, the arrival process, lengths, the seed."""

    adapters: int
    alpha: float
    arrivals: ArrivalKind = "poisson"
    rate: float = 1.0  # mean requests per second
    duration: float = 60.0  # seconds during which requests arrive
    seed: int = 0
    input_tokens: tuple[int, int] = INPUT_TOKENS
    output_tokens: tuple[int, int] = OUTPUT_TOKENS


@dataclass(frozen=True)
class TraceRequest:
    """One request: when it arrives (seconds after the start), which adapter, how many tokens in and
    out, and where in the text corpus its prompt starts (see `prompt_window`)."""

    index: int
    arrival: float
    adapter: str
    input_tokens: int
    output_tokens: int
    text_offset: int


def unit_gaps(kind: ArrivalKind, seed: int) -> Iterator[float]:
    """Endless gaps with mean 1: exponential (Poisson), or gamma with cv BURSTY_CV (shape 1 / cv^2)."""
    rng = random.Random(f"arrivals-{kind}-{seed}")
    shape = 1 / BURSTY_CV**2
    while True:
        yield rng.expovariate(1.0) if kind == "poisson" else rng.gammavariate(shape, 1 / shape)


def arrival_times(kind: ArrivalKind, rate: float, duration: float, seed: int) -> list[float]:
    """Arrival times in [0, duration) at `rate` per second on average; the first after one gap."""
    times: list[float] = []
    now = 0.0
    for gap in unit_gaps(kind, seed):
        now += gap / rate
        if now >= duration:
            return times
        times.append(now)
    raise AssertionError("unreachable: unit_gaps never ends")


def popularity(adapters: int, alpha: float) -> list[float]:
    """Each adapter's probability of being asked for: proportional to 1 / (k + 1) ** alpha."""
    weights = [1 / (k + 1) ** alpha for k in range(adapters)]
    total = sum(weights)
    return [w / total for w in weights]


def draw_requests(spec: WorkloadSpec, arrivals: Sequence[float]) -> list[TraceRequest]:
    """One request per arrival time, the i-th always the same for the same adapters, alpha and seed."""
    rng = random.Random(f"requests-{spec.seed}")
    cumulative = list(itertools.accumulate(popularity(spec.adapters, spec.alpha)))
    requests = []
    for index, arrival in enumerate(arrivals):
        adapter = min(bisect.bisect_right(cumulative, rng.random()), spec.adapters - 1)
        requests.append(TraceRequest(index, arrival, adapter_name(adapter), rng.randint(*spec.input_tokens),
                                     rng.randint(*spec.output_tokens), rng.randrange(OFFSETS)))
    return requests


def build_trace(spec: WorkloadSpec) -> list[TraceRequest]:
    """The open-loop trace: requests at their arrival times over the spec's duration."""
    return draw_requests(spec, arrival_times(spec.arrivals, spec.rate, spec.duration, spec.seed))


def closed_loop_requests(spec: WorkloadSpec, count: int, skip: int = 0) -> list[TraceRequest]:
    """`count` requests with no arrival times (all 0.0), drawn as the trace draws them, after the
    first `skip` (so two closed-loop phases of one process need not repeat prompts)."""
    return draw_requests(spec, [0.0] * (skip + count))[skip:]


def corpus_text(copies: int = CORPUS_COPIES) -> str:
    """Real text to cut prompts from: bench.chat_text's sentences `copies` times, each copy shuffled
    (seeded), so that prompts starting at different offsets rarely share a prefix."""
    parts = []
    for copy in range(copies):
        order = sentences()
        random.Random(f"corpus-{copy}").shuffle(order)
        parts += order
    return " ".join(parts)


def prompt_window(corpus: Sequence[int], length: int, offset: int) -> list[int]:
    """`length` consecutive token ids of `corpus`, starting at `offset` modulo the possible starts."""
    if not 1 <= length <= len(corpus):
        raise ValueError(f"a prompt of {length} tokens does not fit a corpus of {len(corpus)}")
    start = offset % (len(corpus) - length + 1)
    return list(corpus[start:start + length])
