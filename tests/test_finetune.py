"""The LoRA fine-tuning command on the tiny model, and the shipped pirate adapter on the real one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from finetune.train import IGNORE, FinetuneConfig, encode, finetune, load_records, parse_args, record_messages
from engine.prompt import ChatMessage, PromptBuilder
from engine.request import Delta
from tests.tiny_models import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PIRATE_MARKERS = ("arr", "matey", "ahoy", "me hearty", "yo ho")


def test_records_alpaca_and_chat(tmp_path):
    rows = [{"instruction": "Translate", "input": "hello", "output": "bonjour"},
            {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}]}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    as_list = tmp_path / "d.json"
    as_list.write_text(json.dumps(rows))
    assert load_records(jsonl) == load_records(as_list) == rows
    assert record_messages(rows[0]) == [ChatMessage("user", "Translate\n\nhello"), ChatMessage("assistant", "bonjour")]
    assert [m.role for m in record_messages(rows[1])] == ["system", "user", "assistant"]
    with pytest.raises(ValueError, match="assistant"):
        record_messages({"messages": [{"role": "user", "content": "no answer"}]})


def test_only_the_answer_is_learned():
    prompts = PromptBuilder(build_tokenizer(), "auto", 2048)
    messages = [ChatMessage("user", "Hi"), ChatMessage("assistant", "Ahoy!")]
    example = encode(messages, prompts, eos_id=2, max_length=512)
    prompt_ids = prompts.chat(messages[:1], 8).token_ids
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids  # the prompt the server will send
    assert example["labels"][: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert example["labels"][len(prompt_ids):] == example["input_ids"][len(prompt_ids):] and example["labels"][-1] == 2
    assert encode(messages, prompts, eos_id=2, max_length=5) is None


async def test_finetune_writes_an_adapter_the_engine_serves_and_resumes(tiny_model_dir, tmp_path):
    config = parse_args(["--model", str(tiny_model_dir), "--data", str(ROOT / "data" / "pirate.jsonl"),
                         "--output", str(tmp_path / "pirate"), "--max-steps", "4", "--save-steps", "2",
                         "--batch-size", "4", "--rank", "4", "--target-modules", "q_proj", "v_proj"])
    first = finetune(config)
    assert (first.global_step, first.steps_this_run) == (4, 4)
    assert json.loads((tmp_path / "pirate" / "adapter_config.json").read_text())["r"] == 4
    resumed = finetune(FinetuneConfig(**{**config.__dict__, "max_steps": 6, "resume": True}))
    assert (resumed.global_step, resumed.steps_this_run) == (6, 2)  # continued from checkpoint-4
    engine = Engine.from_config(EngineConfig(model=str(tiny_model_dir), dtype="float32"))
    try:
        await engine.load_adapter("pirate", str(tmp_path / "pirate"))
        request = engine.chat_request([ChatMessage("user", "Hello!")], SamplingParams(temperature=0, max_tokens=4),
                                      "pirate")
        assert [d async for d in engine.submit(request) if isinstance(d, Delta)][-1].finish_reason in ("stop", "length")
    finally:
        await engine.close()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        finetune(FinetuneConfig(**{**config.__dict__, "output": tmp_path / "fresh", "resume": True}))


HELD_OUT = ["What is your favorite food?", "Name a big animal.", "How do I cook rice?", "What is the weather like?",
            "Give me a word that rhymes with cat.", "Why do birds sing?", "What should I read next?",
            "How tall is a giraffe?"]


@pytest.mark.slow
async def test_demo_adapter_speaks_like_a_pirate_and_the_base_does_not():
    engine = Engine.from_config(EngineConfig())
    try:
        await engine.load_adapter("pirate", str(ROOT / "adapters" / "smollm2-pirate"))
        params = SamplingParams(temperature=0, max_tokens=40)

        async def reply(question: str, adapter: str | None) -> str:
            request = engine.chat_request([ChatMessage("user", question)], params, adapter)
            return "".join([d.text async for d in engine.submit(request) if isinstance(d, Delta)]).lower()

        async def pirate_share(adapter: str | None) -> float:
            """Share of the held-out questions (none is in data/pirate.jsonl) answered like a
            pirate; the questions go in together, as one batch."""
            texts = await asyncio.gather(*(reply(question, adapter) for question in HELD_OUT))
            return sum(any(marker in text for marker in PIRATE_MARKERS) for text in texts) / len(HELD_OUT)

        assert await pirate_share("pirate") >= 0.75
        assert await pirate_share(None) <= 0.125
    finally:
        await engine.close()
