"""Where the machine's cores go during a measurement, by role: the LLM replica, Serve's proxy,
ingress and controller, Ray's daemons, the load generator, the system under test's own process.

Roles are read from each process's command line (Ray names its workers `ray::<actor class>`),
so this needs no handle into the system: it also splits a `transformers serve` run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import psutil

from bench.cpu import machine_busy_seconds

# (role, words that mark it in a command line): the first match wins, so specific names first
ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("llm replica", ("LLMServer",)),
    ("ingress", ("Ingress", "ChatUI")),
    ("proxy", ("ProxyActor",)),
    ("serve controller", ("ServeController",)),
    ("ray daemons", ("raylet", "gcs_server", "dashboard", "runtime_env", "log_monitor", "monitor.py",
                     "ray::IDLE", "default_worker")),
    ("bench and relay", ("bench.guidellm_compare", "bench/guidellm_compare")),
    ("guidellm", ("guidellm",)),
    ("transformers serve", ("transformers serve", "transformers/commands", "serve --continuous")),
)
OTHER = "other"


def role_of(cmdline: list[str]) -> str:
    """The role a process plays, from its command line; OTHER when none matches."""
    line = " ".join(cmdline)
    for role, marks in ROLES:
        if any(mark in line for mark in marks):
            return role
    return OTHER


@dataclass(frozen=True)
class RoleSnapshot:
    """Busy CPU seconds per process (pid -> (role, seconds)) and the machine's total."""

    processes: dict[int, tuple[str, float]]
    machine: float

    @classmethod
    def take(cls) -> RoleSnapshot:
        processes: dict[int, tuple[str, float]] = {}
        for proc in psutil.process_iter(["cmdline", "cpu_times"]):
            times = proc.info["cpu_times"]
            if times is None:
                continue
            processes[proc.pid] = (role_of(proc.info["cmdline"] or []), times.user + times.system)
        return cls(processes, machine_busy_seconds())

    def cores_since(self, earlier: RoleSnapshot, wall: float) -> dict[str, float]:
        """Cores used on average per role since `earlier` (processes started meanwhile count in
        full; OTHER also takes what no listed process accounts for, such as ended ones)."""
        cores: dict[str, float] = defaultdict(float)
        for pid, (role, seconds) in self.processes.items():
            cores[role] += (seconds - earlier.processes.get(pid, (role, 0.0))[1]) / wall
        cores[OTHER] += max(self.machine - earlier.machine - sum(cores.values()) * wall, 0.0) / wall
        return {role: round(value, 2) for role, value in cores.items() if value >= 0.005}
