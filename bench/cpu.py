"""CPU use around a measurement: this process tree's and everything else's on the machine.

No imports beyond psutil, so that every benchmark process can use it (bench.lora_serving's
workers run with another checkout's `engine` package and import little of bench/).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (every core, every process, the kernel)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


@dataclass(frozen=True)
class CpuSnapshot:
    """Busy CPU seconds of the whole machine and of this process tree (Ray's processes included)."""

    machine: float
    own: dict[int, float]

    @classmethod
    def take(cls) -> CpuSnapshot:
        """Now; processes that end between two snapshots lose their last moments (rare here)."""
        own: dict[int, float] = {}
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.Error:  # ended meanwhile
                continue
            own[proc.pid] = times.user + times.system
        return cls(machine_busy_seconds(), own)

    def cores_since(self, earlier: CpuSnapshot, wall: float) -> tuple[float, float]:
        """(cores used by this process tree, cores used by everything else) on average since `earlier`."""
        own = sum(seconds - earlier.own.get(pid, 0.0) for pid, seconds in self.own.items())
        other = self.machine - earlier.machine - own
        return own / wall, max(other, 0.0) / wall
