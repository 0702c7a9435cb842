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
2. engine: the same engine with the same args in this process, called directly (no Ray, no
   HTTP, no stream pacing): serve / engine is what the serving stack adds. Its counters too.
3. transformers-serve: `transformers serve --continuous-batching` on the same checkpoint,
   dtype and device (bench/systems.py).

For serve and engine the report also gives the engine's step counters over the turns (steps,
seconds in steps, tokens a step), and for every system the last turn's requests in the order
they were sent, with their TTFT: whether a user waited for another's prefill shows there.

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
import platform
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bench.chat_results import PrefixCache, SystemRun, Turn, plot, report
from bench.chat_text import SHARED_SYSTEM_PROMPT, SYSTEM_PROMPT, shared_message
from bench.chat_text import user_message as corpus_message
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
from bench.client import Chunk, Endpoint, measure, stream_chat
from bench.cpu import CpuSnapshot
from bench.load import EngineSteps
from bench.serve_systems import engine_chunks
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
from engine.config import SamplingParams
from engine.engine import Engine, EngineStats
from engine.loader import resolve_checkpoint
from engine.prompt import ChatMessage

log = logging.getLogger("bench.chat")

SYSTEMS = ("serve", "engine", "transformers-serve")
FULL_DEFAULTS = {"users": 4, "turns": 8, "message_tokens": 280, "max_tokens": 64}
QUICK_DEFAULTS = {"users": 2, "turns": 3, "message_tokens": 120, "max_tokens": 24}
WARMUP_TOKENS = 8
MAX_LOGGED_ERRORS = 3

WORKLOADS = {"corpus": (corpus_message, SYSTEM_PROMPT), "shared-prefix": (shared_message, SHARED_SYSTEM_PROMPT)}

StatsReader = Callable[[], Awaitable[Any | None]]
"""Reads a system's engine stats (an object with optional prefix_cache_* and step fields), or None."""

Send = Callable[[Sequence[dict[str, str]], int], AsyncIterator[Chunk]]
"""Sends one chat (the messages so far) for a greedy reply of at most N tokens; yields its Chunks."""


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


async def chat_user(send: Send, system: str, workload: Workload, user: int, max_tokens: int,
                    start: float) -> list[Turn]:
    """One user's turns in order, each sending the whole conversation so far; a failed turn ends
    the chat. `start`: the perf_counter the turns' send times count from."""
    # A plain list, not client/conversation.py's Conversation: an empty reply is sent back as an
    # empty assistant message, and a Conversation cannot hold one (its "" reply means "not yet").
    chat = [{"role": "system", "content": workload.system_prompt}]
    turns: list[Turn] = []
    for turn, message in enumerate(workload.messages[user]):
        chat.append({"role": "user", "content": message})
        sent_at = time.perf_counter() - start
        result = await measure(send(chat, max_tokens))
        prompt_tokens = result.prompt_tokens if result.prompt_tokens is not None else workload.prompt_tokens(chat)
        turns.append(Turn(user, turn, result, prompt_tokens, sent_at))
        log.info("%s user %d turn %d: TTFT %s s, %d prompt tokens, %d reply tokens%s", system, user + 1,
                 turn + 1, fmt(result.ttft, 3), prompt_tokens, result.tokens,
                 f", failed: {result.error}" if result.error else "")
        if result.error:
            break
        chat.append({"role": "assistant", "content": result.text})
    return turns


async def warm_up(send: Send) -> None:
    """One short untimed request (transformers serve sets up its batching on the first one)."""
    result = await measure(send(user_message("Say hello."), WARMUP_TOKENS))
    if result.error:
        raise RuntimeError(f"warm-up request failed: {result.error}")


async def run_chats(endpoint: Endpoint, system: str, workload: Workload, args: argparse.Namespace,
                    read_stats: StatsReader | None = None) -> SystemRun:
    """Every user's conversation with an OpenAI-compatible server (see `converse`)."""
    async with endpoint.client(len(workload.messages) + 1, args.timeout) as client:
        def send(chat: Sequence[dict[str, str]], max_tokens: int) -> AsyncIterator[Chunk]:
            return stream_chat(client, endpoint, chat, max_tokens, ignore_eos=False)

        return await converse(send, system, workload, args, read_stats)


async def converse(send: Send, system: str, workload: Workload, args: argparse.Namespace,
                   read_stats: StatsReader | None = None) -> SystemRun:
    """Warm up, then every user's conversation at once; the growth of the engine's prefix-cache
    and step counters when `read_stats` has them."""
    log.info("%s: warming up", system)
    await warm_up(send)
    before = await read_stats() if read_stats else None
    log.info("%s: %d users x %d turns", system, len(workload.messages), args.turns)
    cpu = CpuSnapshot.take()
    start = time.perf_counter()
    per_user = await asyncio.gather(*(chat_user(send, system, workload, u, args.max_tokens, start)
                                      for u in range(len(workload.messages))))
    wall = time.perf_counter() - start
    own, other = CpuSnapshot.take().cores_since(cpu, wall)
    after = await read_stats() if read_stats else None
    turns = tuple(t for user_turns in per_user for t in user_turns)
    for turn in [t for t in turns if t.result.error][:MAX_LOGGED_ERRORS]:
        log.warning("%s user %d turn %d failed: %s", system, turn.user + 1, turn.turn + 1, turn.result.error)
    cache = PrefixCache.between(before, after) if before is not None and after is not None else None
    engine_counted = isinstance(before, EngineStats) and isinstance(after, EngineStats)
    steps = EngineSteps.between(before, after) if engine_counted else None
    return SystemRun(system, turns, wall, own, other, cache, steps)


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


async def engine_chat(engine: Engine, chat: Sequence[dict[str, str]], max_tokens: int) -> AsyncIterator[Chunk]:
    """A Send to the engine in this process: a greedy chat request; like the HTTP stream, content
    chunks only where a delta has text, then usage."""
    messages = [ChatMessage(m["role"], m["content"]) for m in chat]
    async for chunk in engine_chunks(engine, messages, SamplingParams(max_tokens=max_tokens, temperature=0.0)):
        if chunk.kind == "usage" or chunk.text:
            yield chunk


async def run_engine(values: dict[str, Any], workload: Workload, args: argparse.Namespace) -> SystemRun:
    """The serve app's engine in this process, without Ray or HTTP: what the serving stack adds
    to serve's figures is the difference."""
    app = AppArgs.model_validate(values)
    log.info("engine: loading %s in this process", app.model)
    engine = Engine.from_config(app.engine_config(), preload=app.preloaded())

    async def read_stats() -> EngineStats:
        return engine.stats()

    try:
        return await converse(partial(engine_chat, engine), "engine", workload, args, read_stats)
    finally:
        await engine.close()


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
        "- engine: the same engine and args in this process, called directly (no Ray, no HTTP, no stream pacing)",
        f"- transformers-serve: `{' '.join(spec.command('PORT'))}` with HF_HUB_OFFLINE=1, a subprocess",
    ]


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
            elif system == "engine":
                runs[system] = asyncio.run(run_engine(values, workload, args))
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
