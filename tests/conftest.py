"""Shared fixtures: tiny random models and adapters on disk, engines over them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import EngineConfig
from engine.engine import Engine
from tests.error_bodies import PARSING, error_payloads, leaks
from tests.tiny_models import save_tiny_adapter, save_tiny_model


@pytest.fixture(autouse=True)
def error_bodies(monkeypatch) -> list[str]:
    """Every error body this test's HTTP clients read; the test fails if one shows internals."""
    seen: list[str] = []
    iter_raw, aiter_raw = httpx.Response.iter_raw, httpx.Response.aiter_raw

    def record(response: httpx.Response, chunks: list[bytes]) -> None:
        if PARSING not in response.extensions:  # error_payloads reads a stream through httpx too
            seen.extend(error_payloads(response.status_code, b"".join(chunks)))

    def recording_iter_raw(self, *args, **kwargs):
        chunks = []
        try:
            for chunk in iter_raw(self, *args, **kwargs):
                chunks.append(chunk)
                yield chunk
        finally:
            record(self, chunks)

    async def recording_aiter_raw(self, *args, **kwargs):
        chunks = []
        try:
            async for chunk in aiter_raw(self, *args, **kwargs):
                chunks.append(chunk)
                yield chunk
        finally:
            record(self, chunks)

    monkeypatch.setattr(httpx.Response, "iter_raw", recording_iter_raw)
    monkeypatch.setattr(httpx.Response, "aiter_raw", recording_aiter_raw)
    yield seen
    assert not leaks(seen), f"error bodies show server internals: {leaks(seen)}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two random LoRA adapters on different modules, and one whose weights are NaN."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": save_tiny_adapter(tiny_model_dir, root / "alpha", seed=1),
        "beta": save_tiny_adapter(tiny_model_dir, root / "beta", seed=2, targets=("o_proj", "up_proj")),
        "broken": save_tiny_adapter(tiny_model_dir, root / "broken", seed=3, fill=float("nan")),
    }


@pytest.fixture
def engine_config(tiny_model_dir) -> EngineConfig:
    return EngineConfig(model=str(tiny_model_dir), dtype="float32", device="cpu", max_tokens_cap=400)


@pytest.fixture
async def engine(engine_config):
    engine = Engine.from_config(engine_config)
    yield engine
    await engine.close()


@pytest.fixture
def make_engine(engine_config):
    """Engines with 4-token KV blocks (and other settings), for tests that drive `core.step()`."""
    engines = []

    def make(**settings) -> Engine:
        engines.append(Engine.from_config(engine_config.model_copy(update={"kv_block_size": 4, **settings})))
        return engines[-1]

    yield make
    for engine in engines:
        engine.core.abort_all("test over")


@pytest.fixture(scope="session")
def request_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs") / "requests.log"


@pytest.fixture(scope="session")
def served(tiny_model_dir, adapter_dirs, request_log):
    """The API app ("llm", at /) and the chat page app ("ui", at /ui) on the tiny model; yields the URL."""
    from ray import serve

    from deployments.ui.page import build_ui_app
    from tests.serve_fixtures import SERVED_MODEL, local_app, local_ray

    args = {
        "model": str(tiny_model_dir),
        "served_model_name": SERVED_MODEL,
        "dtype": "float32",
        "num_cpus": 0,
        "adapters": {"alpha": str(adapter_dirs["alpha"]), "beta": str(adapter_dirs["beta"])},
        "max_tokens_cap": 2000,
        "max_input_tokens": 1024,
        "repetition_guard": {"min_repeats": 0},  # greedy tiny models loop: Stop tests need replies that run on
        "request_log_file": str(request_log),
        "allow_runtime_adapters": True,  # tests/test_serve.py loads and unloads adapters at run time
        "batch": {"batch_size": 4, "stream_interval_s": 0.0, "defaults": {"temperature": 0.0}},
    }
    with local_ray(), local_app(args) as url:
        serve.run(build_ui_app({"llm_app": "llm"}), name="ui", route_prefix="/ui")
        yield url


@pytest.fixture(scope="session")
def reference(tiny_model_dir):
    """HF `generate` greedy on a separately loaded copy: the ground truth for the engine."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    models = {None: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()}

    def generate(prompt_ids: list[int], max_new_tokens: int, adapter_dir: Path | None = None) -> list[int]:
        """Greedy continuation of one prompt, without the end-of-sequence token."""

        key = str(adapter_dir) if adapter_dir else None
        if key not in models:
            base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            models[key] = PeftModel.from_pretrained(base, adapter_dir).eval()
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            out = models[key].generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )
        tokens = out[0, len(prompt_ids):].tolist()
        return tokens[: tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens

    return generate
