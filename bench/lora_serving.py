"""Benchmark serving many LoRA adapters: S-LoRA's workload, scaled to this machine, in-process.

N adapters (bench/lora_adapters.py: made once by PEFT on the real model, random weights,
ranks 8/16/32/64 in turn, every Linear layer), popularity by a power law, Poisson or bursty
arrivals, prompts of 8-256 tokens of real text, 8-128 output tokens (greedy, ignore_eos),
fixed seeds (bench/lora_workload.py). No Ray, no HTTP: this measures the engine and its
adapter handling. Three systems, each in a worker process of its own (bench/lora_worker.py),
one after another:

- ours: the current engine with the adapters' folder as its store (`ensure_adapter`, `submit`);
- before: the engine of the code before issue #24 (8ede813, a worktree: --before-root), with
  the server's adapter policy of that code emulated (Ray Serve's multiplexer: LRU of 8, one
  load at a time, eviction waits for the adapter's rows);
- peft: one PeftModel, one `generate` per request, one request at a time (the seeds' way).

Per workload group (N, alpha), every system is first calibrated in its own process: unloaded
latency (requests one at a time; the SLO is 5x its TTFT and TPOT p50) and saturation (a closed
loop; peft: one at a time). Then each offered rate (a multiple of ours' saturation) is run as
an open loop per system, in alternating order over --rounds. See bench/README.md, "Serving
many adapters".

    python -m bench.lora_serving --quick               # 1-2 minutes: N=4, one short point
    python -m bench.lora_serving                       # 15-25 minutes (estimated): N=32, alpha 1, Poisson, 3 rates
    python -m bench.lora_serving --adapters 8 32 --alpha 1.0 --arrivals poisson --rates 0.5 1.0 \\
        --duration 60 --systems ours before peft

Results go to stdout and --output as markdown (default bench/lora-serving-results.md, none with
--quick), the plot to --plot (default bench/lora-serving.png); progress goes to logging.
"""

# The work is split by job: bench/lora_workload.py (the requests), bench/lora_adapters.py (the
# adapters), bench/lora_worker.py with lora_phases.py, lora_systems.py and lora_peft.py (one
# system in a process), bench/lora_metrics.py and lora_report.py (the figures and the report).

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from bench.cli import add_rounds_option, parse_with_quick, publish, round_orders, setup_logging
from bench.lora_adapters import ensure_adapters, store_folder
from bench.lora_metrics import Calibration, Point
from bench.lora_outcomes import SYSTEMS, Job, Phase, PhaseMode, System, WorkerResult
from bench.lora_report import Group, PointKey, Results, header, plot, report
from bench.lora_workload import (
    ARRIVAL_KINDS,
    TraceRequest,
    WorkloadSpec,
    build_trace,
    closed_loop_requests,
    corpus_text,
    prompt_window,
)
from engine.config import DEFAULT_MODEL
from engine.config import default_cache_dir
from engine.loader import resolve_checkpoint

log = logging.getLogger("bench.lora_serving")

ROOT = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "8ede813"  # the code before issue #24
WARMUP_PROMPT_TOKENS = 32
WORKER_TIMEOUT_S = 3600.0  # beyond the phases' own bounds: a worker that hangs
FULL_DEFAULTS = {
    "adapters": [32], "alpha": [1.0], "arrivals": ["poisson"], "rates": [0.5, 0.75, 1.0], "duration": 60.0,
    "unloaded_requests": 8, "saturation_requests": 64, "concurrency": 32,
    "output": ROOT / "bench" / "lora-serving-results.md", "plot": ROOT / "bench" / "lora-serving.png",
}
QUICK_DEFAULTS = {
    "adapters": [4], "alpha": [1.0], "arrivals": ["poisson"], "rates": [0.5], "duration": 10.0, "drain": 5.0,
    "unloaded_requests": 2, "saturation_requests": 6, "concurrency": 4, "output": None, "plot": None,
}


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; the grid defaults to FULL_DEFAULTS."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run (explicit options still win)")
    p.add_argument("--adapters", type=int, nargs="+", help="adapter counts N (one sweep each)")
    p.add_argument("--alpha", type=float, nargs="+", help="power-law exponents of adapter popularity")
    p.add_argument("--arrivals", nargs="+", choices=ARRIVAL_KINDS, help="Poisson, or gamma gaps with cv 4")
    p.add_argument("--rates", type=float, nargs="+",
                   help="offered rates as multiples of ours' saturation (the first system's without ours)")
    p.add_argument("--duration", type=float, help="seconds of arrivals per point")
    p.add_argument("--drain", type=float, help="seconds after the arrivals end before unfinished requests are "
                                               "cut off (default: --duration)")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals, adapters, lengths and prompts")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="systems, in this order")
    add_rounds_option(p)
    p.add_argument("--peft-max-rate", type=float, default=0.5,
                   help="run peft only at rate multiples up to this (it serves one request at a time)")
    p.add_argument("--unloaded-requests", type=int, help="calibration: requests one at a time (the SLO's reference)")
    p.add_argument("--saturation-requests", type=int, help="calibration: requests of the closed loop")
    p.add_argument("--concurrency", type=int, help="calibration: clients of the closed loop")
    p.add_argument("--max-batch-size", type=int, default=32, help="engine rows (ours and before)")
    p.add_argument("--lru-adapters", type=int, default=8, help="before: the multiplexer's adapters per replica")
    p.add_argument("--before-root", type=Path, default=Path("/tmp/lora-before"),
                   help=f"a worktree of {BEFORE_COMMIT} (git worktree add --detach /tmp/lora-before {BEFORE_COMMIT})")
    p.add_argument("--adapter-dir", type=Path, default=default_cache_dir() / "bench-adapters",
                   help="where the adapters are made once and kept")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name, hub id or folder")
    p.add_argument("--output", type=Path, help="also write the report as markdown to this file "
                                               "(default bench/lora-serving-results.md; none with --quick)")
    p.add_argument("--plot", type=Path, help="PNG plot of goodput and TTFT p99 against the offered rate "
                                             "(default bench/lora-serving.png; none with --quick)")
    p.set_defaults(**FULL_DEFAULTS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse options; --quick swaps in QUICK_DEFAULTS under any explicitly given option."""
    parser = build_parser()
    args = parse_with_quick(parser, argv, QUICK_DEFAULTS)
    if args.drain is None:
        args.drain = args.duration
    if min(*args.adapters, args.unloaded_requests, args.saturation_requests, args.concurrency, args.rounds) < 1:
        parser.error("adapter counts, request counts, --concurrency and --rounds must be positive")
    if min(*args.rates, args.duration) <= 0 or args.drain < 0 or min(args.alpha) < 0:
        parser.error("--rates and --duration must be positive, --drain and --alpha not negative")
    return args


# ----- running workers ------------------------------------------------------------------------


@dataclass
class Runner:
    """Builds phases from the workload and runs systems in worker processes."""

    args: argparse.Namespace
    roots: dict[System, Path]  # where each system's engine package lives
    store: Path
    corpus: list[int]
    workdir: Path  # job and result files
    runs: int = 0

    def phase(self, name: str, mode: PhaseMode, requests: list[TraceRequest], concurrency: int = 1,
              cutoff: float = float("inf")) -> Phase:
        prompts = [prompt_window(self.corpus, r.input_tokens, r.text_offset) for r in requests]
        return Phase(name, mode, requests, prompts, concurrency, cutoff)

    def run(self, system: System, phases: list[Phase]) -> WorkerResult | None:
        """Run the phases on `system` in a new worker process; None (and an error logged) if it fails."""
        job = Job(system, str(self.roots[system]), self.args.model, str(self.store), self.args.max_batch_size,
                  self.args.lru_adapters, self.corpus[:WARMUP_PROMPT_TOKENS], phases)
        self.runs += 1
        stem = self.workdir / f"{self.runs:03d}-{system}"
        job.write(stem.with_suffix(".job.json"))
        command = [sys.executable, "-m", "bench.lora_worker", str(stem.with_suffix(".job.json")),
                   str(stem.with_suffix(".result.json"))]
        log.info("%s: %s", system, ", ".join(p.name for p in phases))
        try:
            finished = subprocess.run(command, cwd=ROOT, timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("%s: the worker took over %g s and was killed", system, WORKER_TIMEOUT_S)
            return None
        if finished.returncode != 0:
            log.error("%s: the worker failed (exit status %d; its log is above)", system, finished.returncode)
            return None
        return WorkerResult.read(stem.with_suffix(".result.json"))


# ----- the sweep ------------------------------------------------------------------------------


def calibrate(runner: Runner, group: Group, results: Results) -> None:
    """Unloaded latency and saturation of every system for `group`; the sweep's reference is ours'
    saturation, else the first system's."""
    args = runner.args
    spec = WorkloadSpec(group.adapters, group.alpha, seed=args.seed)
    unloaded = runner.phase("unloaded", "unloaded", closed_loop_requests(spec, args.unloaded_requests))
    closed = runner.phase("saturation", "closed", closed_loop_requests(spec, args.saturation_requests,
                                                                         skip=args.unloaded_requests),
                          concurrency=args.concurrency)
    calibrations = results.calibrations.setdefault(group, {})
    for system in args.systems:
        result = runner.run(system, [unloaded] if system == "peft" else [unloaded, closed])
        if result is not None:
            calibrations[system] = Calibration.of(system, result.phases["unloaded"], result.phases.get("saturation"))
    if not calibrations:
        raise RuntimeError(f"no system could be calibrated for {group.label()}")
    results.reference[group] = "ours" if "ours" in calibrations else next(iter(calibrations))


def sweep(runner: Runner, group: Group, results: Results) -> None:
    """Every arrival kind and rate of `group`, at multiples of the reference system's saturation."""
    args = runner.args
    saturation = results.calibrations[group][results.reference[group]].saturation
    for kind in args.arrivals:
        for multiple in args.rates:
            key = PointKey(group, kind, multiple, multiple * saturation)
            trace = build_trace(WorkloadSpec(group.adapters, group.alpha, kind, key.rate, args.duration, args.seed))
            if not trace:
                log.warning("no request arrives in %g s at %.2f req/s (%g x saturation): point skipped",
                            args.duration, key.rate, multiple)
                continue
            phase = runner.phase(f"{group.label()}, {kind} at {key.rate:.2f} req/s ({multiple:g}x)", "open", trace,
                                 cutoff=args.duration + args.drain)
            run_point(runner, key, phase, results)


def run_point(runner: Runner, key: PointKey, phase: Phase, results: Results) -> None:
    """One offered load: each calibrated system in turn (peft only up to --peft-max-rate), --rounds
    times in alternating order."""
    args = runner.args
    calibrations = results.calibrations[key.group]
    systems = [s for s in args.systems if s in calibrations and (s != "peft" or key.multiple <= args.peft_max_rate)]
    for order in round_orders(systems, args.rounds):
        for system in order:
            result = runner.run(system, [phase])
            if result is not None:
                results.add(key, Point(system, result.phases[phase.name], calibrations[system], args.duration))


# ----- setup ----------------------------------------------------------------------------------


def groups(args: argparse.Namespace) -> list[Group]:
    """Every (N, alpha) of the grid, once: with one adapter alpha changes nothing (the first is kept)."""
    return list(dict.fromkeys(Group(n, a if n > 1 else args.alpha[0]) for n in args.adapters for a in args.alpha))


def engine_roots(args: argparse.Namespace) -> dict[System, Path]:
    """This checkout for ours and peft, the --before-root worktree (checked) for before."""
    roots: dict[System, Path] = {"ours": ROOT, "peft": ROOT}
    if "before" in args.systems:
        head = git(args.before_root, "rev-parse", "HEAD") if (args.before_root / "engine").is_dir() else ""
        if not head.startswith(BEFORE_COMMIT):
            raise SystemExit(f"{args.before_root} is not a checkout of {BEFORE_COMMIT}: run "
                             f"`git worktree add --detach {args.before_root} {BEFORE_COMMIT}`, or leave out before")
        roots["before"] = args.before_root
    return roots


def git(root: Path, *arguments: str) -> str:
    """A git command's output in `root` ("" when it fails)."""
    done = subprocess.run(["git", "-C", str(root), *arguments], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def describe_checkout(root: Path) -> str:
    """`root`'s commit, and whether its engine/ has uncommitted changes."""
    dirty = " with uncommitted changes in engine/" if git(root, "status", "--porcelain", "--", "engine") else ""
    return f"{root} at {git(root, 'rev-parse', '--short', 'HEAD')}{dirty}"


def run(args: argparse.Namespace) -> str:
    """Make the adapters and the corpus, calibrate and sweep every group; return the markdown report."""
    roots = engine_roots(args)
    checkpoint, _ = resolve_checkpoint(args.model, None)
    store = store_folder(args.adapter_dir, Path(checkpoint).name)
    ensure_adapters(checkpoint, store, max(args.adapters))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    corpus = tokenizer(corpus_text(), add_special_tokens=False)["input_ids"]
    results = Results(engines={s: describe_checkout(roots[s]) for s in args.systems})
    with tempfile.TemporaryDirectory(prefix="lora-serving-") as workdir:
        runner = Runner(args, roots, store, corpus, Path(workdir))
        for group in groups(args):
            calibrate(runner, group, results)
            sweep(runner, group, results)
    if args.plot and results.points:
        plot(results, args.plot)
    return report(header(args, store, results), results)


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    args = parse_args(argv)
    publish(run(args), args.output)


if __name__ == "__main__":
    main()
