"""bench.serve's report: what was measured where, a table per system, serve's ratios to the
baselines against their targets, and the plot."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.cli import figure, fmt, label_axis, median_cell
from bench.engine import QUESTIONS
from bench.load import LevelResult
from bench.workloads import describe

ENGINE_TARGET = 0.85  # serve / engine tokens/s at the highest concurrency
HF_TARGET = 10.0  # serve / hf-per-request tokens/s at the highest concurrency
TRANSFORMERS_TARGETS = {1: 1.0, 8: 1.3, 32: 1.3}  # serve / transformers-serve tokens/s per concurrency


def header(values: dict[str, Any], args: argparse.Namespace, dtype: str) -> list[str]:
    """Markdown lines describing what was measured where."""
    batch = values.get("batch", {})
    counts = ", ".join(f"{c}: {len(args.plan[c])}" for c in args.concurrency)
    if args.workload == "fixed":
        workload = (f"{args.max_tokens} tokens per request (ignore_eos, temperature 0), {len(QUESTIONS)} short "
                    f"questions in turn")
    else:
        workload = (f"ShareGPT-like spread of lengths (bench/workloads.py; ignore_eos, temperature 0): "
                    f"{describe(args.plan[max(args.concurrency)])} at the highest level")
    return [
        f"# Serve benchmark ({datetime.datetime.now().isoformat(timespec='seconds')})",
        "",
        f"- model: {values.get('model')}, dtype {dtype}, CPU; host {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads in this process",
        f"- workload: closed loop of N clients (N = concurrency), OpenAI streaming chat, {workload}; "
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


def system_table(levels: Sequence[LevelResult], suffix: str = "") -> list[str]:
    """One system's levels as markdown table lines."""
    lines = [
        f"## {levels[0].system}{suffix}",
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


SERVE_RATIOS = (("engine", "serve / engine"), ("hf-per-request", "serve / hf-per-request"),
                ("transformers-serve", "serve / transformers-serve"))


def ratio_table(results: dict[str, list[LevelResult]], levels: Sequence[int]) -> list[str]:
    """tokens/s of serve against each baseline, per concurrency level, and TPOT at concurrency 1."""
    by_level = {name: {lv.concurrency: lv for lv in runs} for name, runs in results.items()}
    lines = [
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


def median_ratio_table(rounds: Sequence[dict[str, list[LevelResult]]], levels: Sequence[int]) -> list[str]:
    """serve's tokens/s over each baseline's, per level: the median of the rounds' ratios (each
    round measured the systems back to back), then each round's ratio."""
    names = [(name, title) for name, title in SERVE_RATIOS if name in rounds[0]]
    lines = [
        f"## Ratios over {len(rounds)} rounds (median, then each round)",
        "",
        "| concurrency | " + " | ".join(title for _, title in names) + " | target (transformers-serve) |",
        "|---:|" + "---:|" * (len(names) + 1),
    ]
    for c in levels:
        cells = []
        for name, _ in names:
            per_round = [ratio(level_of(r, "serve", c), level_of(r, name, c)) for r in rounds]
            cells.append(median_cell(per_round))
        target = TRANSFORMERS_TARGETS.get(c)
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {f'>= {target}' if target else '-'} |")
    return lines


def level_of(results: dict[str, list[LevelResult]], system: str, concurrency: int) -> LevelResult | None:
    """The system's level at that concurrency in one round, if measured."""
    return next((lv for lv in results.get(system, []) if lv.concurrency == concurrency), None)


def tpot_line(by_level: dict[str, dict[int, LevelResult]]) -> str:
    """Time per output token p50 of every system at concurrency 1 (the issue compares serve and
    transformers-serve there)."""
    cells = [f"{name} {fmt(runs[1].tpot(50) * 1000, 1)}" for name, runs in by_level.items() if 1 in runs]
    return "Time per output token p50 at concurrency 1, ms: " + (", ".join(cells) or "not measured") + "."


def report(values: dict[str, Any], args: argparse.Namespace, dtype: str,
           rounds: Sequence[dict[str, list[LevelResult]]], notes: Sequence[str]) -> str:
    """The whole markdown report: every round's tables and ratios, and with several rounds the
    median ratios."""
    lines = header(values, args, dtype) + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    for number, results in enumerate(rounds, start=1):
        suffix = f" (round {number})" if len(rounds) > 1 else ""
        for levels in results.values():
            lines += system_table(levels, suffix) + [""]
        lines += [f"## Ratios (tokens/s){suffix}", ""] + ratio_table(results, args.concurrency) + [""]
    if len(rounds) > 1:
        lines += median_ratio_table(rounds, args.concurrency) + [""]
    return "\n".join(lines)


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
