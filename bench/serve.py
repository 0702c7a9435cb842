"""Benchmark the Ray Serve application over HTTP against two baselines, all in one run.

A closed loop of N clients (N = each concurrency level) sends OpenAI streaming chat
requests (`stream: true`, `ignore_eos: true`, `temperature: 0`, fixed `max_tokens`), one
after another, from a fixed list of varied short questions, for a fixed number of requests
per level. The systems are measured one after the other (never at the same time):

1. serve: the real application (deployments/app.py) in a private local Ray instance,
   with the args of serve_config.yaml (a few overridable from the command line).
2. engine: the same engine in this process, called directly (engine.chat_request +
   engine.submit) by the same closed-loop clients: what Serve costs.
3. hf-per-request: a small FastAPI app on uvicorn in a background thread, same route and
   SSE shape, that runs ONE Hugging Face `generate` per request, one request at a time
   (a one-worker executor: a FIFO lock), streaming each token as it is generated: the
   seed REST API's way of serving, given streaming so TTFT is not simply its latency.
4. transformers-serve: `transformers serve --continuous-batching` (a subprocess, see
   bench/systems.py) on the same checkpoint, dtype and device: the reference continuous
   batching server of the transformers library.

    python -m bench.serve                                  # full run (minutes on 2 CPU cores)
    python -m bench.serve --quick --plot /tmp/serve.png    # seconds of work, to check the script
    python -m bench.serve --output bench/serve-results.md --plot bench/serve.png
    python -m bench.serve --quick --systems transformers-serve serve   # some systems only
    python -m bench.serve --workload spread --systems serve transformers-serve   # ShareGPT-like lengths

Workloads (bench/workloads.py): `fixed` (short questions, every reply exactly --max-tokens) and
`spread` (log-normal prompt and reply lengths with medians --prompt-median / --reply-median).

Results go to stdout as markdown tables (and to --output if given), the plot to --plot;
progress goes to logging.
"""

# This file is the command line; the work is split by job: bench/load.py (closed-loop
# clients, per-level measurement), bench/serve_systems.py (the systems under test, with
# bench/hf_per_request.py and bench/systems.py), bench/serve_report.py (tables, ratios, plot).

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

from bench.cli import (
    add_report_options,
    add_rounds_option,
    add_system_options,
    fmt,
    parse_with_quick,
    publish,
    round_orders,
    setup_logging,
)
from bench.chat import load_tokenizer
from bench.load import MIN_REQUESTS, WAVES, LevelResult, requests_per_level
from bench.serve_report import plot, report
from bench.serve_systems import (
    measure_engine,
    measure_engine_beside_idle_serve,
    measure_hf,
    measure_serve,
    measure_transformers_serve,
)
from bench.systems import SERVE_CONFIG, config_app_args
from bench.workloads import WorkRequest, fixed_requests, spread_requests
from deployments.contract.settings import AppArgs
from engine.loader import resolve_device, resolve_dtype

SYSTEMS = ("serve", "engine", "hf-per-request", "engine-beside-idle-serve", "transformers-serve")
FULL_DEFAULTS = {"concurrency": [1, 8, 32], "requests": None, "max_tokens": 64, "prompt_median": 128,
                 "reply_median": 48}
QUICK_DEFAULTS = {"concurrency": [1, 4], "requests": 4, "max_tokens": 16, "prompt_median": 32, "reply_median": 8}


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; workload sizes default to FULL_DEFAULTS."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (explicit options still win)")
    p.add_argument("--concurrency", type=int, nargs="+", help="closed-loop client counts (levels)")
    p.add_argument("--requests", type=int,
                   help=f"requests per level (default: max({WAVES} x concurrency, {MIN_REQUESTS}))")
    p.add_argument("--max-tokens", type=int, help="fixed workload: new tokens per request (ignore_eos)")
    p.add_argument("--workload", choices=("fixed", "spread"), default="fixed",
                   help="fixed: short questions, --max-tokens each; spread: log-normal lengths (ShareGPT-like)")
    p.add_argument("--prompt-median", type=int, help="spread workload: median prompt tokens")
    p.add_argument("--reply-median", type=int, help="spread workload: median reply tokens (ignore_eos)")
    p.add_argument("--length-sigma", type=float, default=0.9,
                   help="spread workload: log-normal sigma of both lengths (0: every request at the medians)")
    add_system_options(p, SYSTEMS, SERVE_CONFIG, timeout_s=1800.0)
    p.add_argument("--max-batch-size", type=int, default=32, help="engine rows (serve and engine)")
    p.add_argument("--batch-size", type=int, help="serve: @serve.batch admission group size")
    p.add_argument("--stream-interval-s", type=float, help="serve: least time between two messages of a stream")
    p.add_argument("--num-cpus", type=float, help="serve: CPUs reserved for the LLM replica")
    add_rounds_option(p)
    add_report_options(p, "PNG plot of tokens/s and TTFT p50 against concurrency (the first round)")
    p.set_defaults(**FULL_DEFAULTS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse options; --quick swaps in QUICK_DEFAULTS under any explicitly given option."""
    parser = build_parser()
    args = parse_with_quick(parser, argv, QUICK_DEFAULTS)
    if min(args.concurrency, default=0) < 1 or min(args.max_tokens, args.rounds) < 1 or (
            args.requests is not None and args.requests < 1):
        parser.error("concurrency levels, --requests, --max-tokens and --rounds must be positive")
    args.concurrency = sorted(set(args.concurrency))
    return args


def app_args(args: argparse.Namespace) -> dict[str, Any]:
    """The serve config's application args with the command-line overrides applied."""
    values = config_app_args(args.config)
    values["max_batch_size"] = args.max_batch_size
    batch = dict(values.get("batch") or {})
    if args.batch_size is not None:
        batch["batch_size"] = args.batch_size
    if args.stream_interval_s is not None:
        batch["stream_interval_s"] = args.stream_interval_s
    values["batch"] = batch
    if args.num_cpus is not None:
        values["num_cpus"] = args.num_cpus
    return values


def level_plan(args: argparse.Namespace, values: dict[str, Any]) -> dict[int, list[WorkRequest]]:
    """Each concurrency level's request list (the same for every system and round)."""
    counts = {c: requests_per_level(args, c) for c in args.concurrency}
    if args.workload == "fixed":
        return {c: fixed_requests(count, args.max_tokens) for c, count in counts.items()}
    tokenizer = load_tokenizer(values)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return {c: spread_requests(count, args.prompt_median, args.reply_median, count_tokens, sigma=args.length_sigma)
            for c, count in counts.items()}


def run(args: argparse.Namespace) -> str:
    """Measure the chosen systems one after the other, `--rounds` times; return the markdown report."""
    values = app_args(args)
    args.plan = level_plan(args, values)  # read by bench.load.run_levels
    config = AppArgs.model_validate(values).engine_config()
    dtype = str(resolve_dtype(config.dtype, resolve_device(config.device))).removeprefix("torch.")
    rounds: list[dict[str, list[LevelResult]]] = []
    notes: list[str] = []
    for number, order in enumerate(round_orders(args.systems, args.rounds), start=1):
        measured = {system: measure(system, values, args, notes) for system in order}
        if args.rounds > 1:
            notes.append(f"round {number}: {', '.join(order)}")
        rounds.append({system: measured[system] for system in args.systems})
    if args.plot:
        plot(rounds[0], args.plot)
    return report(values, args, dtype, rounds, notes)


def measure(system: str, values: dict[str, Any], args: argparse.Namespace, notes: list[str]) -> list[LevelResult]:
    """One system's levels (its setup and teardown included)."""
    if system == "serve":
        levels = measure_serve(values, args, notes)
        per_level = ", ".join(f"c={lv.concurrency}: {fmt(lv.chunks_per_token)}" for lv in levels)
        notes.append(f"serve: Ray messages per generated token (SSE content chunks / tokens): {per_level}")
        return levels
    if system == "engine":
        return asyncio.run(measure_engine(values, args))
    if system == "engine-beside-idle-serve":
        return measure_engine_beside_idle_serve(values, args)
    if system == "transformers-serve":
        return measure_transformers_serve(values, args, notes)
    return measure_hf(values, args)


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    args = parse_args(argv)
    publish(run(args), args.output)


if __name__ == "__main__":
    main()
