"""The terminal chat client, driven through a pseudo-terminal like a person at a keyboard.

Against the served tiny model (whose replies are random text): replies are compared with
the server's own non-streamed answer to the same history. Against a key-protected API app
on a scripted backend (no Ray, no model): streaming piece by piece, API keys, Ctrl-C
cancelling on the server, and errors as one line.
"""

from __future__ import annotations

import asyncio
import os
import pty
import select
import signal
import sys
import termios
import threading
import time
from pathlib import Path

import httpx
import pytest

from client import cli
from client.conversation import CONTINUE_PROMPT, SUMMARIZE_PROMPT
from client.servers import free_port
from client.stream import event_data
from deployments.contract.errors import ApiError
from deployments.contract.messages import GenerateCall
from deployments.http.api import ApiSettings, build_api
from engine.request import Delta, RequestStats
from tests.fakes import ended, served_on_a_port
from tests.serve_fixtures import SERVED_MODEL, llm_handle, log_lines_after

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "\n" + cli.USER_PROMPT  # every prompt after the first starts a line
MAX_TOKENS = 16
STATS = RequestStats(prompt_tokens=3, completion_tokens=2, dropped_messages=0, latency=0.1,
                     time_to_first_token=0.05, tokens_per_second=20.0)


# --- Driving the client through a pseudo-terminal ----------------------------------------


class Terminal:
    """The client on a pseudo-terminal: type lines, press Ctrl-C/Ctrl-D, read the screen.

    Reads wait for a marker at most `timeout_s`, so a broken client fails a test instead of
    hanging it. Output is text with the terminal's CR LF turned back into LF.
    """

    def __init__(self, url: str, *args: str, env: dict[str, str] | None = None):
        argv = [sys.executable, "-m", "client.cli", "--url", url, *args]
        environ = {k: v for k, v in os.environ.items() if k not in cli.KEY_VARIABLES}
        environ |= {"PYTHONPATH": str(ROOT), "TERM": "dumb", **(env or {})}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the client at once
            try:
                # As in a fresh terminal session: Ctrl-C interrupts, even when the tests run
                # as a background job (which starts with SIGINT ignored, and exec keeps that).
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                os.execve(sys.executable, argv, environ)
            finally:
                os._exit(127)
        termios.tcsetwinsize(self.fd, (50, 200))
        self.raw, self.seen, self.status = b"", 0, None

    @property
    def screen(self) -> str:
        return self.raw.decode("utf-8", errors="replace").replace("\r\n", "\n")

    def _read(self, wait_s: float) -> bool:
        """Append what the client wrote within `wait_s`; False once it closed the terminal."""
        ready, _, _ = select.select([self.fd], [], [], wait_s)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the client exited
            data = b""
        self.raw += data
        return bool(data)

    def expect(self, marker: str, timeout_s: float = 30.0) -> str:
        """The output after the last expect, up to and including `marker`."""
        deadline = time.monotonic() + timeout_s
        while (found := self.screen.find(marker, self.seen)) < 0:
            left = deadline - time.monotonic()
            still_open = left > 0 and self._read(min(left, 0.5))
            if not still_open and self.screen.find(marker, self.seen) < 0:
                raise AssertionError(f"{marker!r} did not show within {timeout_s} s; the screen:\n{self.screen}")
        text = self.screen[self.seen: found + len(marker)]
        self.seen = found + len(marker)
        return text

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def press(self, key: bytes) -> None:
        os.write(self.fd, key)

    def exit_code(self, timeout_s: float = 15.0) -> int:
        """Wait for the client to exit (reading what it still writes)."""
        deadline = time.monotonic() + timeout_s
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                break
            assert time.monotonic() < deadline, f"the client did not exit; the screen:\n{self.screen}"
            self._read(0.1)
        return self.status

    def close(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.status = -signal.SIGKILL
        os.close(self.fd)


@pytest.fixture
def terminals():
    """Start clients with `terminals(url, *args, env=...)`; each is killed if a test leaves it running."""
    started: list[Terminal] = []

    def start(url: str, *args: str, env: dict[str, str] | None = None) -> Terminal:
        started.append(Terminal(url, *args, env=env))
        return started[-1]

    yield start
    for terminal in started:
        terminal.close()


def reply_after(terminal: Terminal, line: str) -> str:
    """Type `line` and return the reply shown before the next prompt."""
    terminal.type(line)
    shown = terminal.expect(PROMPT)
    assert cli.ASSISTANT_PREFIX in shown, shown
    return shown.split(cli.ASSISTANT_PREFIX, 1)[1].removesuffix(PROMPT)


# --- Against the served tiny model ---------------------------------------------------------


def server_answer(url: str, messages: list[dict], model: str = SERVED_MODEL, max_tokens: int = MAX_TOKENS) -> str:
    """The server's non-streamed greedy answer to `messages` (the client shows it through cli.printable)."""
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def as_printed(text: str) -> str:
    """A reply as the client prints it."""
    return cli.printable(text)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def start_tiny(terminals, served: str, *args: str) -> Terminal:
    terminal = terminals(served, "--model", SERVED_MODEL, "--temperature", "0", "--max-tokens", str(MAX_TOKENS),
                         *args)
    assert f"Chatting with {SERVED_MODEL} at {served}" in terminal.expect(cli.USER_PROMPT)
    return terminal


def test_chat_continue_and_summarize_send_the_history(served, terminals):
    terminal = start_tiny(terminals, served)
    first = server_answer(served, [user("Hello there")])
    assert first.strip() and reply_after(terminal, "Hello there") == as_printed(first)

    history = [user("Hello there"), assistant(first)]
    more = server_answer(served, [*history, user(CONTINUE_PROMPT)])  # the hidden turn is sent
    assert reply_after(terminal, "/continue") == as_printed(more)
    assert CONTINUE_PROMPT not in terminal.screen

    history += [user(CONTINUE_PROMPT), assistant(more)]
    terminal.type("/summarize")
    screen = terminal.expect(PROMPT)
    summary = server_answer(served, [*history, user(SUMMARIZE_PROMPT)])
    assert f"{cli.ASSISTANT_PREFIX}{as_printed(summary)}\n" in screen and "the summary is now the system prompt" in screen

    # the summary is the system prompt of a fresh history
    context = {"role": "system", "content": summary.strip()}
    assert reply_after(terminal, "And now?") == as_printed(server_answer(served, [context, user("And now?")]))
    terminal.type("/quit")
    assert terminal.exit_code() == 0


def test_model_switch_unknown_model_reset_and_eof(served, terminals):
    terminal = start_tiny(terminals, served, "--system", "Be brief.")
    system = {"role": "system", "content": "Be brief."}
    terminal.type("/models")
    listed = terminal.expect(PROMPT)
    assert f"* {SERVED_MODEL} (base model)" in listed and f"  alpha (adapter of {SERVED_MODEL})" in listed

    terminal.type("/model alpha")
    assert "(now talking to alpha)" in terminal.expect(PROMPT)
    first = server_answer(served, [system, user("Hello there")], model="alpha")
    assert reply_after(terminal, "Hello there") == as_printed(first)
    assert first != server_answer(served, [system, user("Hello there")])  # the adapter answered

    terminal.type("/model nope")
    shown = terminal.expect(PROMPT)
    assert f"error: unknown model `nope`; the server has: {SERVED_MODEL}, alpha, beta" in shown
    second = server_answer(served, [system, user("Hello there"), assistant(first), user("Again")], "alpha")
    assert reply_after(terminal, "Again") == as_printed(second)  # the session goes on, with alpha and its history

    terminal.type("/reset")
    assert "(history cleared)" in terminal.expect(PROMPT)
    assert reply_after(terminal, "Again") == as_printed(server_answer(served, [system, user("Again")], "alpha"))

    terminal.type("/nonsense")
    assert "error: unknown command /nonsense" in terminal.expect(PROMPT)
    terminal.type("/help")
    assert "/summarize" in terminal.expect(PROMPT)
    terminal.press(b"\x04")  # Ctrl-D at an empty prompt
    assert terminal.exit_code() == 0
    assert "Traceback" not in terminal.screen


def engine_stats():
    return llm_handle().stats.remote().result()


def test_ctrl_c_stops_the_reply_frees_the_engine_and_keeps_the_session(served, terminals, request_log):
    terminal = terminals(served, "--temperature", "0", "--max-tokens", "2000")  # the base model by default
    assert f"Chatting with {SERVED_MODEL}" in terminal.expect(cli.USER_PROMPT)
    before = engine_stats()
    logged = len(request_log.read_text().splitlines())
    terminal.type("Tell me everything")
    terminal.expect(cli.ASSISTANT_PREFIX)
    deadline = time.monotonic() + 30
    while not terminal.screen[terminal.seen:].strip() and time.monotonic() < deadline:
        terminal._read(0.1)
    terminal.press(b"\x03")
    partial = terminal.expect("\n(stopped)\n" + cli.USER_PROMPT).removesuffix("\n(stopped)\n" + cli.USER_PROMPT)
    assert partial.strip()
    deadline = time.monotonic() + 10
    while (stats := engine_stats()).tracked_requests and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stats.running == stats.tracked_requests == 0 and stats.finished_requests == before.finished_requests + 1
    # the server stopped generating because the client left (499), not at max_tokens
    assert log_lines_after(request_log, logged)[-1].endswith(f"model={SERVED_MODEL} endpoint=chat status=499")

    terminal.type("/reset")  # the client still works
    assert "(history cleared)" in terminal.expect(PROMPT)
    terminal.press(b"\x03")  # Ctrl-C at the prompt only discards the line
    terminal.expect(cli.USER_PROMPT)
    terminal.type("/quit")
    assert terminal.exit_code() == 0


# --- Against a key-protected API on a scripted backend -----------------------------------


GATE = object()  # in a script: wait until the test opens the gate


class FakeStream:
    """One call's items; `cancel` is what the API calls when the client goes away."""

    def __init__(self, backend: ScriptedBackend, items: list):
        self.backend, self.items = backend, list(items)

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self):
        while self.items:
            item = self.items.pop(0)
            if item is not GATE:
                return item
            while not self.backend.gate.is_set():
                await asyncio.sleep(0.01)
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.backend.cancelled.set()


class ScriptedBackend:
    """Plays the next script of `scripts` for each call and records the calls."""

    def __init__(self):
        self.scripts: list[list] = []
        self.calls: list[GenerateCall] = []
        self.gate, self.cancelled = threading.Event(), threading.Event()

    def stream(self, call: GenerateCall) -> FakeStream:
        self.calls.append(call)
        return FakeStream(self, self.scripts.pop(0))

    def messages(self, index: int) -> list[tuple[str, str]]:
        return [(m.role, m.content) for m in self.calls[index].messages]


@pytest.fixture(scope="module")
def keyed_server():
    """The API app (keys required: "sk-right") on uvicorn in a thread; yields (url, backend)."""
    backend = ScriptedBackend()
    settings = ApiSettings("base", (), ("lora",), api_keys=("sk-right",))
    with served_on_a_port(build_api(backend, settings)) as url:
        yield url, backend


@pytest.fixture
def fake(keyed_server):
    url, backend = keyed_server
    backend.scripts.clear(), backend.calls.clear(), backend.gate.clear(), backend.cancelled.clear()
    return url, backend


def test_replies_stream_piece_by_piece_with_the_key_from_the_environment(fake, terminals):
    url, backend = fake
    backend.scripts += [ended([Delta("Hel"), GATE, Delta("lo!", finish_reason="stop", stats=STATS)]),
                        ended([Delta("Fine.", finish_reason="stop", stats=STATS)])]
    terminal = terminals(url, "--model", "lora", env={"LLM_API_KEY": "sk-right", "OPENAI_API_KEY": "sk-wrong"})
    terminal.expect(cli.USER_PROMPT)
    terminal.type("hi")
    terminal.expect(cli.ASSISTANT_PREFIX + "Hel")  # shown while the server still holds the rest
    assert "lo!" not in terminal.screen
    backend.gate.set()
    assert terminal.expect(PROMPT) == "lo!" + PROMPT
    assert reply_after(terminal, "how are you?") == "Fine."
    assert backend.messages(1) == [("user", "hi"), ("assistant", "Hello!"), ("user", "how are you?")]
    assert backend.calls[1].adapter == "lora"
    terminal.type("/quit")
    assert terminal.exit_code() == 0


def test_openai_api_key_is_the_fallback(fake, terminals):
    url, backend = fake
    terminal = terminals(url, env={"OPENAI_API_KEY": "sk-right"})  # the model list answers: base is the default
    assert "Chatting with base" in terminal.expect(cli.USER_PROMPT)
    terminal.type("/quit")
    assert terminal.exit_code() == 0


def test_a_missing_or_wrong_key_is_one_line(fake, terminals):
    url, _ = fake
    terminal = terminals(url, "--model", "base", env={"LLM_API_KEY": "sk-wrong"})
    terminal.expect(cli.USER_PROMPT)
    terminal.type("hi")
    shown = terminal.expect(PROMPT)
    assert "error 401: Incorrect or missing API key" in shown and "LLM_API_KEY" in shown
    terminal.type("/quit")
    assert terminal.exit_code() == 0

    terminal = terminals(url)  # no key, no --model: the model list is refused, and the client says so
    assert terminal.exit_code() == 1
    assert "error 401: Incorrect or missing API key" in terminal.screen and "Traceback" not in terminal.screen


def test_ctrl_c_closes_the_stream_and_the_server_cancels(fake, terminals):
    url, backend = fake
    backend.scripts += [[Delta("partial "), GATE], ended([Delta("ok", finish_reason="stop", stats=STATS)])]
    terminal = terminals(url, "--model", "base", env={"LLM_API_KEY": "sk-right"})
    terminal.expect(cli.USER_PROMPT)
    terminal.type("go on forever")
    terminal.expect("partial ")
    terminal.press(b"\x03")
    terminal.expect("\n(stopped)" + PROMPT)
    assert backend.cancelled.wait(10)  # the server saw the client leave and cancelled the generation
    assert reply_after(terminal, "next") == "ok"
    assert backend.messages(1) == [("user", "go on forever"), ("assistant", "partial "), ("user", "next")]
    terminal.type("/quit")
    assert terminal.exit_code() == 0


def test_server_errors_are_one_line_and_the_session_goes_on(fake, terminals):
    url, backend = fake
    backend.scripts += [
        [ApiError(503, "the server is busy")],
        [ApiError(413, "the prompt is longer than the context window")],
        ended([Delta("half"), Delta(finish_reason="error", error="the replica died")]),
        ended([Delta("fine", finish_reason="stop", stats=STATS)]),
        ended([Delta(" and more", finish_reason="stop", stats=STATS)]),
    ]
    terminal = terminals(url, "--model", "base", env={"LLM_API_KEY": "sk-right"})
    terminal.expect(cli.USER_PROMPT)
    terminal.type("one")
    assert terminal.expect(PROMPT).endswith("\nerror 503: the server is busy (retry after 1 s)" + PROMPT)
    terminal.type("two")
    assert "\nerror 413: the prompt is longer than the context window" + PROMPT in terminal.expect(PROMPT)
    terminal.type("three")
    failed = terminal.expect(PROMPT)  # the server tells only that it failed, and the request id
    assert f"{cli.ASSISTANT_PREFIX}half\nerror: The server had an error while processing request " in failed
    assert failed.endswith("its log has the details." + PROMPT) and "replica died" not in failed
    terminal.type("/model nope")
    assert "error: unknown model `nope`; the server has: base, lora" in terminal.expect(PROMPT)
    assert reply_after(terminal, "four") == "fine"
    assert backend.messages(3) == [("user", "four")]  # failed turns stay out of the history
    assert reply_after(terminal, "/continue") == " and more"
    assert backend.messages(4) == [("user", "four"), ("assistant", "fine"), ("user", CONTINUE_PROMPT)]
    terminal.type("/quit")
    assert terminal.exit_code() == 0
    assert "Traceback" not in terminal.screen


def test_an_unreachable_server_is_one_line(terminals):
    terminal = terminals(f"http://127.0.0.1:{free_port()}", "--model", "x")
    terminal.expect(cli.USER_PROMPT)
    terminal.type("hello?")
    assert "error: cannot connect to http://127.0.0.1:" in terminal.expect(PROMPT)
    terminal.press(b"\x04")
    assert terminal.exit_code() == 0


# --- The pieces -----------------------------------------------------------------------------


def test_api_key_and_header_from_the_environment():
    assert cli.api_key({"LLM_API_KEY": " sk-a ", "OPENAI_API_KEY": "sk-b"}) == "sk-a"
    assert cli.api_key({"LLM_API_KEY": "", "OPENAI_API_KEY": "sk-b"}) == "sk-b"
    assert cli.api_key({}) == ""
    assert cli.request_headers("sk-a") == {"Authorization": "Bearer sk-a"} and cli.request_headers("") == {}
    assert cli.Api("http://h:1/v1/", "sk-a").http.headers["authorization"] == "Bearer sk-a"


def event_stream(lines: list[str]) -> httpx.Response:
    """A text/event-stream response whose body is `lines`."""
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, text="".join(line + "\n" for line in lines))


def test_sse_events_and_reply_pieces():
    lines = [": comment", "event: message", 'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}',
             "", 'data: {"choices": [{"delta": {"content": "Hel"}}]}', "", "data:{\"choices\":",
             'data: [{"delta": {"content": "lo"}}]}', "", 'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}',
             "", 'data: {"choices": [], "usage": {"completion_tokens": 2}}', "", "data: [DONE]", "", "data: ignored", ""]
    assert list(event_data(event_stream(["data: a", "data:  b", "", "", "data: c", ""]))) == ["a\n b", "c"]
    assert list(cli.reply_pieces(event_data(event_stream(lines)))) == ["Hel", "lo"]


@pytest.mark.parametrize("lines, message", [
    (['data: {"choices": [{"delta": {"content": "a"}}]}', ""], "ended before it was complete"),
    (['data: {"choices": [{"delta": {"content": "a"}}]}', "", "data: [DONE]"], "ended before it was complete"),
    (['data: {"error": {"message": "boom", "type": "server_error"}}', "", "data: [DONE]", ""], "^error: boom$"),
    (["data: {not json", ""], "malformed event"),
    (["data: [1, 2]", ""], "malformed event"),
])
def test_broken_streams_raise_one_line(lines, message):
    with pytest.raises(cli.ChatError, match=message):
        list(cli.reply_pieces(event_data(event_stream(lines))))


def test_error_bodies_become_one_line():
    body = '{"error": {"message": "The model `x`\\ndoes not exist", "type": "invalid_request_error"}}'
    assert cli.error_message(404, body) == "error 404: The model `x` does not exist"
    assert cli.error_message(503, '{"error": {"message": "busy"}}', "2") == "error 503: busy (retry after 2 s)"
    assert cli.error_message(404, '{"detail": "Not Found"}') == "error 404: Not Found"
    assert cli.error_message(502, "<html>\n<b>Bad gateway</b></html>") == "error 502: <html> <b>Bad gateway</b></html>"
    assert cli.error_message(500, "") == "error 500: Internal Server Error"
    assert cli.error_message(401, "{}").startswith("error 401: Unauthorized (the key comes from LLM_API_KEY")


def test_terminal_control_characters_are_not_passed_through():
    assert cli.printable("a\tb\nc\r\n\x1b[2J\x07\x9b") == "a\tb\nc\n\ufffd[2J\ufffd\ufffd"


def test_session_request_body():
    session = cli.Session("m", system="ctx", temperature=0.0, max_tokens=8)
    session.conversation = session.conversation.ask("hi").extend_reply("hello")
    assert session.body(session.conversation.ask("more")) == {
        "model": "m", "stream": True, "temperature": 0.0, "max_tokens": 8,
        "messages": [{"role": "system", "content": "ctx"}, user("hi"), assistant("hello"), user("more")],
    }
    assert cli.Session("m").body(cli.Session("m").conversation.ask("x")) == {
        "model": "m", "messages": [user("x")], "stream": True}
    assert cli.api_root("http://h:1/v1/") == "http://h:1"
