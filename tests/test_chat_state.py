"""The chat page's conversation logic, without Gradio."""

from __future__ import annotations

import pytest

from deployments.contract.errors import ApiError
from deployments.frontend.served_models import ServedModels
from deployments.frontend.service import RequestService
from deployments.ui.chat_state import CONTINUE_PROMPT, Conversation, escape, footer_text
from engine.config import SamplingOverrides
from engine.request import Delta, RequestStats
from tests.error_bodies import leaks
from tests.fakes import ScriptedBackend, ended

BASE = ServedModels("base")
STATS = RequestStats(prompt_tokens=9, completion_tokens=12, dropped_messages=0, latency=1.0,
                     time_to_first_token=0.1, tokens_per_second=20.0)


def test_messages_carry_context_and_hidden_turns():
    c = Conversation().ask("Hi").extend_reply("Hello").ask(CONTINUE_PROMPT, hidden=True).extend_reply(" more")
    roles = [(m.role, m.content) for m in c.messages("Be kind.")]
    assert roles == [("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello"),
                     ("user", CONTINUE_PROMPT), ("assistant", " more")]
    assert [m.role for m in c.messages("  ")] == ["user", "assistant", "user", "assistant"]


def test_display_hides_continue_prompts_and_escapes_html():
    c = Conversation().ask("<script>alert(1)</script>").extend_reply("<img src=x onerror=alert(1)>")
    c = c.finish_reply(STATS).ask(CONTINUE_PROMPT, hidden=True).extend_reply("next")
    bubbles = c.display()
    assert [b["role"] for b in bubbles] == ["user", "assistant", "assistant"]
    assert bubbles[0]["content"] == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert "<img" not in bubbles[1]["content"] and bubbles[1]["content"].endswith("*12 tokens · 20.0 tokens/s*")


def test_undo_and_regenerate_skip_hidden_turns():
    c = Conversation().ask("one").extend_reply("1").ask("two").extend_reply("2").ask(CONTINUE_PROMPT, hidden=True)
    assert [e.user for e in c.undo().exchanges] == ["one"]
    earlier, prompt = c.last_user_turn()
    assert prompt == "two" and [e.user for e in earlier.exchanges] == ["one"]
    assert Conversation().last_user_turn() is None


def test_dropped_turns_raise_a_notice_and_errors_show_in_the_footer():
    dropped = RequestStats(**{**STATS.__dict__, "dropped_messages": 4})
    c = Conversation().ask("q").finish_reply(dropped)
    assert "4 oldest messages" in c.notice
    assert footer_text(None, "⚠ boom") == "⚠ boom"
    assert escape("a & b <c>") == "a &amp; b &lt;c&gt;"


@pytest.mark.parametrize("script", [
    ended([Delta("half"), Delta(finish_reason="error", error="RuntimeError at 0x7f00dead (pid=7)")]),
    [ApiError(500, "internal error: KeyError('ServeReplica')")],
])
async def test_a_failed_reply_shows_the_request_id_not_the_error(script):
    from deployments.ui.page import stream_reply

    backend, finished = ScriptedBackend(script), []
    service = RequestService(backend, finished.append)
    *_, last = [c async for c in stream_reply(service, Conversation().ask("hi"), "", "base", SamplingOverrides(), BASE)]
    footer = last.exchanges[-1].footer
    assert backend.calls[0].request_id in footer and not leaks([footer])
    assert [(f.endpoint, f.status) for f in finished] == [("ui", 500)]  # the page's replies are logged too


async def test_the_page_keeps_the_message_limit():
    from deployments.ui.page import stream_reply

    service = RequestService(ScriptedBackend(ended([Delta("x", finish_reason="stop")])), max_messages=2)
    long_chat = Conversation().ask("a").extend_reply("first reply").ask("b")  # three messages
    *_, last = [c async for c in stream_reply(service, long_chat, "", "base", SamplingOverrides(), BASE)]
    assert "at most 2 messages" in last.exchanges[-1].footer


async def test_a_fast_stream_updates_the_page_at_a_bounded_rate():
    """1,000 deltas arriving at once: the first shows at once, the rest in a few updates, and the
    last update holds the whole reply with its footer."""
    from deployments.ui.page import stream_reply

    script = [Delta(f"{i} ") for i in range(999)] + ended([Delta("end", finish_reason="stop", stats=STATS)])
    service = RequestService(ScriptedBackend(script))
    shown = [c async for c in stream_reply(service, Conversation().ask("hi"), "", "base", SamplingOverrides(), BASE)]
    assert shown[0].exchanges[-1].reply == "0 " and len(shown) < 20
    last = shown[-1].exchanges[-1]
    assert last.reply == "".join(f"{i} " for i in range(999)) + "end" and "12 tokens" in last.footer


async def test_text_held_back_by_the_page_rate_is_shown_when_the_stream_ends():
    from deployments.ui.page import stream_reply

    service = RequestService(ScriptedBackend([Delta("a"), Delta("b")]))  # no finish delta
    shown = [c async for c in stream_reply(service, Conversation().ask("hi"), "", "base", SamplingOverrides(), BASE)]
    assert [c.exchanges[-1].reply for c in shown] == ["a", "ab"]
