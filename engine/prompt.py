"""Chat messages and raw prompts -> token ids, within the context budget.

Two chat formats: the tokenizer's own chat template, or the Alpaca format of the seed
projects (`### Instruction:` / `### Response:` under a context string) for models without one.
When history plus the completion does not fit, the oldest turns are dropped (system kept).

Message content and the seed API's instruction fields are data: special-token text in them
stays text (engine/template.py); only the template emits control tokens. A raw completion
prompt is the client's whole prompt, so its special tokens do count as control tokens.

Tools, assistant `tool_calls` and `role: "tool"` results go through the chat template's own
tool support when it has Hermes' call format, and are Hermes text otherwise (engine/tools.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from engine.errors import InvalidRequestError, PromptTooLongError
from engine.template import TemplateEncoder
from engine.tools import ToolCall, native_tools, tools_system_prompt

if TYPE_CHECKING:  # a type only: the HTTP ingress and the chat page run without transformers
    from transformers import PreTrainedTokenizerBase

Role = Literal["system", "user", "assistant", "tool"]
Tools = Sequence[dict[str, Any]]  # OpenAI tool definitions ({"type": "function", "function": {...}})

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
    """A turn; an assistant turn may carry `tool_calls`, a `tool` turn answers `tool_call_id`."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class Instruction:
    """The seed REST API's prompt: an instruction and an optional input, in tloen's Alpaca template."""

    instruction: str
    input: str = ""


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


def hermes_messages(messages: Sequence[ChatMessage], tools: Tools = ()) -> list[ChatMessage]:
    """The conversation in Hermes text, for templates without Hermes-native tools: results as
    user turns, calls as assistant text, the tools (if any) at the end of the system prompt.
    Everything ends up as message content (data)."""
    out = [_hermes_message(m) for m in messages]
    if not tools:
        return out
    prompt = tools_system_prompt(tools)
    if out and out[0].role == "system":
        return [ChatMessage("system", f"{out[0].content}\n\n{prompt}")] + out[1:]
    return [ChatMessage("system", prompt)] + out


def _hermes_message(message: ChatMessage) -> ChatMessage:
    if message.role == "tool":
        return ChatMessage("user", f"<tool_response>\n{message.content}\n</tool_response>")
    if message.tool_calls:
        calls = [call.hermes_text() for call in message.tool_calls]
        return ChatMessage(message.role, "\n".join([message.content] * bool(message.content) + calls))
    return message


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
        self.encoder = TemplateEncoder(tokenizer)
        self.template = template
        self.native_tools = template == "chat" and native_tools(tokenizer.chat_template)
        self.context_window = context_window
        self.max_input_tokens = min(max_input_tokens or context_window, context_window)

    def chat(self, messages: Sequence[ChatMessage], max_tokens: int, tools: Tools = ()) -> Prompt:
        """Encode a conversation (offering `tools`), dropping its oldest turns until it fits with
        max_tokens (the tools and system turns are kept).

        Where the kept history starts is found by bisection (fewer turns never make a longer
        prompt), so a long chat costs O(log n) encodings, not one per dropped turn.
        """
        for i, message in enumerate(messages):
            check_text(message.content, f"messages[{i}].content")
        messages, tools = self._with_tools(messages, tools)
        system = [m for m in messages if m.role == "system"]
        turns = [m for m in messages if m.role != "system"]
        if not turns:
            raise InvalidRequestError("a chat needs at least one user or assistant message")
        ids = self._encode_offering(system + turns, tools)
        if self._fits(len(ids), max_tokens):
            return self._chat_prompt(ids, 0)
        starts = history_starts(turns)
        lo, hi, found = 1, len(starts) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            ids = self._encode_offering(system + turns[starts[mid] :], tools)
            if self._fits(len(ids), max_tokens):
                found, hi = self._chat_prompt(ids, starts[mid]), mid - 1
            else:
                lo = mid + 1
        if found is None:  # the last probe was the last turn alone
            raise self._too_long(len(ids), max_tokens)
        return found

    def chat_tokens(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        """The whole conversation's prompt ids exactly as `chat` builds them (same template and
        role protection), never trimmed: what /tokenize counts."""
        for i, message in enumerate(messages):
            check_text(message.content, f"messages[{i}].content")
        messages, tools = self._with_tools(messages, ())
        system = [m for m in messages if m.role == "system"]
        return self._encode_chat(system + [m for m in messages if m.role != "system"], add_generation_prompt, tools)

    def text_tokens(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A raw prompt's ids as `completion` encodes it (with add_special_tokens true)."""
        check_text(text, "prompt")
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of token ids (special tokens included); InvalidRequestError for ids out of the vocabulary."""
        vocab = len(self.tokenizer)
        if bad := [t for t in token_ids if not 0 <= t < vocab]:
            raise InvalidRequestError(f"tokens must be in [0, {vocab}); got {bad[:5]}")
        return self.tokenizer.decode(list(token_ids))

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(token_ids))

    def completion(self, prompt: str | list[int] | Instruction, max_tokens: int) -> Prompt:
        """Encode a raw prompt (text or token ids) or an instruction; never truncated."""
        if isinstance(prompt, Instruction):
            check_text(prompt.instruction, "instruction")
            check_text(prompt.input, "input")
            ids = self._encode_text(alpaca_instruction_prompt(prompt.instruction, prompt.input))
        elif isinstance(prompt, str):
            check_text(prompt, "prompt")
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

    def _chat_prompt(self, ids: list[int], dropped: int) -> Prompt:
        stop = ALPACA_STOP if self.template == "alpaca" else []
        return Prompt(token_ids=ids, dropped_messages=dropped, stop=list(stop))

    def _with_tools(self, messages: Sequence[ChatMessage], tools: Tools) -> tuple[list[ChatMessage], Tools]:
        """(messages, tools) for the template: kept structured for a Hermes-native template,
        else turned into Hermes text (and no tools left for the template)."""
        if self.native_tools:
            return list(messages), tools
        return hermes_messages(messages, tools), ()

    def _encode_offering(self, messages: Sequence[ChatMessage], tools: Tools) -> list[int]:
        """`_encode_chat` with the generation prompt (called with the messages alone when there
        are no tools: the seam tests count encodings with)."""
        return self._encode_chat(messages, True, tools) if tools else self._encode_chat(messages)

    def _encode_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True,
                     tools: Tools = ()) -> list[int]:
        if self.template == "alpaca":
            text = alpaca_chat_prompt(messages)
            return self._encode_text(text if add_generation_prompt else text.removesuffix("\n\n### Response:"))
        return self.encoder.encode(messages, add_generation_prompt, tools)

    def _encode_text(self, text: str) -> list[int]:
        """A prompt built from user text: BOS and the like as configured, special-token text as text."""
        return self.tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]

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


def history_starts(turns: Sequence[ChatMessage]) -> list[int]:
    """Where a trimmed history may start: the first turn, any later non-assistant turn, the last turn."""
    starts = [0] + [i for i in range(1, len(turns)) if turns[i].role != "assistant"]
    return starts if starts[-1] == len(turns) - 1 else starts + [len(turns) - 1]


def valid_text(text: str) -> str:
    """The text, if UTF-8 can encode it; ValueError at its first lone surrogate otherwise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid Unicode text (a lone surrogate at position {err.start})") from None
    return text


def check_text(text: str, field: str) -> None:
    """InvalidRequestError naming `field` when the text cannot be encoded."""
    try:
        valid_text(text)
    except ValueError as err:
        raise InvalidRequestError(f"{field}: {err}") from None
