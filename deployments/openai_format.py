"""OpenAI response objects and SSE frames, as plain dicts (the wire format is the contract)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from engine.request import RequestStats

Kind = Literal["chat", "completion"]
DONE_FRAME = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage(stats: RequestStats | None) -> dict | None:
    if stats is None:
        return None
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
    }


@dataclass
class ResponseMeta:
    """Identity shared by every object of one response."""

    kind: Kind
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"

    def _object(self, streaming: bool) -> str:
        if self.kind == "chat":
            return "chat.completion.chunk" if streaming else "chat.completion"
        return "text_completion"

    def _envelope(self, streaming: bool, choices: list[dict]) -> dict:
        return {"id": self.id, "object": self._object(streaming), "created": self.created,
                "model": self.model, "choices": choices}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False,
              stats: RequestStats | None = None) -> dict:
        """One streaming chunk with a text delta and/or a finish reason (and the last one's stats)."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(True, [_with_stop_reason(choice, stats)])

    def usage_chunk(self, stats: RequestStats | None) -> dict:
        return {**self._envelope(True, []), "usage": usage(stats)}

    def response(self, text: str, finish_reason: str, stats: RequestStats | None) -> dict:
        """The whole (non-streaming) response."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._envelope(False, [_with_stop_reason(choice, stats)]), "usage": usage(stats)}


def _with_stop_reason(choice: dict, stats: RequestStats | None) -> dict:
    """vLLM's `stop_reason` extension, when a guard stopped the reply (e.g. "repetition")."""
    if stats is not None and stats.stop_reason:
        choice["stop_reason"] = stats.stop_reason
    return choice
