"""oneDNN's shape-keyed caches stay bounded once `load_model` has run (engine/cpu_caches.py).

Each case runs in a fresh interpreter, because both caches read their capacity once per
process: it loads the tiny model in bf16 on CPU (which must set the bound before any op),
then runs bf16 matmuls of 1,200 distinct row counts, as the packed forward's steps do, and
reports the live heap after every 300. The control sets the libraries' default capacity
itself, so the test fails if the bound stops taking effect (set too late, or ignored).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CAPACITY = "1024"  # oneDNN's and ideep's own default

SCRIPT = """
import ctypes, json, sys, torch
from engine.config import EngineConfig
from engine.loader import load_model

libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2

def live_mib():
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20

load_model(EngineConfig(model=sys.argv[1], dtype="bfloat16", device="cpu"))
weight = torch.randn(1024, 256, dtype=torch.bfloat16)
marks = []
with torch.inference_mode():
    for rows in range(1, 1201):
        torch.nn.functional.linear(torch.randn(rows, 256, dtype=torch.bfloat16), weight)
        if rows % 300 == 0:
            marks.append(live_mib())
print(json.dumps(marks))
"""


def heap_marks(model_dir: Path, env_update: dict[str, str]) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    env.update(env_update, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(model_dir)], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_load_model_bounds_onednn_caches_for_the_process(tiny_model_dir):
    control = heap_marks(tiny_model_dir, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": DEFAULT_CAPACITY,
                                          "LRU_CACHE_CAPACITY": DEFAULT_CAPACITY})
    if control[-1] - control[0] < 50:
        pytest.skip("this CPU's bf16 matmuls do not run in oneDNN: nothing to bound")
    bounded = heap_marks(tiny_model_dir, {})
    assert bounded[-1] - bounded[0] < 10, f"live heap grew after warm-up: {bounded} MiB (default: {control})"


def test_a_capacity_the_user_set_is_kept(monkeypatch):
    from engine.cpu_caches import bound_onednn_caches

    monkeypatch.setenv("LRU_CACHE_CAPACITY", "2048")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    bound_onednn_caches(256)
    assert os.environ["LRU_CACHE_CAPACITY"] == "2048"
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"
