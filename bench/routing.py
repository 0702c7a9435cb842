"""Conversation routing against Serve's default router: bench/chat.py's multi-turn chat workload
on two LLM replicas.

The same users and messages as `python -m bench.chat` (every turn re-sends the whole
conversation), against our application with `num_replicas: 2`, once with Serve's default
router (PowerOfTwoChoicesRequestRouter: the less loaded of two random replicas) and once with
ours (deployments/routing/router.py), each in a fresh private local Ray. Measured per router: the
prefix-cache hit rate over both replicas (`prefix_cache_hits / prefix_cache_queries` of their
engine stats, in prompt tokens, during the users' turns) and TTFT p50 per turn. Each replica
reserves one CPU (one torch thread): on this 2-core machine the two replicas share the cores,
so compare hit rates and TTFT, not throughput.

    python -m bench.routing                       # 4 users x 8 turns, both routers
    python -m bench.routing --quick               # 2 users x 3 turns, to check the script
    python -m bench.routing --rounds 3 --output /tmp/routing.md
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.serve.config import RequestRouterConfig

from bench.chat import (
    FULL_DEFAULTS,
    QUICK_DEFAULTS,
    Workload,
    add_workload_options,
    load_tokenizer,
    run_chats,
)
from bench.chat_results import SystemRun, system_table
from bench.cli import (
    add_rounds_option,
    median_cell,
    parse_with_quick,
    publish,
    round_orders,
    setup_logging,
)
from bench.percentiles import safe_percentile
from bench.systems import SERVE_CONFIG, config_app_args, our_endpoint
from deployments.app import conversation_routing
from deployments.contract.settings import AppArgs
from deployments.local import every_replica_diagnostics, local_app, local_ray

log = logging.getLogger("bench.routing")

ROUTERS = ("default", "conversation")
REPLICAS = 2


@dataclass(frozen=True)
class PrefixCounters:
    """Prefix-cache counters summed over every replica (read like one engine's stats)."""

    prefix_cache_queries: int
    prefix_cache_hits: int


async def summed_counters() -> PrefixCounters | None:
    """Both replicas' prefix-cache counters, summed; None unless every replica answered."""
    answers = await every_replica_diagnostics(REPLICAS)
    if len(answers) < REPLICAS:
        log.warning("only %d of %d replicas answered diagnostics()", len(answers), REPLICAS)
        return None
    stats = [a["stats"] for a in answers.values()]
    return PrefixCounters(sum(s.prefix_cache_queries for s in stats), sum(s.prefix_cache_hits for s in stats))


def llm_options(router: str, values: dict[str, Any]) -> dict[str, Any]:
    """Two fixed replicas, with Serve's default router or ours."""
    config = RequestRouterConfig() if router == "default" else conversation_routing(AppArgs.model_validate(values))
    return {"num_replicas": REPLICAS, "request_router_config": config}


def run_router(router: str, values: dict[str, Any], workload: Workload, args: argparse.Namespace) -> SystemRun:
    """Every user's conversation against two replicas routed by `router`, in a fresh local Ray."""
    log.info("%s router: starting Ray and the application with %d replicas", router, REPLICAS)
    with local_ray(num_cpus=2, log_to_driver=args.ray_logs), \
            local_app(values, healthy_timeout_s=180, llm_options=llm_options(router, values)) as url:
        run = asyncio.run(run_chats(our_endpoint(url, values), router, workload, args, summed_counters))
    log.info("%s router: %s; TTFT p50 of turns %d-%d %.3f s", router,
             run.prefix_cache.describe() if run.prefix_cache else "no prefix-cache counters",
             args.turns // 2 + 1, args.turns, late_ttft(run, args.turns))
    return run


def hit_rate(run: SystemRun) -> float:
    cache = run.prefix_cache
    return cache.hits / cache.queries if cache and cache.queries else math.nan


def late_ttft(run: SystemRun, turns: int) -> float:
    """TTFT p50 over the users' turns in the second half of the conversations."""
    return safe_percentile([t.result.ttft for t in run.turns if t.turn >= turns // 2 and t.result.error is None
                            and t.result.ttft is not None], 50)


def summary(rounds: Sequence[dict[str, SystemRun]], turns: int) -> list[str]:
    """Hit rate and late-turn TTFT per router (median over rounds, then each round)."""
    lines = ["## Routers compared" + (f" over {len(rounds)} rounds (median, then each round)" if len(rounds) > 1
                                      else ""), "",
             f"| router | prefix-cache hit rate | TTFT p50 turn {turns} s | TTFT p50 turns {turns // 2 + 1}-{turns} s |",
             "|---|---:|---:|---:|"]
    for router in rounds[0]:
        runs = [r[router] for r in rounds]
        lines.append(f"| {router} | {median_cell([hit_rate(r) for r in runs])} "
                     f"| {median_cell([r.ttft(turns - 1, 50) for r in runs])} "
                     f"| {median_cell([late_ttft(r, turns) for r in runs])} |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_options(p)
    p.add_argument("--routers", nargs="+", choices=ROUTERS, default=list(ROUTERS), help="in this order")
    p.add_argument("--config", type=Path, default=SERVE_CONFIG, help="serve config whose first app's args are used")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--ray-logs", action="store_true", help="show the Ray workers' logs")
    add_rounds_option(p)
    p.add_argument("--output", type=Path, help="also write the report as markdown to this file")
    p.set_defaults(**FULL_DEFAULTS)
    return p


def run(args: argparse.Namespace) -> str:
    values = config_app_args(args.config) | {"num_cpus": 1}  # two replicas share the two cores
    workload = Workload.build(load_tokenizer(values), args.users, args.turns, args.message_tokens, args.workload)
    rounds = []
    for order in round_orders(args.routers, args.rounds):
        runs = {router: run_router(router, values, workload, args) for router in order}
        rounds.append({router: runs[router] for router in args.routers})
    lines = [f"# Conversation routing on {REPLICAS} replicas", "",
             f"- {args.users} users x {args.turns} turns, new messages of about {args.message_tokens} tokens, "
             f"replies up to {args.max_tokens} tokens; args of {args.config.name} with num_cpus 1 per replica "
             f"(both replicas share this machine's 2 cores)", ""]
    for number, runs in enumerate(rounds, start=1):
        for run_ in runs.values():
            lines += system_table(run_, args.turns, f" router (round {number})") + [""]
    lines += summary(rounds, args.turns)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    args = parse_with_quick(build_parser(), argv, QUICK_DEFAULTS)
    publish(run(args), args.output)


if __name__ == "__main__":
    main()
