"""One browser session's conversation, independent of Gradio: history, context, display.

The model sees clean turns (context as the system prompt, hidden "continue." prompts
included); the page sees escaped Markdown bubbles with a footer of numbers under each
reply. Nothing a model or a user writes is ever rendered as HTML.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, replace

from engine.prompt import ChatMessage
from engine.request import RequestStats

SUMMARIZE_PROMPT = "summarize our conversations so far in three sentences."
CONTINUE_PROMPT = "continue."


@dataclass(frozen=True)
class Exchange:
    """A user turn and the reply to it. A hidden user turn (Continue) is not displayed."""

    user: str
    reply: str = ""
    footer: str = ""
    hidden_user: bool = False


@dataclass(frozen=True)
class Conversation:
    """Immutable: every change returns a new Conversation (safe to keep in gr.State)."""

    exchanges: tuple[Exchange, ...] = ()
    notice: str = ""

    def ask(self, text: str, hidden: bool = False) -> Conversation:
        return replace(self, exchanges=self.exchanges + (Exchange(text, hidden_user=hidden),))

    def extend_reply(self, text: str) -> Conversation:
        last = self.exchanges[-1]
        return replace(self, exchanges=self.exchanges[:-1] + (replace(last, reply=last.reply + text),))

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
        """Drop the last visible exchange (and the hidden Continue turns after it)."""
        exchanges = list(self.exchanges)
        while exchanges and exchanges[-1].hidden_user:
            exchanges.pop()
        return replace(self, exchanges=tuple(exchanges[:-1]), notice="")

    def last_user_turn(self) -> tuple[Conversation, str] | None:
        """For Regenerate: the conversation without its last visible exchange, and that prompt."""
        visible = [e for e in self.exchanges if not e.hidden_user]
        if not visible:
            return None
        return self.undo(), visible[-1].user

    def messages(self, context: str) -> list[ChatMessage]:
        """What the model sees: context as the system prompt, then every turn."""
        messages = [ChatMessage("system", context)] if context.strip() else []
        for exchange in self.exchanges:
            messages.append(ChatMessage("user", exchange.user))
            if exchange.reply:
                messages.append(ChatMessage("assistant", exchange.reply))
        return messages

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

