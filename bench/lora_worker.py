"""One system of bench.lora_serving in a process of its own: read a Job, run its phases, write the result.

    python -m bench.lora_worker JOB.json RESULT.json     # started by bench/lora_serving.py

The job names the checkout whose `engine` package to use (`engine_root`: this one for ours and
peft, the worktree of the code before issue #24 for before). This module's package, `bench`,
is already imported from this checkout when main() runs; main() then puts the engine root
first on sys.path, and only then imports the modules that import `engine`. So the worker runs
this checkout's benchmark code on the chosen checkout's engine, and checks that it did.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.cli import setup_logging
from bench.lora_outcomes import Job, WorkerResult
from bench.lora_phases import ServedSystem, run_phase

log = logging.getLogger("bench.lora_serving")


def use_engine_from(root: Path) -> Path:
    """Make `import engine` load `root`/engine; raise if it was imported from elsewhere already.
    Returns the folder of the engine package in use."""
    sys.path.insert(0, str(root))
    package = Path(importlib.import_module("engine").__file__).resolve().parent
    if package != (root / "engine").resolve():
        raise RuntimeError(f"engine was imported from {package}, not from {root}")
    return package


def open_system(job: Job) -> ServedSystem:
    """The job's system, loaded (blocking: nothing else runs yet). Imports the engine code it
    needs here, after use_engine_from, and only that (peft needs no engine module but the loader)."""
    if job.system == "peft":
        from bench.lora_peft import PeftSystem

        return PeftSystem.open(job)
    from bench.lora_systems import open_engine_system

    return open_engine_system(job)


async def run_job(job: Job) -> WorkerResult:
    """Open the job's system, warm it up (untimed), run every phase, close it."""
    system = open_system(job)
    result = WorkerResult(job.system, str(Path(sys.modules["engine"].__file__).parent))
    try:
        await system.warm_up(job.warmup_prompt)
        for phase in job.phases:
            log.info("%s: %s (%d requests)", job.system, phase.name, len(phase.requests))
            result.phases[phase.name] = await run_phase(system, phase)
    finally:
        await system.close()
    return result


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path)
    parser.add_argument("result", type=Path)
    args = parser.parse_args(argv)
    job = Job.read(args.job)
    log.info("%s: engine from %s", job.system, use_engine_from(Path(job.engine_root)))
    asyncio.run(run_job(job)).write(args.result)


if __name__ == "__main__":
    main()
