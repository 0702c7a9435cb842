"""Small decode-only steps on one torch thread fewer, when configured, and every other step on
all of the worker's threads: the rule, and a real engine's worker thread following it."""

from __future__ import annotations

import torch

from engine.config import SamplingParams
from engine.prompt import ChatMessage
from engine.scheduler import ScheduledChunk
from engine.step_threads import StepThreads


def chunks(*lengths: int) -> list[ScheduledChunk]:
    return [ScheduledChunk(row=None, start=0, length=n) for n in lengths]  # the rule reads lengths only


def test_small_decode_steps_leave_a_core_and_prompt_chunks_take_every_thread():
    threads = StepThreads(spare_core_rows=4, full=2, cores=2)

    assert threads.wanted(chunks(1)) == 1
    assert threads.wanted(chunks(1, 1, 1, 1)) == 1
    assert threads.wanted(chunks(1, 1, 1, 1, 1)) == 2  # more rows than spare_core_rows
    assert threads.wanted(chunks(1, 300)) == 2  # a prompt chunk in the step
    assert StepThreads(spare_core_rows=4, full=1, cores=1).wanted(chunks(1)) == 1  # never below one thread
    assert StepThreads(spare_core_rows=4, full=2, cores=8).wanted(chunks(1)) == 2  # a core is spare already


def test_the_rule_is_off_by_default_and_on_other_devices():
    assert StepThreads.for_device(torch.device("cpu"), 0) is None
    assert StepThreads.for_device(torch.device("cuda"), 4) is None
    assert StepThreads.for_device(torch.device("cpu"), 4).spare_core_rows == 4


async def test_the_engine_worker_decodes_on_one_thread_fewer_and_prefills_on_all(make_engine):
    engine = make_engine(spare_core_rows=4)
    engine.core.threads.cores = 2  # the worker's two threads take every core, whatever this machine has
    engine._worker.submit(torch.set_num_threads, 2).result()
    seen: list[int] = []
    original_run = engine.core.runner.run

    def run(step_chunks):
        seen.append((max(c.length for c in step_chunks), torch.get_num_threads()))
        return original_run(step_chunks)

    engine.core.runner.run = run
    request = engine.chat_request([ChatMessage("user", "count to ten " * 8)], SamplingParams(max_tokens=4))
    async for _ in engine.submit(request):
        pass

    prefill, *decodes = seen
    assert prefill[0] > 1 and prefill[1] == 2
    assert decodes and all(step == (1, 1) for step in decodes)
    assert engine.core.threads.full == 2
    await engine.close()
