"""Mixed-adapter decoding against the code before the row-pool LoRA, in-process, same run.

Each of two trees (the code before the change, `--before` commit, default 8ede813, the
row-pool LoRA's predecessor, extracted here with `git archive`, and this tree) runs in its
own subprocess with its own PYTHONPATH. The worker
(`--worker`, this file run inside the other tree) drives only the public Engine API, so
the same worker code runs against both: `Engine.from_config`, `await engine.load_adapter`,
`engine.submit`. It loads the default model (SmolLM2-135M-Instruct, bf16) and
`--adapters` random rank-`--rank` PEFT adapters on every linear layer (made once in a temp
folder), then answers one command per line: `k` runs `--rows` greedy requests of
`--tokens` new tokens (`ignore_eos`), row i on adapter i mod k (k = 0: the base model),
and prints the tokens per second from the first submit to the last delta.

The parent alternates the trees per k (the order reversed every round) and prints, per k,
the median tokens/s of each tree, each tree's ratio to its own k = 0, and after / before.
The machine's load (`uptime`) before and after is part of the report: other developers
share the two cores, and a busy second core slows every OpenMP op.

    python -m bench.lora_step --rounds 3 --output bench/lora-step-results.md
    python -m bench.lora_step --quick
    python -m bench.lora_step --quick --before fa27276   # against main before the CPU LoRA kernel
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("bench.lora_step")

ROOT = Path(__file__).resolve().parent.parent
BEFORE_COMMIT = "8ede813"
DEFAULT_KS = [0, 1, 4, 8, 16, 32]
PROMPT_TOKENS = 24


# ----- the worker: runs inside either tree, public Engine API only ----------------------------


async def worker(adapter_root: Path, adapters: int, rows: int, tokens: int) -> None:
    """Load the model and adapters, then answer `k` lines on stdin with one JSON line each."""
    from engine.config import EngineConfig, SamplingParams
    from engine.engine import Engine
    from engine.request import GenerationRequest

    config = EngineConfig(dtype="bfloat16", device="cpu", max_batch_size=rows, max_active_adapters=max(adapters, 1))
    engine = Engine.from_config(config)
    for i in range(adapters):
        await engine.load_adapter(f"a{i}", str(adapter_root / f"a{i}"))
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    vocab = engine.loaded.model.config.vocab_size
    prompts = [[(1000 + 37 * (i * PROMPT_TOKENS + j)) % (vocab - 200) + 100 for j in range(PROMPT_TOKENS)]
               for i in range(rows)]

    async def run(k: int) -> dict:
        requests = [GenerationRequest(p, params, f"a{i % k}" if k else None) for i, p in enumerate(prompts)]
        start = time.perf_counter()
        counts = await asyncio.gather(*(count_tokens(engine.submit(r)) for r in requests))
        return {"k": k, "tokens": sum(counts), "seconds": time.perf_counter() - start}

    await run(min(adapters, rows))  # warm-up: every code path once
    await run(0)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(await run(int(line))), flush=True)
    await engine.close()


async def count_tokens(stream) -> int:
    """The tokens of a stream's deltas (a newer tree ends the stream with a RequestEnd, which
    has `error` too but no tokens)."""
    from engine.request import Delta

    count = 0
    async for item in stream:
        if item.error:
            raise RuntimeError(item.error)
        if isinstance(item, Delta):
            count += len(item.token_ids)
    return count


# ----- the parent ---------------------------------------------------------------------------


@dataclass
class Tree:
    """One code tree measured in its own worker subprocess."""

    label: str
    path: Path
    process: subprocess.Popen | None = None
    results: dict[int, list[float]] = field(default_factory=dict)  # k -> tokens/s per round

    def start(self, adapter_root: Path, args: argparse.Namespace) -> None:
        command = [sys.executable, "-P", str(Path(__file__).resolve()), "--worker", str(adapter_root),
                   "--adapters", str(args.adapters), "--rows", str(args.rows), "--tokens", str(args.tokens)]
        env = {**os.environ, "PYTHONPATH": str(self.path)}  # -P: not this file's folder (bench/engine.py)
        self.process = subprocess.Popen(command, cwd=self.path, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self._read()  # {"ready": true}

    def measure(self, k: int) -> float:
        self.process.stdin.write(f"{k}\n")
        self.process.stdin.flush()
        result = self._read()
        rate = result["tokens"] / result["seconds"]
        self.results.setdefault(k, []).append(rate)
        log.info("%s k=%d: %.1f tok/s", self.label, k, rate)
        return rate

    def stop(self) -> None:
        if self.process:
            self.process.stdin.close()
            self.process.wait(timeout=60)

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.label} worker exited ({self.process.wait()})")
        return json.loads(line)


def before_tree(path: Path, commit: str) -> Path:
    """The files of `commit` in `path` (extracted once with `git archive`: no worktree, no
    change to the repository)."""
    if not (path / "engine").is_dir():
        path.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(path)], input=archive, check=True)
    return path


def make_adapters(root: Path, count: int, rank: int) -> None:
    """`count` random rank-`rank` PEFT adapters on every linear layer of the default model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from engine.config import EngineConfig
    from engine.loader import load_model

    model = load_model(EngineConfig(dtype="bfloat16", device="cpu")).model
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                  init_lora_weights=False))
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn_like(param) * 0.02)
        peft_model.save_pretrained(root / f"a{i}")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def report(trees: list[Tree], ks: list[int], args: argparse.Namespace, loads: list[str]) -> str:
    before, after = trees
    lines = [
        f"# Mixed-adapter decoding: this tree against commit {args.before}\n",
        f"`python -m bench.lora_step --rounds {args.rounds}`: {args.rows} rows x {args.tokens} new tokens "
        f"(prompts of {PROMPT_TOKENS} tokens), greedy, bf16, SmolLM2-135M-Instruct, rank-{args.rank} "
        f"random adapters on every linear layer; row i uses adapter i mod k. Tokens/s from the first "
        f"submit to the last delta; medians over {args.rounds} rounds (the trees alternate per k).\n",
        f"- before: {before.path} (commit {args.before}); after: {after.path}",
        *(f"- load: {load}" for load in loads),
        "",
        "| k adapters | before tok/s | after tok/s | before / its k=0 | after / its k=0 | after / before |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    base = {t.label: statistics.median(t.results[0]) for t in trees}
    for k in ks:
        b, a = statistics.median(before.results[k]), statistics.median(after.results[k])
        lines.append(f"| {k} | {b:.1f} | {a:.1f} | {b / base[before.label]:.2f} | {a / base[after.label]:.2f} "
                     f"| {a / b:.2f} |")
    lines += ["", "Per round (tok/s, before / after):", ""]
    for k in ks:
        pairs = ", ".join(f"{b:.0f}/{a:.0f}" for b, a in zip(before.results[k], after.results[k]))
        lines.append(f"- k={k}: {pairs}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ks", type=int, nargs="+", default=DEFAULT_KS, help="distinct adapters per batch")
    parser.add_argument("--adapters", type=int, default=None, help="adapters loaded (default: the largest k)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default=BEFORE_COMMIT, metavar="COMMIT",
                        help=f"the code to compare with (default {BEFORE_COMMIT}, before the row-pool LoRA)")
    parser.add_argument("--before-tree", type=Path, default=None,
                        help="where that commit's files are (default: a temp folder named after it; made when missing)")
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--quick", action="store_true", help="k = 0, 4; one round; 16 tokens")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.ks, args.rounds, args.tokens = [0, 4], 1, 16
    args.adapters = args.adapters if args.adapters is not None else max(args.ks)
    if args.worker:
        asyncio.run(worker(args.worker, args.adapters, args.rows, args.tokens))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    before = args.before_tree or Path(tempfile.gettempdir()) / f"lora-step-before-{args.before}"
    trees = [Tree("before", before_tree(before, args.before)), Tree("after", args.after)]
    with tempfile.TemporaryDirectory(prefix="lora-step-") as folder:
        make_adapters(Path(folder), args.adapters, args.rank)
        loads = [f"start: {uptime()}"]
        try:
            for tree in trees:
                tree.start(Path(folder), args)
            for round_ in range(args.rounds):
                for k in args.ks:
                    for tree in (trees if round_ % 2 == 0 else trees[::-1]):
                        tree.measure(k)
        finally:
            for tree in trees:
                tree.stop()
        loads.append(f"end: {uptime()}")
    markdown = report(trees, args.ks, args, loads)
    sys.stdout.write(markdown)
    if args.output:
        args.output.write_text(markdown)


if __name__ == "__main__":
    main()
