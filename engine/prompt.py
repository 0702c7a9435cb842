"""Chat messages and raw prompts -> token ids, within the context budget.

Two chat formats: the tokenizer's own chat template, or the Alpaca format of the seed
projects (`### Instruction:` / `### Response:` under a context string) for models without one.
When history plus the completion does not fit, the oldest turns are dropped (system kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedTokenizerBase

from engine.errors import InvalidRequestError, PromptTooLongError

Role = Literal["system", "user", "assistant"]

ALPACA_CHAT_CONTEXT = (
    "Below is a history of instructions that describe tasks, paired with an input that provides "
    "further context. Write a response that appropriately completes the request by remembering "
    "the conversation history."
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_STOP = ["### Instruction:", "### Input:"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


@dataclass
class Prompt:
    """Token ids ready for the engine, how many messages were dropped, and implied stops."""

    token_ids: list[int]
    dropped_messages: int = 0
    stop: list[str] = field(default_factory=list)


def alpaca_instruction_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca-LoRA instruction prompt (tloen's template), as the seed REST API builds it."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def alpaca_chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """The seed chatbot's history format: context, then Instruction/Response turns."""
    system = [m.content for m in messages if m.role == "system"]
    parts = ["\n".join(system) if system else ALPACA_CHAT_CONTEXT]
    for m in messages:
        if m.role == "user":
            parts.append(f"### Instruction: {m.content}")
        elif m.role == "assistant":
            parts.append(f"### Response: {m.content}")
    parts.append("### Response:")
    return "\n\n".join(parts)


class PromptBuilder:
    """Builds prompts for one tokenizer under one context budget."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: Literal["auto", "chat", "alpaca"],
        context_window: int,
        max_input_tokens: int | None = None,
    ):
        if template == "auto":
            template = "chat" if tokenizer.chat_template else "alpaca"
        if template == "chat" and not tokenizer.chat_template:
            raise ValueError("prompt_template 'chat' needs a tokenizer with a chat template")
        self.tokenizer = tokenizer
        self.template = template
        self.context_window = context_window
        self.max_input_tokens = min(max_input_tokens or context_window, context_window)

    def chat(self, messages: Sequence[ChatMessage], max_tokens: int) -> Prompt:
        """Encode a conversation, dropping its oldest turns until it fits with max_tokens."""
        system = [m for m in messages if m.role == "system"]
        turns = [m for m in messages if m.role != "system"]
        if not turns:
            raise InvalidRequestError("a chat needs at least one user or assistant message")
        dropped = 0
        while True:
            ids = self._encode_chat(system + turns)
            if self._fits(len(ids), max_tokens):
                stop = ALPACA_STOP if self.template == "alpaca" else []
                return Prompt(token_ids=ids, dropped_messages=dropped, stop=list(stop))
            if len(turns) <= 1:
                raise self._too_long(len(ids), max_tokens)
            cut = 1
            while cut < len(turns) - 1 and turns[cut].role == "assistant":
                cut += 1  # never start the history with an assistant turn
            turns = turns[cut:]
            dropped += cut

    def completion(self, prompt: str | list[int], max_tokens: int) -> Prompt:
        """Encode a raw prompt (text or token ids); raw prompts are never truncated."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = list(prompt)
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if not self._fits(len(ids), max_tokens):
            raise self._too_long(len(ids), max_tokens)
        return Prompt(token_ids=ids)

    def _encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        if self.template == "alpaca":
            return self.tokenizer(alpaca_chat_prompt(messages), add_special_tokens=True)["input_ids"]
        text = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        return (
            prompt_tokens <= self.max_input_tokens
            and prompt_tokens + max_tokens <= self.context_window
        )

    def _too_long(self, prompt_tokens: int, max_tokens: int) -> PromptTooLongError:
        return PromptTooLongError(
            f"the prompt has {prompt_tokens} tokens and {max_tokens} more were requested; "
            f"the limit is {self.max_input_tokens} prompt tokens and {self.context_window} "
            "tokens in all (shorten the input or lower max_tokens)"
        )
