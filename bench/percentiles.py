"""Percentiles of measured values, shared by the benchmark scripts (no other imports, so that
processes running another checkout's engine can use them too)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def safe_percentile(values: Sequence[float], q: float) -> float:
    """percentile(), or NaN for no values."""
    return percentile(values, q) if values else math.nan
