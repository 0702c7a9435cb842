"""HTTP request bodies (OpenAI-compatible and the seeds' /generate) and their conversion.

Each request turns its sampling fields into `SamplingOverrides` (`to_overrides`), the part of
the ingress-to-replica contract that says what the client set; the LLM replica fills the rest
from the server's generation defaults. The sampling fields themselves (names, types, bounds,
descriptions) are engine/config.py's SamplingParams, taken over by `SamplingFields`; only the
fields whose HTTP form is wider (`stop`, `top_k`) are declared again here. `logprobs`,
`top_logprobs` (chat) and `logprobs`, `echo` (completions) become the engine's output options
(`_output_options`). `logit_bias` is a sampling field like the others (its ids are checked
against the vocabulary by the engine). Fields of the OpenAI API that we do not implement, and
unknown fields, follow one rule, deployments/http/ignored_fields.py's: accepted and ignored when they
cannot change the reply, else a 400 naming the field; unknown fields are a 400 (`StrictBody`).
Fields of the completions API kept only at their neutral value (`best_of`, `suffix`) are
declared here. Every string is `Text`:
one that UTF-8 cannot encode (a lone surrogate, or bytes that were not UTF-8) is a 400 naming
its field. Fields whose per-token cost grows with their size (stop strings, stop token ids)
are bounded (engine/config.py). `response_format`, `tools` and `tool_choice`, and tool calls
in the history, are deployments/http/structured.py's.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.config import (
    MAX_STOP_CHARS, MAX_STOP_STRINGS, Logprobs, MaxTokens, RepetitionPenalty, SamplingOverrides, StopString,
    Temperature, TopK, TopP, fields_model,
)
from engine.prompt import ChatMessage, valid_text

from deployments.http.ignored_fields import (
    IgnoredChatFields, IgnoredCompletionFields, IgnoredContentPartFields, UnsupportedChatFields,
)
from deployments.http.structured import (
    OfferedTools, ResponseFormat, ToolCallIn, ToolChoice, ToolDef, offered_tools, response_grammar, tool_call_grammar,
    tool_dicts,
)

Text = Annotated[str, AfterValidator(valid_text)]
TextStop = Annotated[StopString, AfterValidator(valid_text)]
StrictLogprobs = Annotated[Logprobs, Field(strict=True)]  # a count: `true` is not 1


OUTPUT_OPTIONS = {"logprobs", "prompt_logprobs", "echo"}  # named differently per endpoint
NOT_SAMPLING = OUTPUT_OPTIONS | {"grammar"}  # the grammar comes from response_format and tools


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


HttpSampling = fields_model("HttpSampling", SamplingOverrides, set(SamplingOverrides.model_fields) - NOT_SAMPLING,
                            optional={"stop_token_ids", "logit_bias"}, base=StrictBody)


class SamplingFields(HttpSampling):
    """Sampling fields shared by chat and completions: SamplingOverrides' (OpenAI names plus
    common extensions), but the output options, which each endpoint names its own way, and the
    grammar. `stop` also takes one string, `top_k` also -1 (vLLM's "off")."""

    top_k: Annotated[int, Field(ge=-1, description="Extension; -1 or 0 disables.")] | None = None
    stop: TextStop | Annotated[list[TextStop], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} strings of up to {MAX_STOP_CHARS} characters."
    )

    def to_overrides(self) -> SamplingOverrides:
        """What this request sets (the replica fills the rest from the server defaults)."""
        fields = self.model_dump(include=set(HttpSampling.model_fields), exclude_none=True)
        fields["max_tokens"] = self._max_tokens()
        fields["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if self.top_k is not None:
            fields["top_k"] = max(self.top_k, 0)
        return SamplingOverrides(**fields, **self._output_options())

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _output_options(self) -> dict:
        """The engine's logprobs / prompt_logprobs / echo, from this endpoint's own fields."""
        return {}


class StreamOptions(StrictBody):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False, description="vLLM's extension: with include_usage, every chunk carries the usage so far.")
    include_obfuscation: bool | None = Field(None, description="Ignored: no obfuscation padding is sent.")


class TextPart(StrictBody, IgnoredContentPartFields):
    type: Literal["text"]
    text: Text


class ChatMessageIn(StrictBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=64)
    tool_call_id: Text | None = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessageIn:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        return self

    def to_message(self) -> ChatMessage:
        """The message for the prompt builder: text content, tool calls and results structured
        (the replica renders them per template: engine/tools.py)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        calls = tuple(call.to_tool_call() for call in self.tool_calls or ())
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role, text, calls, self.tool_call_id if self.role == "tool" else None)


class ChatCompletionRequest(SamplingFields, IgnoredChatFields, UnsupportedChatFields):
    model: Text
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: StrictLogprobs | None = Field(None, description="Needs logprobs true; at most 20.")
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = Field(None, min_length=1, max_length=128)
    tool_choice: ToolChoice | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> ChatCompletionRequest:
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if self.tool_grammar() and response_grammar(self.response_format):
            raise ValueError("response_format cannot be combined with a required or named tool_choice")
        return self

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def _output_options(self) -> dict:
        return {"logprobs": self.top_logprobs or 0} if self.logprobs else {}

    def to_overrides(self) -> SamplingOverrides:
        grammar = self.tool_grammar() or response_grammar(self.response_format)
        return super().to_overrides().model_copy(update={"grammar": grammar})

    @property
    def uses_tools(self) -> bool:
        """Tools offered and not switched off: the reply may hold tool calls."""
        return self.offered_tools() is not None

    def offered_tools(self) -> OfferedTools | None:
        """The functions the reply may call (deployments/http/tool_calls.py reads them out of it)."""
        return offered_tools(self.tools, self.tool_choice or "auto")

    def tool_grammar(self):
        return tool_call_grammar(self.tools, self.tool_choice or "auto") if self.tools else None

    def chat_messages(self) -> list[ChatMessage]:
        return [m.to_message() for m in self.messages]

    def prompt_tools(self) -> list[dict]:
        """The tools the prompt offers: none when tool_choice is "none"."""
        return tool_dicts(self.tools) if self.uses_tools else []


class CompletionRequest(SamplingFields, IgnoredCompletionFields):
    model: Text
    prompt: Text | list[int] | list[Text] | list[list[int]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="Return the prompt before the completion (with logprobs: theirs too).")
    best_of: Literal[1] | None = None
    logprobs: StrictLogprobs | None = Field(None, description="Logprobs of each token and the N most likely (N <= 20).")
    suffix: None = None

    def _output_options(self) -> dict:
        prompt = self.logprobs if self.echo else None
        return {"logprobs": self.logprobs, "prompt_logprobs": prompt, "echo": self.echo}

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


class TokenizeCompletionRequest(StrictBody):
    """vLLM's POST /tokenize body for a raw prompt."""

    model: Text | None = Field(None, description="Base model or adapter name; default: the base model.")
    prompt: Text
    add_special_tokens: bool = Field(True, description="Add BOS and the like, as /v1/completions does.")
    return_token_strs: bool = False


class TokenizeChatRequest(StrictBody):
    """vLLM's POST /tokenize body for a chat: the prompt a chat request builds from `messages`."""

    model: Text | None = Field(None, description="Base model or adapter name; default: the base model.")
    messages: list[ChatMessageIn] = Field(min_length=1)
    add_generation_prompt: bool = Field(True, description="End with the assistant turn's opening, as generation does.")
    return_token_strs: bool = False

    def chat_messages(self) -> list[ChatMessage]:
        return [m.to_message() for m in self.messages]


class DetokenizeRequest(StrictBody):
    """vLLM's POST /detokenize body."""

    model: Text | None = Field(None, description="Base model or adapter name; default: the base model.")
    tokens: list[int]


AdapterName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")]


class LoadLoraAdapterRequest(StrictBody):
    """vLLM's POST /v1/load_lora_adapter body."""

    lora_name: AdapterName = Field(description="The model name requests will use.")
    lora_path: Text = Field(min_length=1, description="The PEFT adapter folder's absolute path on the server.")


class UnloadLoraAdapterRequest(StrictBody):
    """vLLM's POST /v1/unload_lora_adapter body."""

    lora_name: AdapterName
    lora_int_id: int | None = Field(None, description="Accepted for vLLM's clients; the name decides.")
