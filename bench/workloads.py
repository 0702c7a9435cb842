"""bench.serve's request lists: what each of a level's requests asks and how many tokens it gets.

- `fixed`: the short questions of bench.engine in turn, every reply exactly `max_tokens`
  (EOS ignored): steps of one shape, the closed-loop throughput case.
- `spread`: prompt and reply lengths drawn from log-normal distributions, as the lengths of
  real chat logs are (ShareGPT's prompts and replies are roughly log-normal, with a long
  tail), scaled to two CPU cores: medians `prompt_median` and `reply_median` tokens, sigma
  `SIGMA`, clipped to `PROMPT_RANGE` / `REPLY_RANGE`. Each prompt is corpus text of about its
  drawn length (bench/chat_text.py) opening with its own request number, so requests share no
  prefix beyond the chat template. Seeded: every system sees the same list.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from bench.chat_text import user_message
from bench.engine import QUESTIONS

SIGMA = 0.9  # log-normal shape of both lengths: p90 is about 3.2x the median
PROMPT_RANGE = (16, 1024)
REPLY_RANGE = (8, 256)
SEED = 25


@dataclass(frozen=True)
class WorkRequest:
    """One request of a level: its user message and its reply length (EOS ignored)."""

    message: str
    max_tokens: int
    prompt_tokens: int = 0  # the drawn message length (0: not drawn)


def fixed_requests(count: int, max_tokens: int) -> list[WorkRequest]:
    """The fixed workload: bench.engine's questions in turn, `max_tokens` each."""
    return [WorkRequest(QUESTIONS[i % len(QUESTIONS)], max_tokens) for i in range(count)]


def lognormal_length(rng: random.Random, median: int, bounds: tuple[int, int], sigma: float = SIGMA) -> int:
    """A length from a log-normal with this median and sigma (0: the median), clipped to bounds."""
    return min(max(round(rng.lognormvariate(math.log(median), sigma)), bounds[0]), bounds[1])


def spread_requests(count: int, prompt_median: int, reply_median: int,
                    count_tokens: Callable[[str], int], seed: int = SEED, sigma: float = SIGMA) -> list[WorkRequest]:
    """The spread workload: `count` requests with log-normal prompt and reply lengths (seeded);
    `sigma` 0 gives every request the medians (guidellm's fixed synthetic shape)."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = lognormal_length(rng, prompt_median, PROMPT_RANGE, sigma)
        reply = lognormal_length(rng, reply_median, REPLY_RANGE, sigma)
        requests.append(WorkRequest(user_message(i, 0, prompt, count_tokens), reply, prompt))
    return requests


def describe(requests: list[WorkRequest]) -> str:
    """Prompt and reply lengths of a request list: median, p90, max, total reply tokens."""
    replies = sorted(r.max_tokens for r in requests)
    prompts = sorted(r.prompt_tokens for r in requests)

    def quantiles(values: list[int]) -> str:
        return f"median {values[len(values) // 2]}, p90 {values[int(0.9 * (len(values) - 1))]}, max {values[-1]}"

    if not any(prompts):
        return f"{len(requests)} requests, replies of {replies[0]} tokens"
    return (f"{len(requests)} requests; prompt tokens {quantiles(prompts)}; reply tokens {quantiles(replies)} "
            f"({sum(replies)} in all)")
