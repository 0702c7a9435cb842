"""Train a LoRA adapter with peft on an Alpaca-format or chat-format dataset.

    python -m finetune --data data/pirate.jsonl --output adapters/my-adapter
    python -m finetune --model huggyllama/llama-7b --data alpaca.json --output out --rank 16

Records are Alpaca (`instruction`, optional `input`, `output`) or chat (`messages`, the
last one the assistant's answer), in a JSON list or JSON Lines. Each record is encoded
with the same PromptBuilder the server uses for chat (the model's chat template, or the
Alpaca format), so the adapter learns exactly the prompts it will be served with; the
loss covers the answer only. transformers' Trainer provides the progress bar, the
checkpoints (`OUTPUT/checkpoints`) and `--resume`. The result is a PEFT adapter folder:
name it under `adapters:` in serve_config.yaml and clients select it with `"model": NAME`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from engine.config import DEFAULT_MODEL, EngineConfig
from engine.loader import cpu_supports_bf16, load_model
from engine.prompt import ChatMessage, PromptBuilder

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class FinetuneConfig:
    data: Path
    output: Path
    model: str = DEFAULT_MODEL
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 2e-4
    epochs: float = 3.0
    max_length: int = 512
    batch_size: int = 8
    gradient_accumulation: int = 1
    device: str = "auto"
    prompt_template: str = "auto"
    save_steps: int = 50
    max_steps: int = -1
    resume: bool = False
    seed: int = 0
    hf_token: str | None = field(default=None, repr=False)


def load_records(path: Path) -> list[dict]:
    """A JSON list or JSON Lines file of records."""
    text = path.read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def record_messages(record: dict) -> list[ChatMessage]:
    """Alpaca or chat record -> messages whose last one is the answer to learn."""
    if "messages" in record:
        messages = [ChatMessage(m["role"], m["content"]) for m in record["messages"]]
    else:
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [ChatMessage("user", prompt), ChatMessage("assistant", record["output"])]
    if len(messages) < 2 or messages[-1].role != "assistant":
        raise ValueError(f"a record must end with the assistant's answer: {record}")
    return messages


def encode(messages: Sequence[ChatMessage], prompts: PromptBuilder, eos_id: int, max_length: int) -> dict | None:
    """Token ids of prompt + answer + end-of-sequence, with labels on the answer only (None: too long)."""
    answer = prompts.tokenizer(messages[-1].content, add_special_tokens=False)["input_ids"] + [eos_id]
    prompt = prompts.chat(messages[:-1], max_tokens=len(answer)).token_ids
    ids = prompt + answer
    if len(ids) > max_length:
        return None
    return {"input_ids": ids, "labels": [IGNORE] * len(prompt) + answer}


@dataclass
class PadCollator:
    """Right-pads a batch of encoded examples; padding is masked out of attention and loss."""

    pad_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in batch)

        def pad(values: list[int], fill: int) -> list[int]:
            return values + [fill] * (longest - len(values))

        return {
            "input_ids": torch.tensor([pad(e["input_ids"], self.pad_id) for e in batch]),
            "labels": torch.tensor([pad(e["labels"], IGNORE) for e in batch]),
            "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in batch]),
        }


def training_arguments(config: FinetuneConfig, on_gpu: bool) -> TrainingArguments:
    """bf16 mixed precision where the hardware has it (GPU, or CPU with AVX512-BF16/AMX)."""
    bf16 = torch.cuda.is_bf16_supported() if on_gpu else cpu_supports_bf16()
    return TrainingArguments(
        output_dir=str(config.output / "checkpoints"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # a float is a fraction of all steps
        logging_steps=10,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        bf16=bf16,
        fp16=on_gpu and not bf16,
        use_cpu=not on_gpu,
        report_to=[],
        seed=config.seed,
        remove_unused_columns=False,
        dataloader_pin_memory=on_gpu,
    )


@dataclass
class FinetuneResult:
    output: Path
    global_step: int
    steps_this_run: int


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Train (or, with `resume`, continue training) and save the adapter in `config.output`."""
    torch.manual_seed(config.seed)
    loaded = load_model(EngineConfig(model=config.model, device=config.device, dtype="float32",
                                     hf_token=config.hf_token))
    tokenizer = loaded.tokenizer
    prompts = PromptBuilder(tokenizer, config.prompt_template, loaded.context_window)
    eos_id = min(loaded.eos_token_ids) if loaded.eos_token_ids else tokenizer.eos_token_id
    encoded = [encode(record_messages(r), prompts, eos_id, config.max_length) for r in load_records(config.data)]
    examples = [e for e in encoded if e is not None]
    log.info("%d examples (%d longer than %d tokens skipped)", len(examples), len(encoded) - len(examples),
             config.max_length)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, lora)
    model.print_trainable_parameters()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    trainer = Trainer(model=model, args=training_arguments(config, loaded.device.type == "cuda"),
                      train_dataset=examples, data_collator=PadCollator(pad_id))
    checkpoint = last_checkpoint(config.output) if config.resume else None
    trainer.train(resume_from_checkpoint=checkpoint)
    model.save_pretrained(config.output)
    log.info("adapter saved to %s", config.output)
    resumed = int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0
    return FinetuneResult(config.output, trainer.state.global_step, trainer.state.global_step - resumed)


def last_checkpoint(output: Path) -> str:
    """The newest checkpoint under OUTPUT/checkpoints; an error if there is none."""
    found = get_last_checkpoint(str(output / "checkpoints")) if (output / "checkpoints").is_dir() else None
    if found is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {output / 'checkpoints'}")
    log.info("resuming from %s", found)
    return found


def parse_args(argv: Sequence[str] | None = None) -> FinetuneConfig:
    p = argparse.ArgumentParser(prog="python -m finetune", description=__doc__.split("\n\n")[0])
    defaults = FinetuneConfig(data=Path(), output=Path())
    p.add_argument("--data", type=Path, required=True, help="JSON or JSONL: Alpaca records or chat messages")
    p.add_argument("--output", type=Path, required=True, help="adapter folder to write")
    p.add_argument("--model", default=defaults.model, help="built-in name, hub id, folder or .gguf")
    p.add_argument("--rank", type=int, default=defaults.rank)
    p.add_argument("--alpha", type=int, default=defaults.alpha)
    p.add_argument("--dropout", type=float, default=defaults.dropout)
    p.add_argument("--target-modules", nargs="+", default=list(defaults.target_modules))
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--epochs", type=float, default=defaults.epochs)
    p.add_argument("--max-steps", type=int, default=defaults.max_steps, help="stop after N steps (-1: epochs)")
    p.add_argument("--max-length", type=int, default=defaults.max_length, help="skip longer examples")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--gradient-accumulation", type=int, default=defaults.gradient_accumulation)
    p.add_argument("--device", default=defaults.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--prompt-template", default=defaults.prompt_template, choices=["auto", "chat", "alpaca"])
    p.add_argument("--save-steps", type=int, default=defaults.save_steps)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT/checkpoints")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--hf-token", default=None)
    args = vars(p.parse_args(argv))
    args["target_modules"] = tuple(args["target_modules"])
    return FinetuneConfig(**args)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    finetune(parse_args(argv))


if __name__ == "__main__":
    main()
