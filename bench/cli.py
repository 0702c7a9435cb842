"""What the benchmark scripts share on the command line: --quick parsing, logging, the report."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("bench")


def parse_with_quick(parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict) -> argparse.Namespace:
    """Parse options; with --quick, the `quick` defaults apply under any explicitly given option."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def setup_logging() -> None:
    """INFO lines with a time stamp; httpx's one line per request is silenced."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def publish(markdown: str, output: Path | None) -> None:
    """The report to stdout, and to `output` when given."""
    sys.stdout.write(markdown)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(markdown)
        log.info("report written to %s", output)
