"""The CPU LoRA kernel (engine/csrc/lora_kernel.cpp): built on first use, or the torch path.

The kernel computes the LoRA of a batch of tokens, each with its own adapter's pool rows, in
one call per layer (Punica's BGMV on the CPU; engine/lora.py says where it runs). Its ops, in
`torch.ops.lora_serve` once loaded (tokens [start, start + n) of x and out; token start + t
uses rows [first[t], first[t] + rank[t]), rank 0 none; first and rank int32 [n]):

- `shrink(x, a_rows [P + 1, members, in], first, rank, start, width)` -> h float32
  [members, n, width]: each token's dot products with its adapter's A rows, zeros past its rank;
- `expand_(out, h, b_rows: list [P + 1, out_m], columns: list, first, rank, start)`: adds
  member m's `h @ B rows` into out's columns [columns[m], columns[m] + out_m), in place;
- `add_lora_(out, x, a_rows, b_rows, columns, first, rank, start)`: both in one call.

x, a_rows, b_rows and out share one dtype (float32, bfloat16 or float16) and sum in float32.

It is built by engine/native_build.py (torch's extension cache, once per source version and
torch version; `make install` builds it: `python -m engine.lora_kernel`). When the build fails
(no compiler, no ninja), `load_kernel` logs one warning saying why and returns None: the
torch path runs instead.

Thread: load on any thread (torch serializes builds with a lock file); the ops run on the
engine's worker thread.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.native_build import CSRC, kernel_wanted, load_library, versioned

log = logging.getLogger(__name__)

NAME = versioned("lora_serve_kernel")
SOURCES = (CSRC / "lora_kernel.cpp",)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LoraKernel:
    """The loaded ops (module docstring)."""

    shrink: Callable[..., torch.Tensor]
    expand_: Callable[..., None]
    add_lora_: Callable[..., None]


@functools.cache
def load_kernel() -> LoraKernel | None:
    """The kernel, built on the first call in the process (a cached build loads in well under
    a second); None, with one warning, when it cannot be built or loaded."""
    return build()


def build(name: str = NAME, sources: tuple[Path, ...] = SOURCES, build_directory: Path | None = None) -> LoraKernel | None:
    """Build (or load the cached build of) `sources` as the library `name` and return its ops;
    None, with one warning saying why, when that fails. `build_directory`: default torch's."""
    if not load_library(name, sources, "LoRA kernel", build_directory):
        return None
    ops = torch.ops.lora_serve
    return LoraKernel(ops.shrink.default, ops.expand_.default, ops.add_lora_.default)


def kernel_for(setting: str, device: torch.device, dtype: torch.dtype) -> LoraKernel | None:
    """The kernel when `setting` ("auto" | "torch", EngineConfig.lora_kernel) allows it for a
    model on `device` in `dtype`; None means the torch path (logged with why when "auto"
    cannot use the kernel: a warning for a failed build, info for a GPU or another dtype,
    where torch ops are the plan)."""
    if not kernel_wanted(setting, "lora_kernel"):
        return None
    if device.type != "cpu" or dtype not in DTYPES:
        log.info("LoRA kernel not used for a %s model on %s: the torch path", dtype, device.type)
        return None
    return load_kernel()


def main(argv: list[str] | None = None) -> None:
    """Build (or load the cached build) and say how long it took."""
    argparse.ArgumentParser(description="Build the CPU LoRA kernel into torch's extension cache.").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    if load_kernel() is None:
        raise SystemExit("the LoRA kernel did not build (see the warning above); the engine uses the torch path")
    log.info("ready after %.1f s", time.perf_counter() - started)


if __name__ == "__main__":
    main()
