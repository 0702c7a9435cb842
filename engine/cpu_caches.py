"""Bound oneDNN's shape-keyed caches, so a CPU replica's memory is flat after warm-up.

On CPU, bf16 matmuls (packed or not) run in oneDNN, and two caches keep what each new input
shape needs: oneDNN's primitive cache (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) and ideep's
computation cache in torch (`LRU_CACHE_CAPACITY`), 1024 entries each by default. The packed
forward (engine/runner.py) gives every step a new token count, so every step adds entries,
each holding its kernel and scratch memory: unbounded by us, a replica's heap grows with
every request until the default capacity is reached. `ONEDNN_CACHE_CAPACITY` entries bound
that growth without slowing a mixed-length workload, with room for the LoRA matmuls' shapes
(the measurements behind the number: bench/README.md, Design notes, and Soak).

Both libraries read their variable once, when they first run (for oneDNN: the first
primitive of the process), so `bound_onednn_caches` must run before any CPU matmul or
weight reorder; `load_model` calls it first thing. It sets only variables the user has not
set. It changes nothing on CUDA, where oneDNN is not used.
"""

from __future__ import annotations

import os

ONEDNN_CACHE_CAPACITY = 256
CACHE_CAPACITY_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Cap both caches at `capacity` entries for this process, unless already configured."""
    for name in CACHE_CAPACITY_VARIABLES:
        os.environ.setdefault(name, str(capacity))
