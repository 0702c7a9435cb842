"""What a bench.lora_serving worker is asked to do and what it reports, as JSON-ready dataclasses.

The orchestrator (bench/lora_serving.py) writes a Job, a worker process (bench/lora_worker.py)
runs it on one system and writes a WorkerResult. Plain data with no torch or engine imports:
the worker may run another checkout's `engine` package.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bench.lora_workload import TraceRequest

System = Literal["ours", "before", "peft"]
SYSTEMS: tuple[System, ...] = ("ours", "before", "peft")
PhaseMode = Literal["unloaded", "closed", "open"]


@dataclass(frozen=True)
class Phase:
    """One timed phase of a worker. `unloaded`: the requests one at a time, each adapter made
    resident first (untimed); `closed`: `concurrency` clients sending back to back; `open`: each
    request at its arrival time, the unfinished cancelled `cutoff` seconds after the start.
    `prompts[i]` are the token ids of `requests[i]`."""

    name: str
    mode: PhaseMode
    requests: list[TraceRequest]
    prompts: list[list[int]]
    concurrency: int = 1
    cutoff: float = math.inf


@dataclass(frozen=True)
class Job:
    """One worker process: a system, where its engine code lives, the model and adapters, the phases."""

    system: System
    engine_root: str  # the checkout whose `engine` package the worker imports
    model: str
    store: str  # folder of the adapters' PEFT folders
    max_batch_size: int
    lru_adapters: int  # the `before` system's multiplexer size
    warmup_prompt: list[int]  # token ids of the untimed warm-up requests (base model)
    phases: list[Phase]

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def read(cls, path: Path) -> Job:
        data = json.loads(path.read_text())
        phases = [Phase(**{**p, "requests": [TraceRequest(**r) for r in p["requests"]]}) for p in data.pop("phases")]
        return cls(**data, phases=phases)


@dataclass
class Outcome:
    """One request as measured; times in seconds after its phase started. Filled in as the request
    goes, so a request cut off at the phase's end keeps what it reached (`finished` None)."""

    index: int
    adapter: str
    input_tokens: int
    output_tokens: int  # asked for (ignore_eos: generated in full unless cut off)
    arrival: float  # scheduled arrival (open loop) or the time it was sent (closed loop)
    load_wait: float = 0.0  # seconds it waited for its adapter to be loaded: > 0 means cold
    started: float | None = None  # its adapter ready, the request was handed to the model
    first_token: float | None = None
    finished: float | None = None
    tokens: int = 0
    error: str | None = None

    @classmethod
    def of(cls, request: TraceRequest, arrival: float) -> Outcome:
        return cls(request.index, request.adapter, request.input_tokens, request.output_tokens, arrival)

    @property
    def done(self) -> bool:
        return self.finished is not None and self.error is None

    @property
    def cold(self) -> bool:
        """It waited for its adapter's load (known once `started`; a request cut off while it
        waited counts as neither cold nor warm)."""
        return self.load_wait > 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None unless done with at least two tokens."""
        if not self.done or self.first_token is None or self.tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.tokens - 1)


@dataclass(frozen=True)
class EngineSteps:
    """The engine's steps during a phase (ours and before): count, time in them, rows computed."""

    steps: int
    seconds: float
    rows: int


@dataclass
class PhaseResult:
    """One phase of one system. `loads` / `evictions`: adapter loads and evictions the system did
    (None where it does not tell); `wall`: start to last completion, or to the cutoff."""

    name: str
    outcomes: list[Outcome]
    wall: float
    loads: int | None = None
    evictions: int | None = None
    steps: EngineSteps | None = None
    own_cores: float = math.nan
    other_cores: float = math.nan


@dataclass
class WorkerResult:
    """Everything one worker measured, and which engine code it ran."""

    system: System
    engine: str  # the engine package's folder and git commit
    phases: dict[str, PhaseResult] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def read(cls, path: Path) -> WorkerResult:
        data = json.loads(path.read_text())
        phases = {}
        for name, p in data.pop("phases").items():
            steps = EngineSteps(**p.pop("steps")) if p.get("steps") else None
            phases[name] = PhaseResult(**{**p, "outcomes": [Outcome(**o) for o in p["outcomes"]], "steps": steps})
        return cls(**data, phases=phases)
