"""A conversation's turns and the chat messages the model sees, shared by the terminal chat
and the chat page (deployments/ui/chat_state.py adds the page's display to it).

Immutable: every change returns a new Conversation (safe to keep in gr.State). A hidden
user turn (Continue's "continue.") is sent to the model but not shown.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Self

SUMMARIZE_PROMPT = "summarize our conversations so far in three sentences."
CONTINUE_PROMPT = "continue."


@dataclass(frozen=True)
class Exchange:
    """A user turn and the reply to it; `footer` is a line shown under the reply (the page's numbers)."""

    user: str
    reply: str = ""
    footer: str = ""
    hidden_user: bool = False


@dataclass(frozen=True)
class Conversation:
    """The exchanges so far, oldest first."""

    exchanges: tuple[Exchange, ...] = ()

    def ask(self, text: str, hidden: bool = False) -> Self:
        """A new user turn, with no reply yet."""
        return replace(self, exchanges=self.exchanges + (Exchange(text, hidden_user=hidden),))

    def extend_reply(self, text: str) -> Self:
        """Append `text` to the last reply."""
        last = self.exchanges[-1]
        return replace(self, exchanges=self.exchanges[:-1] + (replace(last, reply=last.reply + text),))

    def undo(self) -> Self:
        """Drop the last visible exchange (and the hidden Continue turns after it)."""
        exchanges = list(self.exchanges)
        while exchanges and exchanges[-1].hidden_user:
            exchanges.pop()
        return replace(self, exchanges=tuple(exchanges[:-1]))

    def last_user_turn(self) -> tuple[Self, str] | None:
        """For Regenerate: the conversation without its last visible exchange, and that prompt."""
        visible = [e for e in self.exchanges if not e.hidden_user]
        if not visible:
            return None
        return self.undo(), visible[-1].user

    def chat_messages(self, system: str) -> list[dict[str, str]]:
        """What the model sees, as OpenAI chat messages: `system` as the system prompt (when
        not blank), then every turn, hidden ones included; a turn without a reply yet ends it."""
        messages = [{"role": "system", "content": system}] if system.strip() else []
        for exchange in self.exchanges:
            messages.append({"role": "user", "content": exchange.user})
            if exchange.reply:
                messages.append({"role": "assistant", "content": exchange.reply})
        return messages
