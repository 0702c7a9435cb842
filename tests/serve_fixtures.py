"""What the tests that talk HTTP share: the served model's name, and the app in a local Ray
(deployments/local.py, which the benchmarks use too)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deployments.local import ROOT, llm_handle, local_app

__all__ = ["ROOT", "SERVED_MODEL", "llm_handle", "local_app", "local_ray", "log_lines_after"]

SERVED_MODEL = "tiny"


@contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[None]:
    """deployments.local.local_ray, with the replicas' logs shown when TEST_RAY_LOGS=1."""
    from deployments.local import local_ray as start

    with start(num_cpus, log_to_driver=os.environ.get("TEST_RAY_LOGS") == "1"):
        yield


def log_lines_after(path: Path, seen: int, timeout_s: float = 10) -> list[str]:
    """The request log's lines after its first `seen`, waiting up to `timeout_s` for one."""
    deadline = time.monotonic() + timeout_s
    while len(lines := path.read_text().splitlines()) <= seen and time.monotonic() < deadline:
        time.sleep(0.05)
    return lines[seen:]
