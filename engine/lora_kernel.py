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

`torch.utils.cpp_extension.load` builds it with the system's C++ compiler and ninja into
torch's extension cache (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions), once per
source version; later processes load the cached library. `make install` builds it
(`python -m engine.lora_kernel`), so tests and servers find it ready. When the build fails
(no compiler, no ninja), `load_kernel` logs one warning saying why and returns None: the
torch path runs instead.

Thread: load on any thread (torch serializes builds with a lock file); the ops run on the
engine's worker thread.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# One build per torch version (torch's cache is keyed by the sources and flags, not by torch).
NAME = "lora_serve_kernel_" + re.sub(r"[^0-9A-Za-z]", "_", torch.__version__)
SOURCES = (Path(__file__).resolve().parent / "csrc" / "lora_kernel.cpp",)
# -O3: load() adds no optimization flag of its own (-O2 builds in half the time, 18 s here,
# and runs a step's calls at one adapter about 30% slower). No -march: the source picks the
# instruction set per CPU at run time (target_clones), so a cached build runs on any CPU.
# -fopenmp: at::parallel_for is inline and runs serially without it; the library then links
# libgomp.so.1, the runtime torch itself loaded (torch ships it), so both share one thread pool.
OPENMP = ("-fopenmp",) if sys.platform.startswith("linux") else ()
CFLAGS = ("-O3", "-Wno-psabi", *OPENMP)
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
    from torch.utils import cpp_extension

    started = time.perf_counter()
    _find_ninja()
    try:
        cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_cflags=list(CFLAGS),
                           extra_ldflags=list(OPENMP), is_python_module=False, verbose=False,
                           build_directory=str(build_directory) if build_directory else None)
    except Exception as error:  # noqa: BLE001 - whatever stops the build (compiler, ninja, headers), the torch path runs
        log.warning("LoRA kernel not available, using the torch path: %s", _reason(error))
        log.debug("LoRA kernel build failed", exc_info=True)
        return None
    ops = torch.ops.lora_serve
    log.info("LoRA kernel loaded in %.1f s", time.perf_counter() - started)
    return LoraKernel(ops.shrink.default, ops.expand_.default, ops.add_lora_.default)


def _find_ninja() -> None:
    """torch looks for `ninja` on PATH; the one requirements.txt installs sits beside this
    interpreter, which is not on PATH when the venv's python is run by its path (make, Ray
    workers). Put that folder at PATH's end when PATH has no ninja of its own."""
    scripts = Path(sys.executable).parent
    if shutil.which("ninja") is None and (scripts / "ninja").exists():
        os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), str(scripts)])


def _reason(error: Exception) -> str:
    """One line of a failed build: the compiler's first error, else the message's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if "error:" in line or "not found" in line), lines[0])[:300]


def kernel_for(setting: str, device: torch.device, dtype: torch.dtype) -> LoraKernel | None:
    """The kernel when `setting` ("auto" | "torch", EngineConfig.lora_kernel) allows it for a
    model on `device` in `dtype`; None means the torch path (logged with why when "auto"
    cannot use the kernel: a warning for a failed build, info for a GPU or another dtype,
    where torch ops are the plan)."""
    if setting == "torch":
        return None
    if setting != "auto":
        raise ValueError(f"lora_kernel must be 'auto' or 'torch', not {setting!r}")
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
