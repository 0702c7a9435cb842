"""Tiny random Llama models, tokenizers and LoRA adapters, built in a second on the CPU, and
text to prompt them with (`LONG_TEXT`, `ids`: shared by the engine tests).

The tokenizer is a byte-level BPE trained on a few sentences (so any text, including
multi-byte UTF-8, encodes, and characters split across tokens) with a ChatML template.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from engine.engine import Engine

LONG_TEXT = (
    "Once upon a time there was a small model that answered questions about the quick brown fox. "
    "What is the capital of France? The capital of France is Paris. Continuous batching keeps "
    "every stream flowing token by token."
)


def ids(engine: Engine, text: str) -> list[int]:
    """`text`'s prompt ids under `engine`'s tokenizer."""
    return engine.loaded.tokenizer(text)["input_ids"]


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Once upon a time there was a small model that answered questions.",
    "Continuous batching keeps every stream flowing token by token.",
    "Héllo wörld, ça va? 你好，世界。 Привет, мир! 🙂🚀",
    "### Instruction: summarize our conversations so far in three sentences.\n### Response:",
] * 20


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|endoftext|>",
        chat_template=CHATML,
    )


def build_model(vocab_size: int, seed: int = 0, max_positions: int = 2048) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention and peaky random logits."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.15,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(directory: Path, seed: int = 0, max_positions: int = 2048) -> Path:
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed, max_positions)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_adapter(
    model_dir: Path,
    directory: Path,
    seed: int,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    rank: int = 8,
    fill: float | None = None,
    **options,
) -> Path:
    """A random LoRA adapter strong enough to change greedy output; `fill` sets every weight;
    `options` go to LoraConfig (lora_alpha defaults to 2 * rank)."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    options = {"lora_alpha": 2 * rank, "init_lora_weights": False, **options}
    config = LoraConfig(r=rank, target_modules=list(targets), **options)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.full_like(param, fill) if fill is not None else torch.randn_like(param) * 0.3)
    peft_model.save_pretrained(directory)
    return directory
