"""The peft system of bench.lora_serving: what the seed projects do, inside a worker process.

One PeftModel over the base model (transformers, bf16 on this CPU, SDPA attention). Requests
are served one at a time in arrival order: each is queued on a one-thread executor when it
arrives, and there, if its adapter was never used, `load_adapter` reads it (kept for good:
no eviction, so this baseline never loads an adapter twice), then `set_adapter(name)` and
one greedy `generate` of exactly the request's output tokens (`min_new_tokens` =
`max_new_tokens`, explicit attention mask). The first token's time comes from a streamer
(the time its `generate` started plus the prefill and the first token), the last from the
return of `generate`. Adapter weights stay in bf16 (`autocast_adapter_dtype=False`; PEFT's
default would cast them to fp32, about 4x slower matmuls here).

All torch work, the model's loading included, runs on that one thread (see Engine.from_config
on why one thread). Imports `engine.loader` of the checkout the worker chose.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from bench.lora_outcomes import EngineSteps, Job, Outcome
from bench.lora_phases import WARMUP_TOKENS, Clock
from bench.lora_workload import TraceRequest
from engine.config import EngineConfig
from engine.loader import LoadedModel, load_model


class TimingStreamer(BaseStreamer):
    """Counts a `generate` call's new tokens into an Outcome and stamps the first one's time.
    `generate` first puts the prompt (skipped), then each new token, then calls `end`."""

    def __init__(self, outcome: Outcome, clock: Clock):
        self.outcome, self.clock = outcome, clock
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.outcome.first_token is None:
            self.outcome.first_token = self.clock()
        self.outcome.tokens += value.numel()

    def end(self) -> None:
        pass


class StopWhenSet(StoppingCriteria):
    """Stops every row of a `generate` call once `event` is set (a phase's cutoff)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class PeftSystem:
    """The ServedSystem of the peft baseline (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, store: Path, worker: ThreadPoolExecutor):
        self.loaded, self.store, self.worker = loaded, store, worker
        self.model: PreTrainedModel | PeftModel = loaded.model
        self.resident: set[str] = set()
        self.loads = 0
        self.stop = threading.Event()

    @classmethod
    def open(cls, job: Job) -> PeftSystem:
        """Load the base model (blocking) on the system's own torch thread."""
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peft")
        loaded = worker.submit(load_model, EngineConfig(model=job.model)).result()
        return cls(loaded, Path(job.store), worker)

    async def _on_worker(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def warm_up(self, prompt: list[int]) -> None:
        """One short base-model `generate`, so lazy initialization is not measured."""
        await self._on_worker(self._generate, prompt, WARMUP_TOKENS, None)

    async def warm(self, adapter: str) -> None:
        await self._on_worker(self._ensure, adapter)

    async def serve(self, request: TraceRequest, prompt: list[int], outcome: Outcome, clock: Clock) -> None:
        await self._on_worker(self._serve, request, prompt, outcome, clock)

    async def cut(self) -> None:
        """Stop the running `generate` at its next token and wait for it; queued requests then
        see the stop and return at once."""
        self.stop.set()
        await self._on_worker(lambda: None)
        self.stop.clear()

    def adapter_counters(self) -> tuple[int | None, int | None]:
        return self.loads, 0

    def steps(self) -> EngineSteps | None:
        return None

    async def close(self) -> None:
        await asyncio.to_thread(self.worker.shutdown, True)

    # ----- on the worker thread ---------------------------------------------------------

    def _serve(self, request: TraceRequest, prompt: list[int], outcome: Outcome, clock: Clock) -> None:
        if self.stop.is_set():
            return
        outcome.load_wait = self._ensure(request.adapter)
        self.model.set_adapter(request.adapter)
        outcome.started = clock()
        self._generate(prompt, request.output_tokens, TimingStreamer(outcome, clock))
        if outcome.tokens == request.output_tokens:
            outcome.finished = clock()

    def _ensure(self, adapter: str) -> float:
        """Load `adapter` unless resident; the seconds it took (0.0 when resident)."""
        if adapter in self.resident:
            return 0.0
        start = time.perf_counter()
        path = self.store / adapter
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=adapter, autocast_adapter_dtype=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=adapter, autocast_adapter_dtype=False)
        self.resident.add(adapter)
        self.loads += 1
        return time.perf_counter() - start

    def _generate(self, prompt: list[int], tokens: int, streamer: BaseStreamer | None) -> None:
        input_ids = torch.tensor([prompt], device=self.loaded.device)
        with torch.inference_mode():
            self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=self.loaded.tokenizer.pad_token_id,
                streamer=streamer, stopping_criteria=StoppingCriteriaList([StopWhenSet(self.stop)]),
            )
