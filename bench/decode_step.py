"""One decode step of the engine against the step it replaced, in-process, same run.

- **dynamic-cache**: the previous engine's step. A left-padded batch whose KV lives in
  transformers' `DynamicCache` (grown with `torch.cat` every step) and whose mask gains a
  column per step, through transformers' SDPA attention; with an adapter loaded, through
  PEFT's `adapter_names` (every row "__base__"). Greedy sampling as the engine does it.
- **paged**: this engine's `EngineCore.step()` (scheduler, packed forward over the paged
  KV cache, sampling), every row decoding.

Each case (rows x context tokens) prefills random prompts, then times `--steps` decode
steps of each system; the table gives medians and paged / dynamic-cache. With `--adapter`
both systems also run with that LoRA adapter loaded while every row uses the base model:
the cost a loaded adapter puts on base-model requests.

    python -m bench.decode_step --output bench/decode-step-results.md
    python -m bench.decode_step --quick
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import DynamicCache

from bench.cli import parse_with_quick, publish, setup_logging
from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.loader import LoadedModel, load_model
from engine.request import GenerationRequest
from engine.sampling import RowSampler, sample_next_tokens

log = logging.getLogger("bench.decode_step")

ROOT = Path(__file__).resolve().parent.parent
FULL_CASES = ["1x128", "16x64", "32x128", "16x1024", "16x3072"]
QUICK_CASES = ["1x64", "4x256"]
GREEDY = SamplingParams(temperature=0, max_tokens=2048, ignore_eos=True)


@dataclass
class Case:
    rows: int
    context: int

    @classmethod
    def parse(cls, text: str) -> Case:
        rows, context = text.lower().split("x")
        return cls(int(rows), int(context))


class InlineExecutor(Executor):
    """Runs each submitted call at once on the caller's thread. The benchmark does all torch
    work on one thread: a second thread running OpenMP regions makes libgomp stop
    spin-waiting and slows both systems (see Engine.from_config)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # handed to the caller through the future, as executors do
            future.set_exception(err)
        return future


def random_prompts(case: Case, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(case.context)] for _ in range(case.rows)]


def median_ms(step: Callable[[], object], steps: int) -> float:
    """Median wall time of `steps` calls, after two untimed ones."""
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


# ----- the previous engine's step -------------------------------------------------------------


class DynamicCacheBatch:
    """The previous engine's running batch: left-padded DynamicCache, mask grown per step."""

    def __init__(self, loaded: LoadedModel, prompts: list[list[int]], adapter: str | None):
        self.model = PeftModel.from_pretrained(loaded.model, adapter) if adapter else loaded.model
        self.names = {"adapter_names": ["__base__"] * len(prompts)} if adapter else {}
        ids = torch.tensor(prompts, device=loaded.device)
        self.mask = torch.ones_like(ids)
        self.cache = DynamicCache()
        self.samplers = [RowSampler.create(GREEDY, p, loaded.device) for p in prompts]
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=self.mask, past_key_values=self.cache,
                             use_cache=True, logits_to_keep=1, **self.names)
        self.next_ids = out.logits[:, -1].argmax(-1).tolist()

    def step(self) -> None:
        with torch.inference_mode():
            self.mask = F.pad(self.mask, (0, 1), value=1)
            out = self.model(
                input_ids=torch.tensor(self.next_ids, device=self.mask.device).unsqueeze(-1),
                attention_mask=self.mask, position_ids=self.mask.sum(-1, keepdim=True) - 1,
                past_key_values=self.cache, use_cache=True, **self.names,
            )
            self.next_ids = sample_next_tokens(out.logits[:, -1], self.samplers)


def time_dynamic_cache(config: EngineConfig, case: Case, steps: int, adapter: str | None) -> float:
    loaded = load_model(config)
    batch = DynamicCacheBatch(loaded, random_prompts(case, loaded.model.config.vocab_size), adapter)
    return median_ms(batch.step, steps)


# ----- this engine's step -------------------------------------------------------------------


def time_paged(config: EngineConfig, case: Case, steps: int, adapter: str | None) -> float:
    adapters = {"bench": adapter} if adapter else {}
    engine = Engine.from_config(config.model_copy(update={"adapters": adapters}), worker=InlineExecutor())
    core = engine.core
    for i, prompt in enumerate(random_prompts(case, engine.loaded.model.config.vocab_size)):
        core.add(engine.new_row(GenerationRequest(prompt, GREEDY, request_id=str(i))))
    start = time.perf_counter()
    while not (core.scheduler.running and all(r.decoding for r in core.scheduler.running)
               and len(core.scheduler.running) == case.rows):
        core.step()
    log.info("paged prefill of %s: %.1f s", case, time.perf_counter() - start)
    ms = median_ms(core.step, steps)
    core.abort_all("bench over")
    return ms


# ----- report -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", help=f"rows x context, comma-separated (default {','.join(FULL_CASES)})")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per system and case")
    parser.add_argument("--model", default=EngineConfig().model)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quick", action="store_true", help="two small cases, to check the script")
    parser.add_argument("--adapter", default=str(ROOT / "adapters" / "smollm2-pirate"),
                        help="LoRA adapter loaded (unused by the rows) in a second pass; '' to skip")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    return parser


def measure(args: argparse.Namespace) -> list[list[str]]:
    cases = [Case.parse(c) for c in (args.cases.split(",") if args.cases else FULL_CASES)]
    most = max(c.rows * (c.context + args.steps + 8) for c in cases)
    config = EngineConfig(model=args.model, dtype=args.dtype, max_kv_tokens=most + 1024,
                          max_step_tokens=4096, max_batch_size=max(c.rows for c in cases), max_tokens_cap=2048)
    rows = []
    for case in cases:
        old = time_dynamic_cache(config, case, args.steps, None)
        new = time_paged(config, case, args.steps, None)
        row = [f"{case.rows} x {case.context}", f"{old:.1f}", f"{new:.1f}", f"{new / old:.2f}"]
        if args.adapter:
            old_lora = time_dynamic_cache(config, case, args.steps, args.adapter)
            new_lora = time_paged(config, case, args.steps, args.adapter)
            row += [f"{old_lora / old:.2f}", f"{new_lora / new:.2f}"]
        log.info("%s", row)
        rows.append(row)
    return rows


def report(rows: Sequence[Sequence[str]], args: argparse.Namespace) -> str:
    header = ["rows x context", "dynamic-cache ms", "paged ms", "paged / dynamic-cache"]
    if args.adapter:
        header += ["dynamic-cache: adapter loaded / none", "paged: adapter loaded / none"]
    lines = [
        "# Decode step: paged KV cache vs the previous DynamicCache engine",
        "",
        f"Model {args.model}, dtype {args.dtype}, {torch.get_num_threads()} torch threads, "
        f"median of {args.steps} steps per system; every row decodes the base model"
        + (f"; adapter columns: {args.adapter} loaded beside it." if args.adapter else "."),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    args = parse_with_quick(build_parser(), argv, {"cases": ",".join(QUICK_CASES), "steps": 3})
    publish(report(measure(args), args), args.output)


if __name__ == "__main__":
    main()
