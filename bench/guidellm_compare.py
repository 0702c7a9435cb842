"""Ours against `transformers serve`, measured by a standard load generator (guidellm), in one run.

For each round the systems run one after the other (the order alternates between rounds):
each is started (bench/systems.py), put behind a relay (bench/relay.py: guidellm's
`ignore_eos` becomes transformers serve's own spelling; ours passes through unchanged, so both
pay the same extra hop), and guidellm runs one concurrent profile per level (`streams = c`)
for a fixed request count, on its synthetic text: fixed lengths, or a spread of lengths
(--spread: normal with stdev half the mean, clipped to [mean/4, 4 x mean]; guidellm has no
log-normal). The report gives tokens/s (output tokens / measured time) and TTFT p50 per level,
and ours / transformers serve per round.

    python -m bench.guidellm_compare --concurrency 8 --rounds 2
    python -m bench.guidellm_compare --spread --output bench/guidellm-results.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.cli import add_rounds_option, fmt, publish, round_orders, setup_logging
from bench.load import EngineSteps
from bench.process_cpu import RoleSnapshot
from bench.relay import relay
from bench.systems import DIAGNOSTICS_TIMEOUT_S, SERVE_CONFIG, TransformersServe, config_app_args, serve_app, transformers_serve
from deployments.local import llm_handle
from deployments.contract.settings import AppArgs
from engine.core import EngineStats

log = logging.getLogger("bench.guidellm")
SYSTEMS = ("serve", "transformers-serve")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
GUIDELLM_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Level:
    """One guidellm benchmark: a system at one concurrency, with where the cores went."""

    system: str
    concurrency: int
    requests: int
    errors: int
    tokens_per_s: float
    ttft_p50_ms: float
    cores: dict[str, float] = field(default_factory=dict)  # per role during the run (bench/process_cpu.py)
    wall: float = 0.0  # seconds the run took, guidellm's start-up included
    steps: EngineSteps | None = None  # the LLM replica's steps during the run (ours only)


def data_spec(args: argparse.Namespace) -> str:
    """guidellm's synthetic data: fixed lengths, or normal spreads around them."""
    spec = f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}"
    if args.spread:
        for name, mean in (("prompt_tokens", args.prompt_tokens), ("output_tokens", args.output_tokens)):
            spec += f",{name}_stdev={mean // 2},{name}_min={max(mean // 4, 1)},{name}_max={4 * mean}"
    return spec


def run_guidellm(url: str, model: str, tokenizer: str, concurrency: int, args: argparse.Namespace,
                 engine_stats: Callable[[], EngineStats] | None = None) -> Level:
    """One concurrent profile of `args.requests_per_stream x concurrency` requests; its summary,
    the cores each role used meanwhile and, given `engine_stats`, the replica's steps."""
    stats_before, cpu_before, start = engine_stats() if engine_stats else None, RoleSnapshot.take(), time.monotonic()
    level = _guidellm(url, model, tokenizer, concurrency, args)
    wall = time.monotonic() - start
    steps = EngineSteps.between(stats_before, engine_stats()) if stats_before is not None else None
    return replace(level, cores=RoleSnapshot.take().cores_since(cpu_before, wall), wall=wall, steps=steps)


def _guidellm(url: str, model: str, tokenizer: str, concurrency: int, args: argparse.Namespace) -> Level:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        command = [
            sys.executable, "-m", "guidellm", "run",
            "--backend", f"kind=openai_http,target={url},model={model}",
            "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
            "--data", data_spec(args),
            "--profile", f"kind=concurrent,streams={concurrency}",
            "--constraint", f"kind=max_requests,count={args.requests_per_stream * concurrency}",
            "--output", f"kind=json,path={report}", "--disable-console-interactive",
        ]
        run = subprocess.run(command, capture_output=True, text=True, timeout=GUIDELLM_TIMEOUT_S,
                             env={**os.environ, **OFFLINE})
        if run.returncode != 0:
            raise RuntimeError(f"guidellm failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        return summarize(json.loads(report.read_text())["benchmarks"][0], concurrency)


def summarize(benchmark: dict[str, Any], concurrency: int) -> Level:
    """Tokens/s over the measured span and TTFT p50, from guidellm's JSON benchmark."""
    metrics, scheduler = benchmark["metrics"], benchmark["scheduler_metrics"]
    seconds = scheduler["measure_end_time"] - scheduler["measure_start_time"]
    totals = metrics["request_totals"]
    tokens = metrics["output_token_count"]["successful"]["total_sum"]
    return Level("", concurrency, totals["successful"], totals["errored"], tokens / seconds,
                 metrics["time_to_first_token_ms"]["successful"]["median"])


def measure(system: str, values: dict[str, Any], args: argparse.Namespace) -> list[Level]:
    """Start `system`, run every level through a relay, stop it."""
    spec = TransformersServe.of(values)
    tokenizer = spec.model  # the converted checkpoint folder: the same tokenizer for both
    if system == "serve":
        model = AppArgs.model_validate(values).model_name
        with serve_app(values, ray_logs=False) as url, relay(url, rewrite=False) as relayed:
            return levels(system, relayed, model, tokenizer, args, replica_stats)
    with transformers_serve(spec) as endpoint, relay(endpoint.url, rewrite=True) as relayed:
        return levels(system, relayed, spec.model, tokenizer, args)


def replica_stats() -> EngineStats:
    """The LLM replica's engine stats (inside `serve_app`)."""
    return llm_handle().diagnostics.remote().result(timeout_s=DIAGNOSTICS_TIMEOUT_S)["stats"]


def levels(system: str, url: str, model: str, tokenizer: str, args: argparse.Namespace,
           engine_stats: Callable[[], EngineStats] | None = None) -> list[Level]:
    """A short untimed warm-up, then every level."""
    _guidellm(url, model, tokenizer, 1, argparse.Namespace(**{**vars(args), "requests_per_stream": 2}))
    results = []
    for concurrency in args.concurrency:
        level = run_guidellm(url, model, tokenizer, concurrency, args, engine_stats)
        log.info("%s c=%d: %.1f tok/s, TTFT p50 %.0f ms, %d errors", system, concurrency, level.tokens_per_s,
                 level.ttft_p50_ms, level.errors)
        results.append(replace(level, system=system))
    return results


def report(rounds: Sequence[dict[str, list[Level]]], args: argparse.Namespace) -> str:
    """A table per round: each system's levels, and ours / transformers serve."""
    lines = [f"# guidellm: serve vs transformers-serve ({data_spec(args)}, {args.requests_per_stream} requests "
             f"per stream, concurrent profile)", ""]
    for number, measured in enumerate(rounds, start=1):
        lines += [f"## Round {number}", "", "| system | c | requests | errors | tok/s | TTFT p50 ms |",
                  "|---|---:|---:|---:|---:|---:|"]
        for system, results in measured.items():
            lines += [f"| {system} | {lv.concurrency} | {lv.requests} | {lv.errors} | {fmt(lv.tokens_per_s, 1)} "
                      f"| {fmt(lv.ttft_p50_ms, 0)} |" for lv in results]
        if set(SYSTEMS) <= set(measured):
            lines += ["", "| c | tok/s ours / transformers serve | TTFT p50 ours / transformers serve |",
                      "|---:|---:|---:|"]
            for ours, theirs in zip(measured["serve"], measured["transformers-serve"]):
                lines.append(f"| {ours.concurrency} | {fmt(ours.tokens_per_s / theirs.tokens_per_s)} "
                             f"| {fmt(ours.ttft_p50_ms / theirs.ttft_p50_ms)} |")
        lines += ["", *where_cores_went(measured)]
    return "\n".join(lines)


def where_cores_went(measured: dict[str, list[Level]]) -> list[str]:
    """Cores per role during each level, and our replica's steps."""
    lines = ["| system | c | cores by role | engine steps | rows/step | ms/step | engine busy |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for system, results in measured.items():
        for lv in results:
            cores = ", ".join(f"{role} {value:.2f}" for role, value in sorted(lv.cores.items(), key=lambda kv: -kv[1]))
            steps = lv.steps.cells(lv.wall) if lv.steps else "| - | - | - | - "
            lines.append(f"| {system} | {lv.concurrency} | {cores} {steps}|")
    return [*lines, ""]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-stream", type=int, default=4, help="requests per level = this x concurrency")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--spread", action="store_true", help="normal spreads of both lengths instead of fixed ones")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--config", type=Path, default=SERVE_CONFIG)
    p.add_argument("--output", type=Path)
    add_rounds_option(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    args = parse_args(argv)
    values = config_app_args(args.config)
    rounds = [{system: measure(system, values, args) for system in order}
              for order in round_orders(args.systems, args.rounds)]
    publish(report(rounds, args), args.output)


if __name__ == "__main__":
    main()
