"""The CPU bf16 attention kernel (engine/csrc/attention_kernel.cpp): built on first use.

Its ops, in `torch.ops.lora_serve_attention` once loaded, held by an `AttentionKernel`:

- `attend(q [H, M, D], keys [H, S, D], values [H, S, D], slots int32 [N], queries, scale)` ->
  [H, M, D]: causal attention of a prompt chunk of `queries` tokens (the context's last) over
  a context of N keys lying in cache slots `slots`, H KV heads with the query heads of each
  folded into M (row g * queries + i is query i of head g), bf16 in and out, fp32 scores and
  softmax, probabilities rounded to bf16 for the product with the values (as flash attention
  does on GPUs).
- `decode(q [R, Hq, D], keys, values, slots int32 [N], offsets int32 [R + 1], scale)` ->
  [R, Hq, D]: one query token per row (a step's decode rows), row r over the keys in
  `slots[offsets[r]:offsets[r + 1]]` (all visible), fp32 scores, softmax and probabilities.

They need AVX-512 BF16; `kernel_for` returns None on CPUs without it, for other dtypes and
devices, and when the build failed (one warning): the caller then uses SDPA.

Built by engine/native_build.py; `make install` builds it (`python -m engine.attention_kernel`).

Thread: load on any thread; the op runs on the engine's worker thread.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.native_build import CSRC, kernel_wanted, load_library, versioned

log = logging.getLogger(__name__)

NAME = versioned("lora_serve_attention")
SOURCES = (CSRC / "attention_kernel.cpp",)

MAX_HEAD_DIM = 512  # and a multiple of 16 (the kernel's vectors of 16 floats)
AttendOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]
DecodeOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class AttentionKernel:
    """The kernel's two ops (see the module docstring)."""

    attend: AttendOp
    decode: DecodeOp


@functools.cache
def load_kernel() -> AttentionKernel | None:
    """The ops, built on the first call in the process; None when they cannot be built
    (one warning) or this CPU lacks AVX-512 BF16 (one info line)."""
    if not load_library(NAME, SOURCES, "bf16 attention kernel"):
        return None
    ops = torch.ops.lora_serve_attention
    if not ops.supported():
        log.info("bf16 attention kernel not used: this CPU has no AVX-512 BF16 (SDPA runs instead)")
        return None
    return AttentionKernel(ops.attend.default, ops.decode.default)


def kernel_for(setting: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> AttentionKernel | None:
    """The ops when `setting` ("auto" | "torch", EngineConfig.attention_kernel) allows it for
    a model on `device` in `dtype` with heads of `head_dim`; None means SDPA."""
    if not kernel_wanted(setting, "attention_kernel"):
        return None
    if device.type != "cpu" or dtype != torch.bfloat16 or head_dim % 16 or head_dim > MAX_HEAD_DIM:
        return None
    return load_kernel()


def main(argv: list[str] | None = None) -> None:
    """Build (or load the cached build) and say how long it took."""
    argparse.ArgumentParser(description="Build the CPU bf16 attention kernel into torch's extension cache.").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    if load_kernel() is None:
        log.warning("the bf16 attention kernel is not available here: the engine uses SDPA")
        return
    log.info("ready after %.1f s", time.perf_counter() - started)


if __name__ == "__main__":
    main()
