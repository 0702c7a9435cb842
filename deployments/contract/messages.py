"""What a front end sends to the LLM deployment: a generation (GenerateCall) or a tokenization
(TokenizeCall, answered with Tokenized). A refusal comes back as an ApiError (errors.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import SamplingOverrides
from engine.prompt import ChatMessage, Instruction
from engine.request import new_request_id


@dataclass
class GenerateCall:
    """One generation: a chat (messages) or a completion (prompt), for the base model or an
    adapter (a runtime adapter with its folder, so any replica can load it): the whole
    ingress-to-replica contract (no HTTP types). `overrides` holds what the
    caller set; the replica fills the rest from its current defaults. `request_id` is the id
    the client sees, the engine uses and the logs show. `tenant` is who asked, for the
    engine's fair share (engine/fairness.py): None when the API has no keys."""

    overrides: SamplingOverrides
    adapter: str | None = None
    messages: list[ChatMessage] | None = None
    prompt: str | list[int] | Instruction | None = None
    tools: list[dict] = field(default_factory=list)  # offered to a chat (engine/tools.py)
    request_id: str = ""
    adapter_source: str | None = None  # a runtime adapter's folder (runtime_adapters.py)
    tenant: str | None = None  # the caller's API key as `guard.client_id` (never the key); fair share counts by it

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerateCall has either messages or a prompt")
        self.request_id = self.request_id or new_request_id()


@dataclass
class TokenizeCall:
    """What /tokenize asks of a replica: a chat (built by the same prompt builder as a chat
    request, so `len(tokens)` is its `usage.prompt_tokens` unless old turns must be dropped)
    or a raw prompt (as /v1/completions encodes it with `add_special_tokens`)."""

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    return_token_strs: bool = False


@dataclass
class Tokenized:
    tokens: list[int]
    max_model_len: int
    token_strs: list[str] | None = None
