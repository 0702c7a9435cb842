"""What the tests that talk HTTP share: the served model's name, and the app in a local Ray
(deployments/local.py, which the benchmarks use too)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from deployments.local import ROOT, llm_handle, local_app

__all__ = ["ROOT", "SERVED_MODEL", "llm_handle", "local_app", "local_ray"]

SERVED_MODEL = "tiny"


@contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[None]:
    """deployments.local.local_ray, with the replicas' logs shown when TEST_RAY_LOGS=1."""
    from deployments.local import local_ray as start

    with start(num_cpus, log_to_driver=os.environ.get("TEST_RAY_LOGS") == "1"):
        yield
