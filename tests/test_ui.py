"""The chat page at /ui: its Gradio API with gradio_client, and the page in a real Chromium."""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest

from deployments.ui.chat_state import escape
from engine.prompt import ChatMessage, PromptBuilder
from tests.serve_fixtures import SERVED_MODEL, llm_handle, log_lines_after
from tests.tiny_models import build_tokenizer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SETTINGS = [0.0, 0.95, 0, 64, 1.0]  # temperature, top_p, top_k, max new tokens, repetition penalty


@pytest.fixture(scope="module")
def ui_url(served):
    return f"{served}/ui/"


@pytest.fixture(scope="module")
def expected_reply(reference):
    """Greedy reply text to a conversation of user turns, as the page's history sends it."""
    builder = PromptBuilder(build_tokenizer(), "auto", 2048)

    def expected(messages: list[ChatMessage], max_tokens: int, adapter_dir=None) -> str:
        ids = builder.chat(messages, max_tokens).token_ids
        return builder.tokenizer.decode(reference(ids, max_tokens, adapter_dir), skip_special_tokens=True)

    return expected


def bubble_text(bubble: dict) -> str:
    return squash("".join(part["text"] for part in bubble["content"] if part.get("type") == "text"))


def without_footer(text: str) -> str:
    return re.sub(r"\s*\*\d+ tokens[^*]*\*$", "", text)


def squash(text: str) -> str:
    """Whitespace folded (Gradio turns tabs into spaces)."""
    return " ".join(text.split())


def test_gradio_api_chat_continue_summarize(ui_url, expected_reply, request_log):
    from gradio_client import Client

    client = Client(ui_url, verbose=False)
    bubbles, notice, box = client.predict("Hello there", "", SERVED_MODEL, *SETTINGS, api_name="/chat")
    reply = expected_reply([ChatMessage("user", "Hello there")], 64)
    assert [b["role"] for b in bubbles] == ["user", "assistant"] and box == "" and notice == ""
    assert bubble_text(bubbles[1]).startswith(squash(escape(reply))) and "tokens" in bubble_text(bubbles[1])

    bubbles, _ = client.predict("", SERVED_MODEL, *SETTINGS, api_name="/continue")
    history = [ChatMessage("user", "Hello there"), ChatMessage("assistant", reply), ChatMessage("user", "continue.")]
    assert [b["role"] for b in bubbles] == ["user", "assistant", "assistant"]  # the prompt stays hidden
    assert bubble_text(bubbles[2]).startswith(squash(escape(expected_reply(history, 64))))

    context, bubbles, notice = client.predict("", SERVED_MODEL, *SETTINGS, api_name="/summarize")
    assert context and bubbles == [] and "Context" in notice

    def page_lines() -> list[str]:  # the page's replies take the API's request path: logged alike
        return [line for line in request_log.read_text().splitlines() if "endpoint=ui status=200" in line]

    deadline = time.monotonic() + 10
    while len(page_lines()) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(page_lines()) >= 3 and all("completion_tokens=" in line for line in page_lines())


def test_the_page_loads_the_current_defaults(ui_url):
    """Settings start at the server's generation defaults of the moment, not of the page's build."""
    from gradio_client import Client

    handle = llm_handle()
    live = {"batch_size": 4, "stream_interval_s": 0.0, "defaults": {"temperature": 0.0}}  # the served fixture's
    handle.reconfigure.remote({**live, "defaults": {"temperature": 1.25, "top_p": 0.5, "max_tokens": 96}}).result()
    try:
        assert Client(ui_url, verbose=False).predict(api_name="/defaults") == (1.25, 0.5, 0, 96, 1.0)
    finally:
        handle.reconfigure.remote(live).result()
    assert Client(ui_url, verbose=False).predict(api_name="/defaults")[0] == 0.0


def test_gradio_api_adapter_choice(ui_url, expected_reply, adapter_dirs):
    from gradio_client import Client

    client = Client(ui_url, verbose=False)
    bubbles, _, _ = client.predict("Hello there", "", "alpha", *SETTINGS, api_name="/chat")
    expected = expected_reply([ChatMessage("user", "Hello there")], 64, adapter_dirs["alpha"])
    assert bubble_text(bubbles[1]).startswith(squash(escape(expected)))
    bubbles, _ = client.predict(api_name="/undo")
    assert bubbles == []


def test_gradio_api_regenerate_and_the_context_budget_notice(ui_url, expected_reply):
    from gradio_client import Client

    client = Client(ui_url, verbose=False)
    first, _, _ = client.predict("Hello there", "", SERVED_MODEL, *SETTINGS, api_name="/chat")
    again, _ = client.predict("", SERVED_MODEL, *SETTINGS, api_name="/regenerate")
    assert [without_footer(bubble_text(b)) for b in again] == [without_footer(bubble_text(b)) for b in first]
    per_word = len(build_tokenizer()("word " * 100)["input_ids"]) / 100
    long_turn = "word " * int(600 / per_word)  # one fits max_input_tokens (1024), two do not
    client.predict(long_turn, "", SERVED_MODEL, *SETTINGS, api_name="/chat")
    _, notice, _ = client.predict(long_turn, "", SERVED_MODEL, *SETTINGS, api_name="/chat")
    assert "oldest messages were left out" in notice


def test_sessions_stream_at_the_same_time(ui_url):
    from gradio_client import Client

    long = [0.0, 0.95, 0, 1500, 1.0]
    jobs = [Client(ui_url, verbose=False).submit(f"Story {i}", "", SERVED_MODEL, *long, api_name="/chat")
            for i in range(2)]
    peak = 0
    while not all(job.done() for job in jobs):
        peak = max(peak, engine_stats().running)
        time.sleep(0.02)
    assert peak == 2  # both sessions were in the engine's batch together


@pytest.fixture(scope="module")
def page(ui_url):
    if not shutil.which(CHROMIUM):
        message = "Debian's chromium is not installed (make test installs it when run as root)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(ui_url, wait_until="domcontentloaded")
        page.locator("#message textarea").wait_for(state="visible", timeout=30_000)
        yield page
        browser.close()


def send(page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")


BOT_BUBBLES = '[data-testid="bot"]'


def bot_texts(page) -> list[str]:
    return page.locator(BOT_BUBBLES).all_inner_texts()


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def engine_stats():
    """The LLM replica's engine stats (from a thread: Playwright's sync API runs an event loop here)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: llm_handle().stats.remote().result()).result()


def set_number(page, label: str, value: int) -> None:
    """Type into a slider's number box (the accordion must be open). Playwright's `fill` waits
    until the box is enabled: the page unlocks its settings once it has loaded the defaults.
    Types again while the box shows another value: a box still being drawn as the accordion
    opens can drop what was typed (seen once in CI: the value never arrived within 5 s)."""
    box = page.locator(f'input[type="number"][aria-label*="{label}"]')

    def typed() -> bool:
        if box.input_value() != str(value):
            box.fill(str(value))
            box.press("Enter")
            box.blur()
        return box.input_value() == str(value)

    wait_for(typed, timeout_s=10)


def clear(page) -> None:
    page.locator("#clear-button").click()
    wait_for(lambda: not bot_texts(page), timeout_s=10)


def choose_model(page, name: str) -> None:
    dropdown = page.get_by_label("Model or adapter")
    dropdown.click()
    page.get_by_role("option", name=name).click()
    wait_for(lambda: dropdown.input_value() == name, timeout_s=5)


def footers(page) -> int:
    return sum(text.count("tokens/s") for text in bot_texts(page))


def test_browser_chat_streams_a_reply_then_continue_and_summarize(page):
    send(page, "Hello there")
    wait_for(lambda: footers(page) == 1)
    assert "Hello there" in page.locator('[data-testid="user"]').first.inner_text()
    page.locator("#continue-button").click()
    wait_for(lambda: footers(page) == 2)
    assert "continue." not in page.locator("#chatbot").inner_text()
    page.locator("#summarize-button").click()
    wait_for(lambda: page.get_by_label("Context").input_value() != "" and not bot_texts(page))


# Clicks Stop inside the page as soon as a reply shows text. Polling from the test and
# Playwright's click (which waits for the button to be stable) took seconds on a busy machine,
# while the page redrew the growing reply, long enough for the reply to finish first.
CLICK_STOP_AT_FIRST_TEXT = """(botBubbles) => {
    window.__stopClicked = false;
    const observer = new MutationObserver(() => {
        const bots = document.querySelectorAll(botBubbles);
        if (![...bots].some(bot => bot.innerText.trim())) return;
        observer.disconnect();
        document.querySelector("#stop-button").click();
        window.__stopClicked = true;
    });
    observer.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def stop_at_the_first_text(page):
    """Send a prompt whose reply runs to max_tokens, click Stop once its first text shows, wait
    until the engine holds no request; the engine's stats from before the send."""
    before = engine_stats()
    page.evaluate(CLICK_STOP_AT_FIRST_TEXT, BOT_BUBBLES)
    # The tiny model's greedy reply to this prompt runs all 2,000 tokens without an end (HF
    # generate; "Tell me everything" ends at 389), so only Stop can end it before max_tokens.
    send(page, "write write")
    wait_for(lambda: page.evaluate("window.__stopClicked"))
    wait_for(lambda: engine_stats().tracked_requests == 0, timeout_s=10)
    return before


def test_browser_stop_keeps_the_partial_reply_and_frees_the_row(page, request_log):
    page.get_by_text("Generation settings").click()
    # The tiny model writes the 2,000 tokens in about 5 s; on a machine busy with other work the
    # browser can take longer than that to click Stop, and then there is nothing left to stop.
    # Such a try says nothing about Stop, so it is made again (at most 3 tries).
    for _ in range(3):
        clear(page)
        page.get_by_label("Context").fill("")  # a summary left by another test would not fit beside 2000 tokens
        set_number(page, "Max new tokens", 2000)
        logged = len(request_log.read_text().splitlines())
        before = stop_at_the_first_text(page)
        partial = bot_texts(page)
        if not (partial and "tokens/s" in partial[-1]):
            break
    assert partial and partial[-1].strip() and "tokens/s" not in partial[-1]  # unfinished reply kept
    assert "⚠" not in partial[-1]  # a reply, not a refusal
    stats = engine_stats()
    assert stats.running == 0 and stats.finished_requests == before.finished_requests + 1
    assert stats.generated_tokens - before.generated_tokens < 2000  # stopped, not run to max_tokens
    model = page.get_by_label("Model or adapter").input_value()
    # recorded as the API records a client that left: 499, by the request path both share (service.py)
    assert log_lines_after(request_log, logged)[-1].endswith(f"model={model} endpoint=ui status=499")


def test_browser_adapter_switch_and_no_script_injection(page):
    clear(page)
    set_number(page, "Max new tokens", 32)
    send(page, "Hello there")
    wait_for(lambda: footers(page) == 1)
    base_reply = bot_texts(page)[-1]
    page.get_by_label("Model or adapter").click()
    page.get_by_role("option", name="alpha").click()
    clear(page)
    send(page, "Hello there")
    wait_for(lambda: footers(page) == 1)
    assert bot_texts(page)[-1] != base_reply
    attack = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script>'
    send(page, attack)
    wait_for(lambda: footers(page) == 2)
    assert page.evaluate("window.__pwned") is None
    assert attack in page.locator('[data-testid="user"]').last.inner_text()

