"""Model loading: device and dtype choice, checkpoint resolution, the real default model."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.loader import builtin_gguf_path, cpu_supports_bf16, load_model, resolve_checkpoint, resolve_device, resolve_dtype
from engine.prompt import ChatMessage
from engine.request import Delta

CPU = torch.device("cpu")


def test_dtype_auto_follows_the_hardware():
    assert resolve_dtype("float16", CPU) == torch.float16
    assert resolve_dtype("auto", CPU) == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error():
    assert resolve_device("auto") == CPU
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_checkpoint_names_resolve(tmp_path):
    assert resolve_checkpoint("meta-llama/Llama-2-7b-hf", None) == ("meta-llama/Llama-2-7b-hf", None)
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_checkpoint(str(gguf), None) == (str(tmp_path), "model.Q4.gguf")
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path / "missing.gguf"), None)
    assert builtin_gguf_path("smollm2-135m-instruct").is_file()


def test_local_folder_loads_with_its_limits(tiny_model_dir):
    loaded = load_model(EngineConfig(model=str(tiny_model_dir), dtype="float32"))
    assert loaded.device == CPU and loaded.dtype == torch.float32
    assert loaded.context_window == 2048 and loaded.eos_token_ids == {2}
    assert not loaded.model.training


@pytest.mark.slow
async def test_default_model_knows_the_capital_of_france():
    engine = Engine.from_config(EngineConfig())
    try:
        request = engine.chat_request(
            [ChatMessage("user", "What is the capital of France?")], SamplingParams(temperature=0, max_tokens=32)
        )
        text = "".join([d.text async for d in engine.submit(request) if isinstance(d, Delta)])
        assert "Paris" in text
    finally:
        await engine.close()


@pytest.mark.slow
def test_gguf_file_loads_directly():
    loaded = load_model(EngineConfig(model=str(builtin_gguf_path("smollm2-135m-instruct")), dtype="float32"))
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, ids.shape[1]:])
