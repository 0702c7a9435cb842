"""Adapters on demand and their tiers (engine/adapters.py) on a tiny model: loads from a store on
first use, one load for concurrent requests, errors by kind, budgets in bytes and slots, loads
that overlap the steps, and outputs equal to PEFT's whatever tier an adapter came from."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.errors import AdapterNotFoundError, AdapterTimeoutError, InvalidRequestError
from engine.loader import load_model
from engine.request import Delta, GenerationRequest
from tests.tiny_models import LONG_TEXT, ids, save_tiny_adapter

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory) -> Path:
    """A store folder: adapters of mixed ranks and targets, one nested, one not an adapter."""
    root = tmp_path_factory.mktemp("store")
    save_tiny_adapter(tiny_model_dir, root / "a8", seed=11)
    save_tiny_adapter(tiny_model_dir, root / "b16", seed=12, targets=("o_proj", "up_proj"), rank=16)
    save_tiny_adapter(tiny_model_dir, root / "team" / "c4", seed=13, targets=("q_proj", "down_proj"), rank=4)
    save_tiny_adapter(tiny_model_dir, root / "d32", seed=14, targets=("k_proj", "gate_proj"), rank=32)
    (root / "not-an-adapter").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    return root


@pytest.fixture
def store_config(engine_config, store) -> EngineConfig:
    return engine_config.model_copy(update={"adapter_stores": [str(store)], "kv_block_size": 4})


async def collect(engine: Engine, request: GenerationRequest) -> list[int]:
    tokens = []
    async for delta in engine.submit(request):
        if not isinstance(delta, Delta):  # the RequestEnd after the deltas
            continue
        tokens += delta.token_ids
        if delta.finish_reason:
            assert delta.finish_reason in ("stop", "length"), delta.error
    return tokens


async def test_adapters_load_from_the_store_on_first_use_and_match_peft(store_config, store, reference):
    engine = Engine.from_config(store_config)
    try:
        prompt = ids(engine, LONG_TEXT)
        for name in ("a8", "team/c4", "b16", "d32"):
            assert await engine.ensure_adapter(name) > 0  # cold
            assert await engine.ensure_adapter(name) == 0.0  # warm
        requests = [GenerationRequest(prompt, GREEDY, name) for name in ("a8", "team/c4", "b16", "d32", None)]
        outputs = await asyncio.gather(*(collect(engine, r) for r in requests))
        for request, tokens in zip(requests, outputs):
            folder = store / request.adapter if request.adapter else None
            assert tokens == reference(prompt, 8, folder), request.adapter
        report = engine.adapter_report()
        assert set(report.names("active", "host")) == {"a8", "team/c4", "b16", "d32"}
    finally:
        await engine.close()


async def test_concurrent_requests_for_a_cold_adapter_wait_on_one_load(store_config):
    engine = Engine.from_config(store_config)
    try:
        waits = await asyncio.gather(*(engine.ensure_adapter("a8") for _ in range(5)))
        assert all(wait > 0 for wait in waits)
        loads = [e for e in engine.adapter_events() if e.kind == "load"]
        assert [e.adapter for e in loads] == ["a8"]
    finally:
        await engine.close()


@pytest.mark.parametrize(("name", "error", "words"), [
    ("missing", AdapterNotFoundError, "'missing'"),
    ("team/missing", AdapterNotFoundError, "'team/missing'"),
    ("not-an-adapter", InvalidRequestError, "not-an-adapter"),
    ("broken", InvalidRequestError, "broken"),
    ("../a8", InvalidRequestError, "../a8"),
    ("/etc", InvalidRequestError, "/etc"),
])
async def test_store_errors_name_the_adapter_and_leave_nothing_behind(store_config, name, error, words):
    engine = Engine.from_config(store_config)
    try:
        with pytest.raises(error, match=words.replace(".", r"\.").replace("/", "/")):
            await engine.ensure_adapter(name)
        assert engine.adapter_report().adapters == []
        assert await engine.ensure_adapter("a8") > 0  # the engine goes on
    finally:
        await engine.close()


class SlowStore:
    """A store that answers after `release` is set: what a slow bucket looks like."""

    def __init__(self, root: Path):
        self.root = root
        self.release = threading.Event()

    def fetch(self, name: str) -> Path:
        self.release.wait(10)
        return self.root / name

    def names(self, limit: int) -> list[str]:
        return []


async def test_a_slow_store_times_out_without_queueing_and_steps_go_on(store_config, store, reference):
    config = store_config.model_copy(update={"adapter_load_timeout_s": 0.3})
    slow = SlowStore(store)
    engine = Engine(load_model(config), config, stores=slow)
    try:
        prompt = ids(engine, LONG_TEXT)
        base = asyncio.create_task(collect(engine, GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=40))))
        steps_before = engine.stats().steps
        with pytest.raises(AdapterTimeoutError, match="'a8'"):
            await engine.ensure_adapter("a8")
        assert engine.stats().steps > steps_before  # the base request kept stepping during the load
        assert engine.stats().waiting == 0  # the timed-out request never queued
        slow.release.set()
        assert await base == reference(prompt, 40)
        for _ in range(100):  # the load went on and serves the next request
            if "a8" in engine.adapters.names:
                break
            await asyncio.sleep(0.05)
        assert await engine.ensure_adapter("a8") == 0.0
        assert await collect(engine, GenerationRequest(prompt, GREEDY, "a8")) == reference(prompt, 8, store / "a8")
    finally:
        slow.release.set()
        await engine.close()


async def test_more_adapters_than_slots_all_finish_correctly(store_config, store, reference):
    """One slot: rows of four adapters take turns; eviction never takes a running row's adapter."""
    engine = Engine.from_config(store_config.model_copy(update={"max_active_adapters": 1}))
    try:
        prompt = ids(engine, LONG_TEXT)
        names = ["a8", "team/c4", "b16", "d32", "a8", "b16"]
        for name in set(names):
            await engine.ensure_adapter(name)
        outputs = await asyncio.gather(*(collect(engine, GenerationRequest(prompt, GREEDY, n)) for n in names))
        for name, tokens in zip(names, outputs):
            assert tokens == reference(prompt, 8, store / name), name
        kinds = [e.kind for e in engine.adapter_events()]
        assert kinds.count("deactivate") >= 3
        assert len(engine.adapter_report().names("active")) == 1
    finally:
        await engine.close()


async def test_host_memory_budget_evicts_least_recently_used_but_never_a_needed_adapter(store_config):
    engine = Engine.from_config(store_config.model_copy(update={"adapter_host_memory": 1}))  # room for none
    try:
        await engine.ensure_adapter("a8")
        assert engine.adapters.names == ["a8"]  # over budget, but nothing else to evict
        prompt = ids(engine, LONG_TEXT)
        held = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=30), "a8"))
        await engine.ensure_adapter("b16")
        assert "a8" in engine.adapters.names  # a request needs it: kept
        async for _ in held:
            pass
        await engine.ensure_adapter("d32")  # b16 is idle now and goes; a8 is in the device pool
        assert engine.adapters.names == ["a8", "d32"]
        assert [e.adapter for e in engine.adapter_events() if e.kind == "evict"] == ["b16"]
        assert engine.adapter_report().names("active") == ["a8"]
    finally:
        await engine.close()


async def test_an_adapter_larger_than_the_device_pool_is_refused(store_config):
    engine = Engine.from_config(store_config)
    rows = engine.lora.capacity_rows
    await engine.close()
    small = store_config.model_copy(update={"adapter_device_memory": (20 * engine.lora.bytes_per_row)})
    engine = Engine.from_config(small)  # 20 rows: a rank-32 adapter can never be placed
    try:
        assert rows > 20
        with pytest.raises(InvalidRequestError, match="'d32' has rank 32, more than the 20 rows"):
            await engine.ensure_adapter("d32")
        assert await engine.ensure_adapter("b16") > 0
    finally:
        await engine.close()


async def test_pinned_and_configured_adapters(engine_config, store, adapter_dirs):
    config = engine_config.model_copy(update={
        "adapters": {"alpha": str(adapter_dirs["alpha"])}, "adapter_stores": [str(store)],
        "pinned_adapters": ["a8"], "adapter_host_memory": 1,
    })
    engine = Engine.from_config(config)
    try:
        report = {a.name: a for a in engine.adapter_report().adapters}
        assert report["a8"].pinned and "alpha" not in report  # read first, evicted for the pinned one
        assert await engine.ensure_adapter("alpha") > 0  # a configured adapter comes back from its folder
        await engine.ensure_adapter("b16")
        assert set(engine.adapters.names) == {"a8", "b16"}  # alpha (unpinned, idle) went again, a8 stays
    finally:
        await engine.close()
