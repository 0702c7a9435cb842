"""bench.lora_serving's report: what was measured where, the calibration, one table of latency and
goodput and one of adapter handling per offered rate, ours' ratios to the baselines, the plot.

With several rounds a cell shows the median and then each round's value (bench.cli.median_cell).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.cli import figure, fmt, label_axis, median_cell
from bench.lora_adapters import RANKS, RELATIVE_NORM, TARGETS
from bench.lora_metrics import SLO_FACTOR, Calibration, Point
from bench.lora_workload import BURSTY_CV, INPUT_TOKENS, OUTPUT_TOKENS


@dataclass(frozen=True, order=True)
class Group:
    """The adapters of a sweep: how many, and the popularity power law's alpha."""

    adapters: int
    alpha: float

    def label(self) -> str:
        return f"N={self.adapters}, alpha {self.alpha:g}"


@dataclass(frozen=True, order=True)
class PointKey:
    """One offered load: a group, an arrival kind, a multiple of the saturation rate, the rate."""

    group: Group
    arrivals: str
    multiple: float
    rate: float  # requests per second


@dataclass
class Results:
    """Everything measured: calibrations per group and system, points per key and system (one
    Point per round), which system set each group's saturation, and each system's engine code."""

    calibrations: dict[Group, dict[str, Calibration]] = field(default_factory=dict)
    points: dict[PointKey, dict[str, list[Point]]] = field(default_factory=dict)
    reference: dict[Group, str] = field(default_factory=dict)
    engines: dict[str, str] = field(default_factory=dict)

    def add(self, key: PointKey, point: Point) -> None:
        self.points.setdefault(key, {}).setdefault(point.system, []).append(point)


def header(args: argparse.Namespace, store: Path, results: Results) -> list[str]:
    """Markdown lines describing what was measured where."""
    engines = "; ".join(f"{name}: {where}" for name, where in results.engines.items())
    return [
        f"# Serving many LoRA adapters ({datetime.datetime.now().isoformat(timespec='seconds')})",
        "",
        f"- model: {args.model} (dtype auto: bf16 on this CPU); host {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; every system in a process of its own, one at a time; engine code: {engines}",
        f"- adapters: made by PEFT in {store}: ranks {'/'.join(map(str, RANKS))} in turn, target modules "
        f"{TARGETS} (q, k, v, o, gate, up, down), random weights with each layer's update at {RELATIVE_NORM:g} of "
        "its weight's norm, bf16",
        f"- workload (seed {args.seed}): adapter k of N asked for with probability ~ 1/(k+1)^alpha; prompts "
        f"{INPUT_TOKENS[0]}-{INPUT_TOKENS[1]} tokens of real text, outputs {OUTPUT_TOKENS[0]}-{OUTPUT_TOKENS[1]} "
        f"tokens, uniform; greedy, ignore_eos; arrivals over {args.duration:g} s: Poisson, or gamma gaps with cv "
        f"{BURSTY_CV:g} (bursty); unfinished requests cancelled {args.drain:g} s after the last arrival",
        f"- ours: `ensure_adapter` then `submit`, adapters from the store, max_batch_size {args.max_batch_size}; "
        f"before: `load_adapter` / `unload_adapter` under Ray Serve's multiplexer policy, emulated (LRU of "
        f"{args.lru_adapters}, one load at a time, eviction waits for the adapter's rows); peft: one PeftModel, "
        "`load_adapter` on first use (kept), `set_adapter` + one `generate` per request, one at a time in arrival "
        f"order; run only at rates up to {args.peft_max_rate:g}x",
        f"- calibration per system: {args.unloaded_requests} requests one at a time (adapters resident) give "
        f"TTFT and TPOT p50; SLO {SLO_FACTOR:g}x each; saturation: a closed loop of {args.concurrency} clients, "
        f"{args.saturation_requests} requests (peft: 1 / its unloaded service time); rates are multiples of "
        "the reference system's saturation",
        "- per point: TTFT and TPOT over the requests done; goodput = requests done within both SLOs / arrival "
        "window; cold = waited for its adapter's load (TTFT cold/warm over the requests done); cold requests and "
        "hit rate (warm share) over the requests whose adapter was ready before the cutoff; loads, evictions: the "
        "system's own (ours: the engine's adapter events, into and out of host memory); rows/step, ms/step: the "
        "engine's steps; CPU others: cores busy in other processes (other work skews the figures)",
    ]


def cell(points: Sequence[Point], value: Callable[[Point], float], digits: int = 2) -> str:
    """Median over the rounds, then each round's value."""
    return median_cell([value(p) for p in points], digits)


def calibration_table(results: Results) -> list[str]:
    lines = ["## Calibration (unloaded latency, SLO, saturation)", "",
             "| adapters | system | TTFT p50 s | TPOT p50 ms | SLO: TTFT s | SLO: TPOT ms | saturation req/s "
             "| saturation tok/s | sweep reference |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for group, systems in sorted(results.calibrations.items()):
        for name, c in systems.items():
            lines.append(f"| {group.label()} | {name} | {fmt(c.ttft, 3)} | {fmt(1000 * c.tpot, 1)} "
                         f"| {fmt(c.slo_ttft, 3)} | {fmt(1000 * c.slo_tpot, 1)} | {fmt(c.saturation)} "
                         f"| {fmt(c.saturation_tokens, 1)} | {'yes' if results.reference[group] == name else ''} |")
    return lines


def key_cells(key: PointKey) -> str:
    return f"| {key.group.label()} | {key.arrivals} | {key.multiple:g} | {fmt(key.rate)} "


Column = tuple[str, Callable[[Point], float], int]
"""A column of a point table: heading, the value of one round's Point, digits shown."""

LATENCY_COLUMNS: list[Column] = [
    ("sent", lambda p: p.sent, 0),
    ("done", lambda p: len(p.done), 0),
    ("errors", lambda p: p.errors, 0),
    ("tok/s", lambda p: p.tokens_per_s, 1),
    ("TTFT p50 s", lambda p: p.ttft(50), 3),
    ("TTFT p99 s", lambda p: p.ttft(99), 3),
    ("TPOT p50 ms", lambda p: 1000 * p.tpot(50), 1),
    ("TPOT p99 ms", lambda p: 1000 * p.tpot(99), 1),
    ("goodput req/s", lambda p: p.goodput, 2),
    ("within SLO", lambda p: p.slo_share, 2),
]
ADAPTER_COLUMNS: list[Column] = [
    ("cold requests", lambda p: p.cold, 0),
    ("TTFT cold p50 s", lambda p: p.ttft(50, lambda o: o.cold), 3),
    ("TTFT warm p50 s", lambda p: p.ttft(50, lambda o: not o.cold), 3),
    ("hit rate", lambda p: p.hit_rate, 2),
    ("loads", lambda p: counter(p.result.loads), 0),
    ("evictions", lambda p: counter(p.result.evictions), 0),
    ("rows/step", Point.rows_per_step, 1),
    ("ms/step", Point.ms_per_step, 1),
    ("CPU others", lambda p: p.result.other_cores, 2),
]


def point_table(results: Results, title: str, columns: Sequence[Column]) -> list[str]:
    """One row per offered load and system, a cell per column (median over the rounds, then each)."""
    headings = ["adapters", "arrivals", "x saturation", "rate req/s", "system", *(c[0] for c in columns)]
    lines = [f"## {title}", "", "| " + " | ".join(headings) + " |", "|---|---|---:|---:|---|" + "---:|" * len(columns)]
    for key, systems in sorted(results.points.items()):
        for name, points in systems.items():
            cells = "".join(f"| {cell(points, value, digits)} " for _, value, digits in columns)
            lines.append(f"{key_cells(key)}| {name} {cells}|")
    return lines


def counter(value: int | None) -> float:
    return math.nan if value is None else float(value)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator and not math.isnan(denominator) else math.nan


def ratio_table(results: Results) -> list[str]:
    """Ours against each baseline at every point both ran: goodput ours / theirs, TTFT p99 theirs /
    ours (both above 1 when ours is better); the median of the per-round ratios."""
    lines = ["## Ours against the baselines (above 1: ours better)", "",
             "| adapters | arrivals | x saturation | rate req/s | baseline | goodput ours / baseline "
             "| TTFT p99 baseline / ours | TPOT p99 baseline / ours |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for key, systems in sorted(results.points.items()):
        for name in [s for s in systems if s != "ours" and "ours" in systems]:
            pairs = list(zip(systems["ours"], systems[name]))
            lines.append(
                key_cells(key) + f"| {name} | {median_cell([ratio(o.goodput, b.goodput) for o, b in pairs])} "
                f"| {median_cell([ratio(b.ttft(99), o.ttft(99)) for o, b in pairs])} "
                f"| {median_cell([ratio(b.tpot(99), o.tpot(99)) for o, b in pairs])} |")
    return lines


def report(header: Sequence[str], results: Results) -> str:
    """The whole markdown report."""
    lines = list(header) + [""]
    lines += calibration_table(results) + [""]
    lines += point_table(results, "Latency and goodput", LATENCY_COLUMNS) + [""]
    lines += point_table(results, "Adapters and engine steps", ADAPTER_COLUMNS) + [""]
    lines += ratio_table(results) + [""]
    return "\n".join(lines)


def plot(results: Results, path: Path) -> None:
    """Goodput and TTFT p99 against the offered rate, one line per system (and workload, when several)."""
    series: dict[str, list[tuple[float, float, float]]] = {}
    several = len({(k.group, k.arrivals) for k in results.points}) > 1
    for key, systems in sorted(results.points.items()):
        for name, ps in systems.items():
            label = f"{name} ({key.group.label()}, {key.arrivals})" if several else name
            series.setdefault(label, []).append(
                (key.rate, statistics.median(p.goodput for p in ps), statistics.median(p.ttft(99) for p in ps)))
    rates = sorted({key.rate for key in results.points})
    with figure(path) as (left, right):
        left.plot(rates, rates, linestyle=":", color="grey", label="offered")
        for label, values in series.items():
            xs, goodput, ttft = zip(*values)
            left.plot(xs, goodput, marker="o", label=label)
            right.plot(xs, ttft, marker="o", label=label)
        label_axis(left, f"goodput (TTFT and TPOT within {SLO_FACTOR:g}x unloaded)", "offered requests/s",
                   "requests/s")
        right.set_yscale("log")
        label_axis(right, "TTFT p99 (requests done)", "offered requests/s", "seconds")
