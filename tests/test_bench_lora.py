"""bench.lora_serving's workload generator (bench/lora_workload.py): seeded, in range, power-law
popularity, bursty gaps with cv 4. No model."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import replace
from itertools import islice

import pytest

from bench.lora_workload import (
    BURSTY_CV,
    WorkloadSpec,
    adapter_name,
    build_trace,
    closed_loop_requests,
    popularity,
    prompt_window,
    unit_gaps,
)

SPEC = WorkloadSpec(adapters=32, alpha=1.0, arrivals="poisson", rate=20.0, duration=100.0, seed=3)


def test_the_same_seed_gives_the_same_trace_and_another_seed_another():
    assert build_trace(SPEC) == build_trace(SPEC)
    assert build_trace(SPEC) != build_trace(replace(SPEC, seed=4))


def test_lengths_arrivals_and_adapters_are_in_range():
    trace = build_trace(SPEC)
    assert len(trace) == pytest.approx(SPEC.rate * SPEC.duration, rel=0.1)
    assert all(8 <= r.input_tokens <= 256 and 8 <= r.output_tokens <= 128 for r in trace)
    assert {min(r.input_tokens for r in trace), max(r.input_tokens for r in trace)} == {8, 256}
    arrivals = [r.arrival for r in trace]
    assert arrivals == sorted(arrivals) and 0 < arrivals[0] and arrivals[-1] < SPEC.duration
    assert {r.adapter for r in trace} <= {adapter_name(k) for k in range(SPEC.adapters)}


def test_a_request_is_the_same_at_every_rate_and_arrival_kind_only_its_time_moves():
    fast = build_trace(SPEC)
    slow = build_trace(replace(SPEC, rate=5.0))
    for other in (slow, build_trace(replace(SPEC, arrivals="bursty"))):
        n = min(len(other), len(fast))
        assert [replace(r, arrival=0.0) for r in other[:n]] == [replace(r, arrival=0.0) for r in fast[:n]]
    assert [r.arrival for r in slow] == pytest.approx([4 * r.arrival for r in fast[: len(slow)]])


def test_popularity_follows_the_power_law():
    assert popularity(4, 0.0) == pytest.approx([0.25] * 4)
    assert popularity(3, 1.0) == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    counts = Counter(r.adapter for r in closed_loop_requests(replace(SPEC, adapters=8), 40_000))
    shares = [counts[adapter_name(k)] / 40_000 for k in range(8)]
    assert shares == sorted(shares, reverse=True)
    assert shares == pytest.approx(popularity(8, 1.0), abs=0.01)


def test_bursty_gaps_have_mean_one_and_cv_four():
    gaps = list(islice(unit_gaps("bursty", seed=0), 200_000))
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1.0, rel=0.05)
    assert statistics.pstdev(gaps) / mean == pytest.approx(BURSTY_CV, rel=0.1)
    poisson = list(islice(unit_gaps("poisson", seed=0), 200_000))
    assert statistics.pstdev(poisson) / statistics.fmean(poisson) == pytest.approx(1.0, rel=0.05)


def test_closed_loop_requests_skip_the_ones_drawn_before():
    first = closed_loop_requests(SPEC, 5)
    assert closed_loop_requests(SPEC, 3, skip=2) == first[2:]
    assert all(r.arrival == 0.0 for r in first)


def test_prompt_windows_are_cut_from_the_corpus():
    corpus = list(range(100))
    assert prompt_window(corpus, 10, 5) == list(range(5, 15))
    assert prompt_window(corpus, 10, 91 + 5) == list(range(5, 15))  # 91 possible starts
    with pytest.raises(ValueError):
        prompt_window(corpus, 101, 0)


def test_the_benchmark_reads_stream_ends_of_engines_before_and_after_request_end(monkeypatch):
    """bench/lora_systems.py runs the current engine (streams end with a RequestEnd) and the
    "before" checkout's (its last delta carries the finish)."""
    from bench import lora_systems
    from engine.request import ChoiceEnd, Delta, RequestEnd

    ok, cancelled = RequestEnd([ChoiceEnd(0, "length")], None), RequestEnd([ChoiceEnd(0, "cancelled")], None, "gone")
    last = Delta("x", token_ids=[1], finish_reason="stop")
    assert lora_systems.ends_stream(ok) and not lora_systems.failed(ok) and lora_systems.failed(cancelled)
    assert not lora_systems.ends_stream(last)  # with RequestEnd, a finishing delta is not the end
    monkeypatch.setattr(lora_systems, "RequestEnd", None)  # an engine from before RequestEnd
    assert lora_systems.ends_stream(last) and not lora_systems.failed(last)
    assert lora_systems.failed(Delta("", finish_reason="error", error="boom"))
    assert not lora_systems.ends_stream(Delta("x", token_ids=[2]))
