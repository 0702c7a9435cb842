"""Multi-turn chat benchmark: time to first token per turn as conversations grow, over HTTP.

U users chat at once (default 4), each for T turns (default 8). Every turn re-sends the
whole conversation: the system prompt, the user's earlier messages and the assistant's
actual earlier replies, plus a new user message of about M tokens (default 280; sentences of
a fixed corpus in an order of its own per user and turn, see bench/chat_text.py: users share
no prefix beyond the system prompt). Requests stream, greedy (temperature 0), at most
--max-tokens tokens (default 64; replies end at EOS or there). Measured per turn and user:
TTFT (request sent -> first content chunk), prompt tokens (the server's usage, else our
tokenizer's count of the chat template) and, where the server reports them
(`usage.prompt_tokens_details.cached_tokens`), the prompt tokens found in its prefix cache.
`--workload shared-prefix` is issue #25's: every message repeats one background text.

Systems, one after the other, each after one untimed warm-up request:

1. serve: our Ray Serve application, started as bench.serve starts it (bench/systems.py),
   with the args of serve_config.yaml. The LLM replica's prefix-cache counters
   (`prefix_cache_queries` / `prefix_cache_hits` of its engine stats, in tokens) are read
   before and after the users' turns when the engine has them.
2. transformers-serve: `transformers serve --continuous-batching` on the same checkpoint,
   dtype and device (bench/systems.py).

    python -m bench.chat                                   # full run: 4 users x 8 turns
    python -m bench.chat --quick --plot /tmp/chat.png      # 1-2 minutes, to check the script
    python -m bench.chat --output bench/chat-results.md --plot bench/chat.png

The report (markdown tables per system and the ratios against the targets) goes to stdout
and --output, the plot of TTFT and prompt tokens per turn to --plot; progress to logging.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import math
import platform
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bench.chat_text import SHARED_SYSTEM_PROMPT, SYSTEM_PROMPT, shared_message
from bench.chat_text import user_message as corpus_message
from bench.cli import (
    add_report_options,
    add_rounds_option,
    add_system_options,
    figure,
    fmt,
    label_axis,
    median_cell,
    parse_with_quick,
    publish,
    round_orders,
    setup_logging,
)
from bench.client import Endpoint, RequestResult, measure, stream_chat
from bench.cpu import CpuSnapshot
from bench.percentiles import safe_percentile
from bench.systems import (
    SERVE_CONFIG,
    TransformersServe,
    config_app_args,
    diagnostics,
    our_endpoint,
    serve_app,
    transformers_serve,
)
from client.bodies import user_message
from deployments.contract.settings import AppArgs
from deployments.local import llm_handle
from engine.loader import resolve_checkpoint

log = logging.getLogger("bench.chat")

SYSTEMS = ("serve", "transformers-serve")
FULL_DEFAULTS = {"users": 4, "turns": 8, "message_tokens": 280, "max_tokens": 64}
QUICK_DEFAULTS = {"users": 2, "turns": 3, "message_tokens": 120, "max_tokens": 24}
VS_TRANSFORMERS_TARGET = 0.3  # serve / transformers-serve TTFT p50 at the last turn: at most
LAST_VS_FIRST_TARGET = 1.5  # serve's TTFT p50 at the last turn / at the first: at most (issue #25)
WARMUP_TOKENS = 8
MAX_LOGGED_ERRORS = 3

WORKLOADS = {"corpus": (corpus_message, SYSTEM_PROMPT), "shared-prefix": (shared_message, SHARED_SYSTEM_PROMPT)}

StatsReader = Callable[[], Awaitable[Any | None]]
"""Reads a system's engine stats (an object with optional prefix_cache_* fields), or None."""


@dataclass(frozen=True)
class Turn:
    """One user's turn as the client measured it."""

    user: int
    turn: int  # from 0
    result: RequestResult
    prompt_tokens: int  # the server's usage count, else our tokenizer's


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


@dataclass(frozen=True)
class Workload:
    """The conversations: every user message, and how to count a chat's prompt tokens."""

    messages: tuple[tuple[str, ...], ...]  # [user][turn]
    tokenizer: PreTrainedTokenizerBase
    system_prompt: str = SYSTEM_PROMPT
    kind: str = "corpus"

    @classmethod
    def build(cls, tokenizer: PreTrainedTokenizerBase, users: int, turns: int, message_tokens: int,
              kind: str = "corpus") -> Workload:
        """`kind` "corpus": messages of their own per user and turn; "shared-prefix": the same
        background text in every message, then a line naming the user and turn (chat_text.py)."""
        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        message, system = WORKLOADS[kind]
        return cls(tuple(tuple(message(u, t, message_tokens, count) for t in range(turns))
                         for u in range(users)), tokenizer, system, kind)

    def describe(self) -> str:
        """The messages, for the report header."""
        sizes = self.message_tokens()
        if self.kind == "shared-prefix":
            return (f"a new user message of {min(sizes)}-{max(sizes)} tokens: the same background text in every "
                    "message of every user, then a line naming the user and turn (users share a long prefix); "
                    f"system prompt \"{self.system_prompt}\"")
        return (f"a new user message of {min(sizes)}-{max(sizes)} tokens (corpus sentences in an order of its own "
                "per user and turn: no shared prefix across users beyond the system prompt)")

    def prompt_tokens(self, chat: Sequence[dict[str, str]]) -> int:
        """Tokens of the chat as the model's chat template renders it, ready for the reply."""
        text = self.tokenizer.apply_chat_template(list(chat), add_generation_prompt=True, tokenize=False)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def message_tokens(self) -> list[int]:
        """Token count of every user message."""
        return [len(self.tokenizer(m, add_special_tokens=False)["input_ids"]) for row in self.messages for m in row]


# ----- command line ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; workload sizes default to FULL_DEFAULTS."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_options(p)
    add_system_options(p, SYSTEMS, SERVE_CONFIG, timeout_s=600.0)
    add_rounds_option(p)
    add_report_options(p, "PNG plot of TTFT p50 and prompt tokens per turn (the first round)")
    p.set_defaults(**FULL_DEFAULTS)
    return p


def add_workload_options(p: argparse.ArgumentParser) -> None:
    """--quick, --workload, --users, --turns, --message-tokens, --max-tokens (bench.routing uses them too)."""
    p.add_argument("--quick", action="store_true", help="tiny sizes (explicit options still win)")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="corpus",
                   help="corpus: messages of their own per user; shared-prefix: one background text in every message")
    p.add_argument("--users", type=int, help="users chatting at once")
    p.add_argument("--turns", type=int, help="turns per user")
    p.add_argument("--message-tokens", type=int, help="about this many tokens in each new user message")
    p.add_argument("--max-tokens", type=int, help="reply tokens at most (replies end at EOS or there)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse options; --quick swaps in QUICK_DEFAULTS under any explicitly given option."""
    parser = build_parser()
    args = parse_with_quick(parser, argv, QUICK_DEFAULTS)
    if min(args.users, args.turns, args.message_tokens, args.max_tokens, args.rounds) < 1:
        parser.error("--users, --turns, --message-tokens, --max-tokens and --rounds must be positive")
    return args


# ----- the conversations ----------------------------------------------------------------------


async def chat_user(client: httpx.AsyncClient, endpoint: Endpoint, system: str, workload: Workload, user: int,
                    max_tokens: int) -> list[Turn]:
    """One user's turns in order, each sending the whole conversation so far; a failed turn ends the chat."""
    # A plain list, not client/conversation.py's Conversation: an empty reply is sent back as an
    # empty assistant message, and a Conversation cannot hold one (its "" reply means "not yet").
    chat = [{"role": "system", "content": workload.system_prompt}]
    turns: list[Turn] = []
    for turn, message in enumerate(workload.messages[user]):
        chat.append({"role": "user", "content": message})
        result = await measure(stream_chat(client, endpoint, chat, max_tokens, ignore_eos=False))
        prompt_tokens = result.prompt_tokens if result.prompt_tokens is not None else workload.prompt_tokens(chat)
        turns.append(Turn(user, turn, result, prompt_tokens))
        log.info("%s user %d turn %d: TTFT %s s, %d prompt tokens, %d reply tokens%s", system, user + 1,
                 turn + 1, fmt(result.ttft, 3), prompt_tokens, result.tokens,
                 f", failed: {result.error}" if result.error else "")
        if result.error:
            break
        chat.append({"role": "assistant", "content": result.text})
    return turns


async def warm_up(client: httpx.AsyncClient, endpoint: Endpoint) -> None:
    """One short untimed request (transformers serve sets up its batching on the first one)."""
    result = await measure(stream_chat(client, endpoint, user_message("Say hello."), WARMUP_TOKENS, ignore_eos=False))
    if result.error:
        raise RuntimeError(f"warm-up request failed: {result.error}")


async def run_chats(endpoint: Endpoint, system: str, workload: Workload, args: argparse.Namespace,
                    read_stats: StatsReader | None = None) -> SystemRun:
    """Warm up, then every user's conversation at once; prefix-cache growth when `read_stats` has it."""
    users = len(workload.messages)
    async with endpoint.client(users + 1, args.timeout) as client:
        log.info("%s: warming up", system)
        await warm_up(client, endpoint)
        before = await read_stats() if read_stats else None
        log.info("%s: %d users x %d turns", system, users, args.turns)
        cpu = CpuSnapshot.take()
        start = time.perf_counter()
        per_user = await asyncio.gather(*(chat_user(client, endpoint, system, workload, u, args.max_tokens)
                                          for u in range(users)))
        wall = time.perf_counter() - start
        own, other = CpuSnapshot.take().cores_since(cpu, wall)
        after = await read_stats() if read_stats else None
    turns = tuple(t for user_turns in per_user for t in user_turns)
    for turn in [t for t in turns if t.result.error][:MAX_LOGGED_ERRORS]:
        log.warning("%s user %d turn %d failed: %s", system, turn.user + 1, turn.turn + 1, turn.result.error)
    cache = PrefixCache.between(before, after) if before is not None and after is not None else None
    return SystemRun(system, turns, wall, own, other, cache)


# ----- systems --------------------------------------------------------------------------------


async def replica_stats() -> Any | None:
    """Our LLM replica's engine stats (inside serve_app), or None when they cannot be read."""
    try:
        return (await diagnostics(llm_handle()))["stats"]
    except Exception as err:  # a diagnostic only
        log.warning("could not read the LLM replica's stats: %s", err)
        return None


def run_serve(values: dict[str, Any], workload: Workload, args: argparse.Namespace) -> SystemRun:
    """Our application in a private local Ray, as bench.serve runs it."""
    log.info("serve: starting Ray and the application")
    with serve_app(values, args.ray_logs, args.ray_worker_niceness) as url:
        return asyncio.run(run_chats(our_endpoint(url, values), "serve", workload, args, replica_stats))


def run_transformers_serve(spec: TransformersServe, workload: Workload, args: argparse.Namespace) -> SystemRun:
    """transformers serve --continuous-batching on the same checkpoint, stopped afterwards."""
    with transformers_serve(spec) as endpoint:
        return asyncio.run(run_chats(endpoint, "transformers-serve", workload, args))


def load_tokenizer(values: dict[str, Any]) -> PreTrainedTokenizerBase:
    """The tokenizer of the app's model, from the checkpoint our loader resolves."""
    config = AppArgs.model_validate(values).engine_config()
    source, gguf_file = resolve_checkpoint(config.model, config.cache_dir)
    return AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))


# ----- report ---------------------------------------------------------------------------------


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when either is missing or the denominator is 0."""
    return numerator / denominator if denominator and not math.isnan(denominator) else math.nan


def header(values: dict[str, Any], args: argparse.Namespace, workload: Workload, spec: TransformersServe) -> list[str]:
    """Markdown lines describing what was measured where."""
    return [
        f"# Multi-turn chat benchmark ({datetime.datetime.now().isoformat(timespec='seconds')})",
        "",
        f"- model: {values.get('model')}, dtype {spec.dtype}, {spec.device}; host "
        f"{platform.processor() or platform.machine()}",
        f"- workload: {args.users} users at once, {args.turns} turns each; every turn sends the system prompt, "
        f"the whole history (earlier user messages and the assistant's actual replies) and "
        f"{workload.describe()}; streaming, temperature 0, max_tokens {args.max_tokens} "
        "(replies end at EOS or there); one untimed warm-up request per system",
        "- TTFT: request sent -> first content chunk, p50 and max over the users; prompt and reply tokens: the "
        "server's usage counts (our tokenizer's count of the chat template when absent), mean over the users",
        f"- serve: args of {args.config.name} (max_batch_size {values.get('max_batch_size')}), a private local Ray "
        "(2 CPUs), client in this process",
        f"- transformers-serve: `{' '.join(spec.command('PORT'))}` with HF_HUB_OFFLINE=1, a subprocess",
    ]


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
    return lines


def ratio_table(rounds: Sequence[dict[str, SystemRun]], turns: int) -> list[str]:
    """The issue's targets: serve against transformers-serve at the last turn, serve's last turn
    against its first; transformers-serve's own growth for reference. With several rounds, the
    median of the rounds' ratios, then each round's."""
    last = turns - 1
    rows = [
        (f"serve / transformers-serve, TTFT p50 at turn {turns}",
         lambda runs: ratio(runs["serve"].ttft(last, 50), runs["transformers-serve"].ttft(last, 50)),
         ("serve", "transformers-serve"), f"<= {VS_TRANSFORMERS_TARGET}"),
        (f"serve, TTFT p50 turn {turns} / turn 1",
         lambda runs: ratio(runs["serve"].ttft(last, 50), runs["serve"].ttft(0, 50)),
         ("serve",), f"<= {LAST_VS_FIRST_TARGET:g}"),
        (f"transformers-serve, TTFT p50 turn {turns} / turn 1",
         lambda runs: ratio(runs["transformers-serve"].ttft(last, 50), runs["transformers-serve"].ttft(0, 50)),
         ("transformers-serve",), "-"),
    ]
    title = "## Ratios" + (f" over {len(rounds)} rounds (median, then each round)" if len(rounds) > 1 else "")
    lines = [title, "", "| ratio | value | target |", "|---|---:|---:|"]
    for name, value, needs, target in rows:
        per_round = [value(runs) if all(n in runs for n in needs) else math.nan for runs in rounds]
        lines.append(f"| {name} | {median_cell(per_round)} | {target} |")
    return lines


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


# ----- main -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> str:
    """Build the conversations, run them on each chosen system in turn; return the markdown report."""
    values = config_app_args(args.config)
    spec = TransformersServe.of(values)
    workload = Workload.build(load_tokenizer(values), args.users, args.turns, args.message_tokens, args.workload)
    rounds: list[dict[str, SystemRun]] = []
    for order in round_orders(args.systems, args.rounds):
        runs = {}
        for system in order:
            if system == "serve":
                runs[system] = run_serve(values, workload, args)
            else:
                runs[system] = run_transformers_serve(spec, workload, args)
        rounds.append({system: runs[system] for system in args.systems})
    if args.plot:
        plot(rounds[0], args.turns, args.plot)
    return report(header(values, args, workload, spec), rounds, args.turns)


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    args = parse_args(argv)
    publish(run(args), args.output)


if __name__ == "__main__":
    main()
