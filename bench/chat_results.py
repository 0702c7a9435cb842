"""bench.chat's results: every turn as measured, per system and round, and the markdown report
and plot made from them (the targets of issue #25 beside the ratios)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cli import figure, fmt, label_axis, median_cell
from bench.client import RequestResult
from bench.load import EngineSteps
from bench.percentiles import safe_percentile

VS_TRANSFORMERS_TARGET = 0.3  # serve / transformers-serve TTFT p50 at the last turn: at most
LAST_VS_FIRST_TARGET = 1.5  # serve's TTFT p50 at the last turn / at the first: at most (issue #25)


@dataclass(frozen=True)
class Turn:
    """One user's turn as the client measured it."""

    user: int
    turn: int  # from 0
    result: RequestResult
    prompt_tokens: int  # the server's usage count, else our tokenizer's
    sent_at: float = 0.0  # seconds from the start of the users' turns to this request's sending


@dataclass(frozen=True)
class PrefixCache:
    """Prompt tokens the engine looked up in its prefix cache, and those it found, over a span."""

    queries: int
    hits: int

    @classmethod
    def between(cls, before: Any, after: Any) -> PrefixCache | None:
        """The counters' growth from `before` to `after`; None when the stats lack them."""
        fields = ("prefix_cache_queries", "prefix_cache_hits")
        if any(getattr(s, f, None) is None for s in (before, after) for f in fields):
            return None
        return cls(after.prefix_cache_queries - before.prefix_cache_queries,
                   after.prefix_cache_hits - before.prefix_cache_hits)

    def describe(self) -> str:
        """One sentence for the report."""
        share = f" ({100 * self.hits / self.queries:.0f}%)" if self.queries else ""
        return f"{self.hits} of {self.queries} prompt tokens looked up were found in the prefix cache{share}"


@dataclass(frozen=True)
class SystemRun:
    """Every turn of every user on one system."""

    system: str
    turns: tuple[Turn, ...]
    wall: float
    own_cores: float  # CPU cores this process tree (client, server) kept busy on average
    other_cores: float  # CPU cores every other process kept busy on average
    prefix_cache: PrefixCache | None = None
    steps: EngineSteps | None = None  # our engine's steps during the turns (serve and engine)

    def of_turn(self, turn: int) -> list[Turn]:
        return [t for t in self.turns if t.turn == turn]

    def ok(self, turn: int) -> list[Turn]:
        return [t for t in self.of_turn(turn) if t.result.error is None]

    def ttft(self, turn: int, q: float) -> float:
        """TTFT percentile over the users' successful requests of one turn."""
        return safe_percentile([t.result.ttft for t in self.ok(turn) if t.result.ttft is not None], q)

    def mean(self, turn: int, value: Callable[[Turn], float]) -> float:
        ok = self.ok(turn)
        return sum(value(t) for t in ok) / len(ok) if ok else math.nan

    def cached_share(self, turn: int) -> float:
        """Of one turn's prompt tokens, the share the server's usage reports as cached (NaN when it
        reports none: transformers serve)."""
        ok = [t for t in self.ok(turn) if t.result.cached_tokens is not None]
        prompt = sum(t.prompt_tokens for t in ok)
        return sum(t.result.cached_tokens or 0 for t in ok) / prompt if prompt else math.nan

    def errors(self, turn: int) -> int:
        return len(self.of_turn(turn)) - len(self.ok(turn))



# ----- report ---------------------------------------------------------------------------------


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when either is missing or the denominator is 0."""
    return numerator / denominator if denominator and not math.isnan(denominator) else math.nan


def system_table(run: SystemRun, turns: int, suffix: str = "") -> list[str]:
    """One system's turns as markdown lines, and its prefix-cache use when known."""
    lines = [
        f"## {run.system}{suffix}",
        "",
        f"{len(run.turns)} requests in {run.wall:.1f} s; CPU cores busy on average: {run.own_cores:.2f} in this "
        f"benchmark's process tree (client and server), {run.other_cores:.2f} in other processes (other work on "
        "the machine: it skews the figures when well above 0).",
        "",
        "| turn | TTFT p50 s | TTFT max s | prompt tokens | cached % | reply tokens | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {t + 1} | {fmt(run.ttft(t, 50), 3)} | {fmt(run.ttft(t, 100), 3)} "
        f"| {fmt(run.mean(t, lambda x: x.prompt_tokens), 0)} | {fmt(run.cached_share(t) * 100, 0)} "
        f"| {fmt(run.mean(t, lambda x: x.result.tokens), 0)} | {run.errors(t)} |"
        for t in range(turns)
    ]
    if run.prefix_cache is not None:
        lines += ["", f"Prefix cache during the turns: {run.prefix_cache.describe()}."]
    if run.steps is not None and run.steps.steps:
        steps = run.steps
        lines += ["", f"Engine steps during the turns: {steps.steps}, {steps.seconds:.2f} s in all "
                      f"({steps.seconds / run.wall:.2f} of the wall time), {1000 * steps.seconds / steps.steps:.1f} ms "
                      f"and {steps.tokens / steps.steps:.1f} tokens a step."]
    return lines + ["", timeline(run, turns - 1)]


def timeline(run: SystemRun, turn: int) -> str:
    """One turn's requests in the order they were sent: when (from the turn's first) and their TTFT."""
    sent = sorted(run.of_turn(turn), key=lambda t: t.sent_at)
    if not sent:
        return f"Turn {turn + 1}: no requests."
    cells = [f"user {t.user + 1} at +{t.sent_at - sent[0].sent_at:.3f} s, TTFT {fmt(t.result.ttft, 3)} s" for t in sent]
    return f"Turn {turn + 1}, requests in the order sent: " + "; ".join(cells) + "."


RatioRow = tuple[str, Callable[[dict[str, SystemRun]], float], tuple[str, ...], str]
"""A ratio's name, its value from one round's runs, the systems it needs, its target."""


def ratio_table(rounds: Sequence[dict[str, SystemRun]], turns: int) -> list[str]:
    """The issue's targets: serve against transformers-serve at the last turn, serve's last turn
    against its first; the other systems' own growth, and what the serving stack adds (serve
    against the engine in this process), for reference. With several rounds, the median of the
    rounds' ratios, then each round's."""
    last = turns - 1

    def growth(system: str, target: str = "-") -> RatioRow:
        return (f"{system}, TTFT p50 turn {turns} / turn 1",
                lambda runs: ratio(runs[system].ttft(last, 50), runs[system].ttft(0, 50)), (system,), target)

    rows = [
        (f"serve / transformers-serve, TTFT p50 at turn {turns}",
         lambda runs: ratio(runs["serve"].ttft(last, 50), runs["transformers-serve"].ttft(last, 50)),
         ("serve", "transformers-serve"), f"<= {VS_TRANSFORMERS_TARGET}"),
        growth("serve", f"<= {LAST_VS_FIRST_TARGET:g}"),
        growth("engine"),
        growth("transformers-serve"),
        (f"serve / engine, TTFT p50 at turn {turns}",
         lambda runs: ratio(runs["serve"].ttft(last, 50), runs["engine"].ttft(last, 50)), ("serve", "engine"), "-"),
        ("serve / engine, seconds in engine steps",
         lambda runs: ratio(step_seconds(runs["serve"]), step_seconds(runs["engine"])), ("serve", "engine"), "-"),
    ]
    title = "## Ratios" + (f" over {len(rounds)} rounds (median, then each round)" if len(rounds) > 1 else "")
    lines = [title, "", "| ratio | value | target |", "|---|---:|---:|"]
    for name, value, needs, target in rows:
        per_round = [value(runs) if all(n in runs for n in needs) else math.nan for runs in rounds]
        lines.append(f"| {name} | {median_cell(per_round)} | {target} |")
    return lines


def step_seconds(run: SystemRun) -> float:
    """Seconds the engine spent in steps during the turns; NaN when unknown."""
    return run.steps.seconds if run.steps is not None else math.nan


def report(header_lines: list[str], rounds: Sequence[dict[str, SystemRun]], turns: int) -> str:
    """The whole markdown report: every round's tables, then the ratios."""
    lines = header_lines + [""]
    for number, runs in enumerate(rounds, start=1):
        for run in runs.values():
            suffix = f" (round {number})" if len(rounds) > 1 else ""
            lines += system_table(run, turns, suffix) + [""]
    lines += ratio_table(rounds, turns)
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, SystemRun], turns: int, path: Path) -> None:
    """TTFT p50 and mean prompt tokens against the turn, one line per system."""
    xs = list(range(1, turns + 1))
    with figure(path) as (left, right):
        for name, run in runs.items():
            left.plot(xs, [run.ttft(t, 50) for t in range(turns)], marker="o", label=name)
            right.plot(xs, [run.mean(t, lambda x: x.prompt_tokens) for t in range(turns)], marker="o", label=name)
        for axis, title, unit in ((left, "TTFT p50", "seconds"), (right, "prompt tokens (mean)", "tokens")):
            axis.set_xticks(xs)
            axis.set_ylim(bottom=0)
            label_axis(axis, title, "turn", unit)


