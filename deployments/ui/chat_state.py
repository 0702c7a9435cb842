"""One browser session's conversation, independent of Gradio: the client's Conversation
(client/conversation.py: history, hidden turns, undo) plus the page's display.

The model sees clean turns (context as the system prompt, hidden "continue." prompts
included); the page sees escaped Markdown bubbles with a footer of numbers under each
reply. Nothing a model or a user writes is ever rendered as HTML.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, replace

from client import conversation
from client.conversation import CONTINUE_PROMPT, SUMMARIZE_PROMPT, Exchange
from engine.prompt import ChatMessage
from engine.request import RequestStats

__all__ = ["CONTINUE_PROMPT", "SUMMARIZE_PROMPT", "Conversation", "Exchange", "escape", "footer_text"]


@dataclass(frozen=True)
class Conversation(conversation.Conversation):
    """The client's conversation with the page's notice (old turns left out) and display."""

    notice: str = ""

    def finish_reply(self, stats: RequestStats | None, note: str = "") -> Conversation:
        """Put the numbers under the last reply, and a notice when old turns were dropped."""
        last = self.exchanges[-1]
        footer = footer_text(stats, note)
        dropped = stats.dropped_messages if stats else 0
        notice = (
            f"To fit the context window, the {dropped} oldest messages were left out of the last request."
            if dropped else ""
        )
        return replace(self, exchanges=self.exchanges[:-1] + (replace(last, footer=footer),), notice=notice)

    def undo(self) -> Conversation:
        """Drop the last visible exchange (and the hidden Continue turns after it) and the notice."""
        return replace(super().undo(), notice="")

    def messages(self, context: str) -> list[ChatMessage]:
        """What the model sees: context as the system prompt, then every turn."""
        return [ChatMessage(m["role"], m["content"]) for m in self.chat_messages(context)]

    def display(self) -> list[dict]:
        """Gradio 'messages' for the Chatbot: escaped Markdown, footers in italics."""
        bubbles: list[dict] = []
        for exchange in self.exchanges:
            if not exchange.hidden_user:
                bubbles.append({"role": "user", "content": escape(exchange.user)})
            content = escape(exchange.reply)
            if exchange.footer:
                content += f"\n\n*{exchange.footer}*"
            if content:
                bubbles.append({"role": "assistant", "content": content})
        return bubbles


def escape(text: str) -> str:
    """HTML-escape so Markdown renders the text, never markup or script."""
    return html.escape(text, quote=False)


def footer_text(stats: RequestStats | None, note: str = "") -> str:
    if stats is None:
        return note
    parts = [f"{stats.completion_tokens} tokens"]
    if stats.tokens_per_second:
        parts.append(f"{stats.tokens_per_second:.1f} tokens/s")
    if note:
        parts.append(note)
    return " · ".join(parts)
