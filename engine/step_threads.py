"""How many torch threads each engine step runs on (CPU only).

On a CPU a prompt chunk is compute-bound and scales with threads (a 400-token prefill of
SmolLM2-135M: 340 ms on one thread, 185-205 ms on two, on the 2-core machine of bench/README),
while a decode step of a few rows gains less (one row: 21-24 ms against 24-27). Where the
processes that carry the streams (Serve's proxy and ingress, Ray's daemons, the client) share
the replica's cores, a decode step also loses more than it gains: each of their wake-ups
preempts a model thread, and its partner waits at the next barrier (served, a lone stream's
steps took 27-55 ms on two threads and 23-36 on one; bench/README, "Small decode steps on one
thread fewer"). So with `spare_core_rows` > 0, when the worker's threads take every core the
process may use, a step without prompt tokens and with at most that many rows runs on one
thread fewer, leaving a core to those processes; every other step (and every step where a
core is already spare) runs on all the threads the worker started with.

Thread: the engine core's worker thread. OpenMP's thread count belongs to the calling thread,
so `apply` must run there (it reads the worker's count on its first call).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.scheduler import ScheduledChunk


def usable_cores() -> int:
    """CPUs this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class StepThreads:
    """The thread count for each step: `full` (the worker's count at its first step), or one
    fewer for a decode-only step of at most `spare_core_rows` rows (0: never) when `full` covers
    all `cores` the process may run on."""

    spare_core_rows: int
    full: int | None = None
    cores: int = field(default_factory=usable_cores)

    @classmethod
    def for_device(cls, device: torch.device, spare_core_rows: int) -> StepThreads | None:
        """None off the CPU, or when no step would change its threads."""
        return cls(spare_core_rows) if device.type == "cpu" and spare_core_rows > 0 else None

    def wanted(self, chunks: Sequence[ScheduledChunk]) -> int:
        """Threads for a step of these chunks (`full` must be known)."""
        assert self.full is not None, "apply() reads the worker's threads first"
        decode_only = all(chunk.length == 1 for chunk in chunks)
        no_spare_core = self.full >= self.cores
        if self.full > 1 and no_spare_core and decode_only and 0 < len(chunks) <= self.spare_core_rows:
            return self.full - 1
        return self.full

    def apply(self, chunks: Sequence[ScheduledChunk]) -> None:
        """Set the calling (worker) thread's torch threads for this step, when they differ."""
        if self.full is None:
            self.full = torch.get_num_threads()
        wanted = self.wanted(chunks)
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
