"""HTTP request bodies (OpenAI-compatible and the seeds' /generate) and their conversion.

Each request knows how to turn itself into engine SamplingParams (`to_sampling_params`),
filling what the client left out from the server's generation defaults. Fields of the
OpenAI API that we do not implement are accepted only at their neutral value; anything
else is a 400, never silently ignored. Unknown fields are a 400 too. Every string is `Text`:
one that UTF-8 cannot encode (a lone surrogate, or bytes that were not UTF-8) is a 400 naming
its field. Fields whose per-token cost grows with their size (stop strings, stop token ids)
are bounded (engine/config.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from engine.config import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SamplingParams
from engine.prompt import ChatMessage, valid_text

Text = Annotated[str, AfterValidator(valid_text)]
StopString = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class GenerationDefaults(BaseModel):
    """Server-side defaults for what a request leaves out (set in serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(StrictBody):
    """Sampling fields shared by chat and completions (OpenAI names plus common extensions)."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="Extension; -1 or 0 disables.")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} strings of up to {MAX_STOP_CHARS} characters."
    )
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    n: Literal[1] = 1
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="Not supported: must be empty.")
    user: Text | None = None

    def to_sampling_params(self, defaults: GenerationDefaults) -> SamplingParams:
        """Engine settings: the request's values where given, else the server defaults."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        top_k = self.top_k if self.top_k is not None else defaults.top_k
        return SamplingParams(
            max_tokens=self._max_tokens() or defaults.max_tokens,
            temperature=_pick(self.temperature, defaults.temperature),
            top_p=_pick(self.top_p, defaults.top_p),
            top_k=max(top_k, 0),
            min_p=_pick(self.min_p, defaults.min_p),
            repetition_penalty=_pick(self.repetition_penalty, defaults.repetition_penalty),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
        )

    def _max_tokens(self) -> int | None:
        return self.max_tokens


class StreamOptions(StrictBody):
    include_usage: bool = False


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


class ChatCompletionRequest(SamplingFields):
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

    temperature: float = Field(0.1, ge=0.0, le=2.0)
    top_p: float = Field(0.75, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    num_beams: Literal[1] = Field(1, description="Beam search is not supported; only 1 is accepted.")
    max_new_tokens: int = Field(128, ge=1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    do_sample: bool | None = None

    def to_sampling_params(self) -> SamplingParams:
        greedy = self.do_sample is False
        return SamplingParams(
            max_tokens=self.max_new_tokens,
            temperature=0.0 if greedy else self.temperature,
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


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, for every non-2xx answer."""

    error: ErrorDetail
