"""Building the engine's C++ kernels (engine/csrc/) into torch's extension cache.

`torch.utils.cpp_extension.load` builds a library with the system's C++ compiler and ninja
into torch's extension cache (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions),
once per source version; later processes load the cached library, whose ops then sit in
`torch.ops.<namespace>`. `make install` builds every kernel, so tests and servers find them
ready. A failed build (no compiler, no ninja) is logged as one warning saying why: the
caller runs its torch path instead.

Thread: any (torch serializes builds with a lock file).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
# -O3: load() adds no optimization flag of its own. No -march: sources pick the instruction
# set per CPU at run time (target_clones, target attributes), so a cached build runs on any
# CPU. -fopenmp: at::parallel_for is inline and runs serially without it; the library then
# links libgomp.so.1, the runtime torch itself loaded (torch ships it): one thread pool.
OPENMP = ("-fopenmp",) if sys.platform.startswith("linux") else ()
CFLAGS = ("-O3", "-Wno-psabi", *OPENMP)


def versioned(name: str) -> str:
    """`name` for this torch version and this checkout. torch's cache keeps one build per name
    and rebuilds it when the sources' paths or flags change, so two checkouts (or worktrees)
    sharing one name would rebuild it in turn, a minute each; torch's version is not in its key."""
    torch_version = re.sub(r"[^0-9A-Za-z]", "_", torch.__version__)
    checkout = hashlib.sha256(str(CSRC).encode()).hexdigest()[:8]
    return f"{name}_{torch_version}_{checkout}"


def kernel_wanted(setting: str, field: str) -> bool:
    """Whether an "auto" | "torch" kernel setting (EngineConfig `field`) asks for the kernel;
    ValueError for any other value."""
    if setting not in ("auto", "torch"):
        raise ValueError(f"{field} must be 'auto' or 'torch', not {setting!r}")
    return setting == "auto"


def load_library(name: str, sources: tuple[Path, ...], what: str, build_directory: Path | None = None) -> bool:
    """Build (or load the cached build of) `sources` as the library `name`; False, with one
    warning naming `what` and why, when that fails. `build_directory`: default torch's."""
    from torch.utils import cpp_extension

    started = time.perf_counter()
    _find_ninja()
    try:
        cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_cflags=list(CFLAGS),
                           extra_ldflags=list(OPENMP), is_python_module=False, verbose=False,
                           build_directory=str(build_directory) if build_directory else None)
    except Exception as error:  # noqa: BLE001 - whatever stops the build (compiler, ninja, headers), the torch path runs
        log.warning("%s not available, using the torch path: %s", what, _reason(error))
        log.debug("%s build failed", what, exc_info=True)
        return False
    log.info("%s loaded in %.1f s", what, time.perf_counter() - started)
    return True


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
