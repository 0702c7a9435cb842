"""The repetition guard on scripted token streams (tiny byte-level tokenizer): loops stop, lists and code do not."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.config import RepetitionGuardConfig, SamplingParams
from engine.repetition import RepetitionGuard
from engine.request import GenerationRequest
from engine.row import Row
from tests.tiny_models import build_tokenizer

LOOPS = {
    "a line": "Paris is lovely in spring.\n" + "La vida de este tipo:\n" * 40,
    "a phrase": "I think " + "that the answer is " * 40,
    "a token": "Well" + "!" * 200,
}
ORDINARY = {
    "numbered list": "".join(f"{i}. Item number {i} of the list\n" for i in range(1, 60)),
    "bullets": "".join(f"- {w}\n" for w in "apples pears plums figs kiwis limes dates grapes melons cherries".split() * 3),
    "code": (
        "def grid(n):\n    rows = []\n    for i in range(n):\n        row = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]\n"
        "        rows.append(row)\n    return rows\n\n"
        + "".join(" " * (4 * depth) + "}\n" for depth in range(6, -1, -1))
        + ("# " + "-" * 60 + "\n") * 3
        + "".join(f"assert f({i}) == {i * i}\n" for i in range(20))
    ),
    "table": "| city | country |\n|---|---|\n" + "".join(f"| city {i} | land {i % 3} |\n" for i in range(30)),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tokens_until_stop(guard: RepetitionGuard, token_ids: list[int]) -> int | None:
    """How many tokens the guard let through before it fired, or None."""
    return next((n for n, token in enumerate(token_ids, 1) if guard.feed(token)), None)


@pytest.mark.parametrize("name", LOOPS)
def test_loops_are_stopped_soon(tokenizer, name):
    ids = tokenizer(LOOPS[name])["input_ids"]
    guard = RepetitionGuard()
    stopped_at = tokens_until_stop(guard, ids)
    assert stopped_at is not None and 96 <= stopped_at < 200
    assert guard.loop[1] >= 8  # repeats
    assert tokens_until_stop(RepetitionGuard(RepetitionGuardConfig(min_repeats=0)), ids) is None


@pytest.mark.parametrize("name", ORDINARY)
def test_lists_and_code_are_left_alone(tokenizer, name):
    ids = tokenizer(ORDINARY[name])["input_ids"]
    assert len(ids) > 150 and tokens_until_stop(RepetitionGuard(), ids) is None


def test_a_looping_row_stops_and_says_why(tokenizer, caplog):
    ids = tokenizer(LOOPS["a line"])["input_ids"]
    request = GenerationRequest([0], SamplingParams(max_tokens=len(ids)), request_id="looper")
    row = Row.create(request, tokenizer, frozenset({2}), 32, torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="engine.row"):
        deltas = [row.advance(t) for t in ids[: tokens_until_stop(RepetitionGuard(), ids)]]
    last = deltas[-1]
    assert last.finish_reason == "stop" and last.stats.stop_reason == "repetition"
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids[: len(deltas)])
    assert any("looper" in r.getMessage() and "repeated" in r.getMessage() for r in caplog.records)
    fixed_length = GenerationRequest([0], SamplingParams(max_tokens=len(ids), ignore_eos=True))
    row = Row.create(fixed_length, tokenizer, frozenset({2}), 32, torch.device("cpu"))
    assert [row.advance(t).finish_reason for t in ids][-1] == "length"  # ignore_eos: exactly max_tokens
