"""Which model families the paged KV cache serves: exact greedy output, or a clear refusal."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, MistralConfig, Qwen2Config

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.request import Delta, GenerationRequest
from tests.tiny_models import build_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = ["Hello there", "What is the capital of France? The capital", "Привет, мир! 🙂"]
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.15,
              eos_token_id=2, pad_token_id=2, bos_token_id=0)
CONFIGS = {
    "mistral": lambda vocab: MistralConfig(vocab_size=vocab, sliding_window=None, **COMMON),
    "qwen2": lambda vocab: Qwen2Config(vocab_size=vocab, use_sliding_window=False, **COMMON),
}


def save_model(config, directory):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


async def collect(engine: Engine, prompt: list[int]) -> list[int]:
    return [t async for delta in engine.submit(GenerationRequest(prompt, GREEDY)) if isinstance(delta, Delta)
            for t in delta.token_ids]


@pytest.mark.parametrize("family", sorted(CONFIGS))
async def test_family_matches_hf_generate(family, tmp_path):
    tokenizer = build_tokenizer()
    model, tokenizer = save_model(CONFIGS[family](len(tokenizer)), tmp_path)
    engine = Engine.from_config(EngineConfig(model=str(tmp_path), dtype="float32", device="cpu", kv_block_size=4))
    try:
        prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
        outputs = await asyncio.gather(*(collect(engine, p) for p in prompts))
    finally:
        await engine.close()
    for prompt, tokens in zip(prompts, outputs):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                      min_new_tokens=16, do_sample=False, pad_token_id=2)
        assert tokens == expected[0, len(prompt):].tolist()


def test_other_families_are_refused_with_a_clear_error(tmp_path):
    tokenizer = build_tokenizer()
    save_model(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2), tmp_path)
    with pytest.raises(NotImplementedError, match="model type 'gpt2' is not supported"):
        Engine.from_config(EngineConfig(model=str(tmp_path), dtype="float32", device="cpu"))
