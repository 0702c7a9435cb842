"""OpenAI response objects as pydantic models, and SSE frames of them (and of the error body,
deployments/contract/errors.py).

The routes declare these models as their response schemas, so the OpenAPI document (and the
schema fuzzing in the tests) describes successful replies too. `ResponseMeta` builds every
object of one response with the same id (the request's id), creation time and model.
`stop_reason` is vLLM's extension: why a guard stopped the reply (e.g. "repetition"), else null.
Logprobs take OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes, top_logprobs}]}`
and the legacy completions' parallel lists (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`); deployments/http/logprob_format.py fills them from the engine's TokenLogprobs.

Tool calls (deployments/http/tool_calls.py) go into `message.tool_calls`, or into one
`delta.tool_calls` chunk per call (name and whole arguments at once) at the end of a stream; a
call cut by max_tokens too, with its arguments so far and finish_reason "length".
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from engine.request import RequestStats

if TYPE_CHECKING:
    from deployments.http.structured import OfferedTools, ParsedToolCall

Kind = Literal["chat", "completion"]
DONE = "[DONE]"  # the last event's data
DONE_FRAME = f"data: {DONE}\n\n"


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens found in the prefix cache (not computed again).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, stats: RequestStats | None) -> Usage | None:
        if stats is None:
            return None
        return cls(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                   total_tokens=stats.prompt_tokens + stats.completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=stats.cached_prompt_tokens))


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """Parallel lists, one entry per token; the first prompt token's entries are null (echo)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    @classmethod
    def of(cls, call: ParsedToolCall) -> ToolCall:
        return cls(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


class ToolCallChunk(ToolCall):
    index: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str
    stop_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None


class Completion(BaseModel):
    """A text completion, whole or (streaming) one chunk of it: OpenAI uses one shape for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class GenerateResponse(BaseModel):
    """The seed REST API's answer."""

    output: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "lora-serve"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    """vLLM's /tokenize answer: the ids, their count, and the context window."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


def sse(payload: BaseModel) -> str:
    """One SSE frame of a response object or an error body."""
    return f"data: {payload.model_dump_json()}\n\n"


@dataclass
class ResponseMeta:
    """Identity shared by every object of one response; `id` is also the request's id."""

    kind: Kind
    model: str
    id: str = ""
    tool_calls: OfferedTools | None = None  # the reply may call these (deployments/http/tool_calls.py)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False,
              stats: RequestStats | None = None, index: int = 0,
              logprobs: ChatLogprobs | CompletionLogprobs | None = None,
              usage: Usage | None = None) -> ChatCompletionChunk | Completion:
        """One streaming chunk of choice `index`: a text delta (with its logprobs) and/or a finish
        reason (and the last one's stats); `usage` so far with vLLM's continuous_usage_stats."""
        stop_reason = stats.stop_reason if stats else None
        if self.kind == "chat":
            delta = ChatDelta(role="assistant", content=text or "") if role else ChatDelta(content=text or None)
            choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason,
                                     stop_reason=stop_reason)
            return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice],
                                       usage=usage)
        choice = CompletionChoice(index=index, text=text or "", logprobs=logprobs, finish_reason=finish_reason,
                                  stop_reason=stop_reason)
        return Completion(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage)

    def tool_call_chunk(self, calls: list[ParsedToolCall], index: int = 0,
                        usage: Usage | None = None) -> ChatCompletionChunk:
        """One chunk per choice with its tool calls, each whole (OpenAI sends arguments in pieces)."""
        chunks = [ToolCallChunk(index=i, **ToolCall.of(call).model_dump()) for i, call in enumerate(calls)]
        choice = ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=chunks))
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage)

    def usage_chunk(self, usage: Usage | None) -> ChatCompletionChunk | Completion:
        kind = ChatCompletionChunk if self.kind == "chat" else Completion
        return kind(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def response(self, choices: list[ChoiceOutput], usage: Usage | None) -> ChatCompletion | Completion:
        """The whole (non-streaming) response."""
        envelope = {"id": self.id, "created": self.created, "model": self.model, "usage": usage}
        if self.kind == "chat":
            return ChatCompletion(choices=[
                ChatChoice(index=c.index, message=c.message(), logprobs=c.logprobs, finish_reason=c.finish_reason,
                           stop_reason=c.stop_reason) for c in choices
            ], **envelope)
        return Completion(choices=[
            CompletionChoice(index=c.index, text=c.text, logprobs=c.logprobs, finish_reason=c.finish_reason,
                             stop_reason=c.stop_reason) for c in choices
        ], **envelope)


@dataclass
class ChoiceOutput:
    """One finished choice of a whole response."""

    index: int
    text: str
    finish_reason: str
    stop_reason: str | None = None
    logprobs: ChatLogprobs | CompletionLogprobs | None = None
    tool_calls: list[ParsedToolCall] | None = None

    def message(self) -> AssistantMessage:
        """The chat message: its text, and its tool calls when it made some (content then null
        unless there was text besides them)."""
        calls = [ToolCall.of(call) for call in self.tool_calls] if self.tool_calls else None
        return AssistantMessage(content=self.text if self.text or not calls else None, tool_calls=calls)
