"""What one request may cost the engine's per-token work: the worst the API accepts against a plain one.

CPU time of this process (not wall-clock), best of several interleaved rounds, over a scripted
token stream: a row is created and fed every token, as the engine core does after sampling.
"""

from __future__ import annotations

import time

import pytest
import torch

from engine.config import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SamplingParams
from engine.request import GenerationRequest
from engine.row import Row
from tests.tiny_models import build_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while every stream keeps flowing token by token".split()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def prose(words: int) -> str:
    """Text that never repeats a line or phrase (so no guard stops it)."""
    return " ".join(f"{WORDS[i * 7 % len(WORDS)]} {i}" + (".\n" if i % 9 == 8 else "") for i in range(words))


def adversarial_stops(text: str) -> list[str]:
    """The most stop strings, each as long as allowed, whose long prefixes keep occurring in the
    text (so the matcher holds back and searches as much as it ever can) but never complete."""
    step = len(text) // MAX_STOP_STRINGS
    return [text[i * step : i * step + MAX_STOP_CHARS - 1] + "\x00" for i in range(MAX_STOP_STRINGS)]


def run_row(tokenizer, params: SamplingParams, token_ids: list[int]) -> str:
    row = Row.create(GenerationRequest([0], params), tokenizer, frozenset({2}), 32, torch.device("cpu"))
    text = "".join(row.advance(t).text for t in token_ids)
    assert row.finish_reason == "length" and len(row.sampler.output_ids) == len(token_ids)
    return text


def best_cpu_seconds(runs: dict[str, callable], rounds: int = 7) -> dict[str, float]:
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.process_time()
            run()
            best[name] = min(best[name], time.process_time() - start)
    return best


def test_the_worst_accepted_request_costs_at_most_twice_a_plain_one(tokenizer):
    text = prose(600)
    token_ids = tokenizer(text)["input_ids"]
    plain = SamplingParams(max_tokens=len(token_ids))
    worst = SamplingParams(max_tokens=len(token_ids), stop=adversarial_stops(text),
                           stop_token_ids=list(range(1000, 1000 + MAX_STOP_TOKEN_IDS)))
    assert run_row(tokenizer, worst, token_ids) == run_row(tokenizer, plain, token_ids) == text
    cost = best_cpu_seconds({"plain": lambda: run_row(tokenizer, plain, token_ids),
                             "worst": lambda: run_row(tokenizer, worst, token_ids)})
    assert cost["worst"] < 2.0 * cost["plain"], cost
