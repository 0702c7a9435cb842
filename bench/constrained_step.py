"""What grammar-constrained rows cost a decode step, in-process, one run.

The default model (SmolLM2-135M-Instruct, 49k vocabulary) decodes `--rows` rows; the same
step is timed with none, half and all of them constrained by a JSON schema (one string of at
least 4,000 characters, so no row completes its grammar while it is timed), every row greedy
with `ignore_eos`. The table gives the
median over rounds (the cases take turns) of each round's median `EngineCore.step()` time,
and its ratio to the unconstrained step.

    python -m bench.constrained_step --rows 8 --steps 10 --rounds 5
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from engine.config import EngineConfig, SamplingParams
from engine.grammar import Grammar
from engine.engine import Engine
from engine.prompt import ChatMessage

log = logging.getLogger("bench.constrained_step")
SCHEMA = {"type": "string", "minLength": 4000}


def median_step(engine: Engine, worker: ThreadPoolExecutor, rows: int, constrained: int, steps: int) -> float:
    """Median seconds of a decode step of `rows` rows, `constrained` of them with the schema."""
    core = engine.core
    for i in range(rows):
        grammar = Grammar.json_schema(SCHEMA) if i < constrained else None
        params = SamplingParams(temperature=0, max_tokens=steps + 64, ignore_eos=True, grammar=grammar)
        request = engine.chat_request([ChatMessage("user", f"Tell a story of {i + 3} fruits.")], params)
        core.add(engine.new_row(request))
    while any(not r.decoding for r in core.scheduler.running) or core.num_waiting:
        worker.submit(core.step).result()
    times = []
    for _ in range(steps):
        if len(core.scheduler.running) != rows:
            raise RuntimeError("a constrained row completed its grammar while timed")
        start = time.perf_counter()
        worker.submit(core.step).result()
        times.append(time.perf_counter() - start)
    for row in core.scheduler.running:
        row.cancelled = True
    worker.submit(core.step).result()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    engine = Engine.from_config(EngineConfig(), worker)
    median_step(engine, worker, args.rows, args.rows, 5)  # warm-up (and the schema compiled once)
    cases = [0, args.rows // 2, args.rows]
    rounds: dict[int, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):  # the cases take turns, so load from elsewhere hits them alike
        for k in cases:
            rounds[k].append(median_step(engine, worker, args.rows, k, args.steps))
    results = {k: statistics.median(values) for k, values in rounds.items()}
    print(f"| constrained rows of {args.rows} | step ms (median of {args.rounds} rounds of {args.steps}) "
          "| / unconstrained |")
    print("|---:|---:|---:|")
    for k, seconds in results.items():
        print(f"| {k} | {seconds * 1000:.1f} | {seconds / results[0]:.2f} |")
    worker.shutdown()


if __name__ == "__main__":
    main()
