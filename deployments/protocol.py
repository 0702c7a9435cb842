"""HTTP request bodies (OpenAI-compatible and the seeds' /generate) and their conversion.

Each request turns its sampling fields into `SamplingOverrides` (`to_overrides`), the part of
the ingress-to-replica contract that says what the client set; the LLM replica fills the rest
from the server's generation defaults. Field types and bounds come from engine/config.py, one
declaration per field. Fields of the
OpenAI API that we do not implement are accepted only at their neutral value; anything
else is a 400, never silently ignored (fields that cannot change the reply are the exception:
ignored_fields.py). Unknown fields are a 400 too. Every string is `Text`:
one that UTF-8 cannot encode (a lone surrogate, or bytes that were not UTF-8) is a 400 naming
its field. Fields whose per-token cost grows with their size (stop strings, stop token ids)
are bounded (engine/config.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from engine.config import (
    MAX_STOP_CHARS, MAX_STOP_STRINGS, MaxTokens, MinP, Penalty, RepetitionPenalty, SamplingOverrides, Seed,
    StopString, StopTokenIds, Temperature, TopK, TopP,
)
from engine.prompt import ChatMessage, valid_text

from deployments.ignored_fields import IgnoredChatFields

Text = Annotated[str, AfterValidator(valid_text)]
TextStop = Annotated[StopString, AfterValidator(valid_text)]


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(StrictBody):
    """Sampling fields shared by chat and completions (OpenAI names plus common extensions)."""

    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=-1, description="Extension; -1 or 0 disables.")] | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    seed: Seed | None = None
    stop: TextStop | Annotated[list[TextStop], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} strings of up to {MAX_STOP_CHARS} characters."
    )
    stop_token_ids: StopTokenIds | None = None
    ignore_eos: bool = False
    n: Literal[1] = 1
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="Not supported: must be empty.")
    user: Text | None = None

    def to_overrides(self) -> SamplingOverrides:
        """What this request sets (the replica fills the rest from the server defaults)."""
        fields = self.model_dump(include=set(SamplingOverrides.model_fields), exclude_none=True)
        fields["max_tokens"] = self._max_tokens()
        fields["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if self.top_k is not None:
            fields["top_k"] = max(self.top_k, 0)
        return SamplingOverrides(**fields)

    def _max_tokens(self) -> int | None:
        return self.max_tokens


class StreamOptions(StrictBody):
    include_usage: bool = False
    include_obfuscation: bool | None = Field(None, description="Ignored: no obfuscation padding is sent.")


class TextPart(StrictBody):
    type: Literal["text"]
    text: Text


class ChatMessageIn(StrictBody):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def to_message(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role, text)


class TextFormat(StrictBody):
    type: Literal["text"]


class ChatCompletionRequest(SamplingFields, IgnoredChatFields):
    model: Text
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] = False
    response_format: TextFormat | None = Field(None, description="Only {'type': 'text'} is supported.")

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[ChatMessage]:
        return [m.to_message() for m in self.messages]


class CompletionRequest(SamplingFields):
    model: Text
    prompt: Text | list[int] | list[Text] | list[list[int]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    logprobs: None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
            return prompt[0]
        return prompt


class AlpacaGenerationConfig(StrictBody):
    """The seed REST API's generation_config (tloen's GenerationConfig fields)."""

    temperature: Temperature = 0.1
    top_p: TopP = 0.75
    top_k: TopK = 40
    num_beams: Literal[1] = Field(1, description="Beam search is not supported; only 1 is accepted.")
    max_new_tokens: MaxTokens = 128
    repetition_penalty: RepetitionPenalty = 1.0
    do_sample: bool | None = None

    def to_overrides(self) -> SamplingOverrides:
        """Every field set: the seed API's defaults, not the server's, fill what is left out."""
        return SamplingOverrides(
            max_tokens=self.max_new_tokens,
            temperature=0.0 if self.do_sample is False else self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
        )


class AlpacaPromptConfig(StrictBody):
    instruction: Text = Field(min_length=1)
    input: Text = ""


class GenerateRequest(StrictBody):
    """The seed REST API body: POST /generate."""

    generation_config: AlpacaGenerationConfig = Field(default_factory=AlpacaGenerationConfig)
    prompt_config: AlpacaPromptConfig
    model: Text | None = Field(None, description="Base model or adapter name; default: the base model.")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, for every non-2xx answer."""

    error: ErrorDetail
