"""OpenAI chat completion request bodies, as every client of ours sends them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def chat_body(model: str, messages: Sequence[Mapping[str, str]], *, stream: bool = True,
              **fields: Any) -> dict[str, Any]:
    """A chat completion request; `fields` (sampling, extensions) that are None are left out,
    so the server's defaults apply to them."""
    body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in messages], "stream": stream}
    return body | {name: value for name, value in fields.items() if value is not None}


def user_message(text: str) -> list[dict[str, str]]:
    """A chat of one user message."""
    return [{"role": "user", "content": text}]
