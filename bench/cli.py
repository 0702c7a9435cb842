"""What the benchmark scripts share on the command line: --quick parsing, logging, the report."""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deployments.local import WORKER_NICENESS

log = logging.getLogger("bench")


def parse_with_quick(parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict) -> argparse.Namespace:
    """Parse options; with --quick, the `quick` defaults apply under any explicitly given option."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def add_system_options(parser: argparse.ArgumentParser, systems: Sequence[str], config: Path,
                       timeout_s: float) -> None:
    """--systems (a subset of `systems`, in order), --config (serve config file), --timeout, --ray-logs."""
    parser.add_argument("--systems", nargs="+", choices=systems, default=list(systems),
                        help="which systems to measure, in this order")
    parser.add_argument("--config", type=Path, default=config,
                        help="serve config whose first application's args the serve system uses")
    parser.add_argument("--timeout", type=float, default=timeout_s, help="seconds a request may take")
    parser.add_argument("--ray-logs", action="store_true", help="show the Ray workers' logs")
    parser.add_argument("--ray-worker-niceness", type=int, default=WORKER_NICENESS,
                        help=f"niceness of the serve system's Ray workers (default {WORKER_NICENESS}; "
                             "Ray's own default is 15)")


def add_rounds_option(parser: argparse.ArgumentParser) -> None:
    """--rounds: measure every system this many times, alternating the order (see round_orders)."""
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each system this many times, in alternating order; ratios are the "
                             "median of the per-round ratios (this machine's speed drifts within minutes)")


def round_orders(systems: Sequence[str], rounds: int) -> list[list[str]]:
    """The systems' order per round: as given, then reversed, and so on, so that a slow drift
    of the machine's speed favours no system; every system's rounds pair with its neighbours'."""
    return [list(systems) if r % 2 == 0 else list(reversed(systems)) for r in range(rounds)]


def median_cell(values: Sequence[float], digits: int = 2) -> str:
    """A table cell: the median of the finite values, and each value in round order."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "-"
    median = statistics.median(finite)
    if len(values) == 1:
        return fmt(median, digits)
    return f"**{fmt(median, digits)}** ({' / '.join(fmt(v, digits) for v in values)})"


def add_report_options(parser: argparse.ArgumentParser, plot_help: str) -> None:
    """--output (the markdown report) and --plot (a PNG)."""
    parser.add_argument("--output", type=Path, help="also write the report as markdown to this file")
    parser.add_argument("--plot", type=Path, help=plot_help)


def setup_logging() -> None:
    """INFO lines with a time stamp; httpx's one line per request is silenced."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


@contextmanager
def figure(path: Path, size: tuple[float, float] = (11, 4.2)) -> Iterator[Any]:
    """Two matplotlib axes side by side (Agg backend) to draw on; on exit the figure is laid out,
    written to `path` as a PNG and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=size)
    try:
        yield axes
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        log.info("plot written to %s", path)
    finally:
        plt.close(fig)


def label_axis(axis: Any, title: str, xlabel: str, ylabel: str) -> None:
    """Title, axis labels, a light grid and the legend of one matplotlib axis."""
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend()


def publish(markdown: str, output: Path | None) -> None:
    """The report to stdout, and to `output` when given."""
    sys.stdout.write(markdown)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(markdown)
        log.info("report written to %s", output)


def fmt(value: float | None, digits: int = 2) -> str:
    """A table cell: the number rounded, or "-" when there is none."""
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"
