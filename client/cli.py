"""A terminal chat client for the server's OpenAI-compatible API (FastChat's CLI counterpart).

    python -m client.cli [--url http://127.0.0.1:8000] [--model NAME] [--system TEXT]
                              [--temperature T] [--max-tokens N]

Type a message and the reply streams as it is generated; the whole history goes with every
turn. Commands: /summarize, /continue, /reset, /model NAME, /models, /help, /quit (or
Ctrl-D). Ctrl-C stops a reply and keeps what arrived, as the chat page's Stop does: closing
the stream makes the server cancel the generation. The API key comes from LLM_API_KEY, else
OPENAI_API_KEY. Only httpx and httpx-sse are needed: no torch, no Ray. The conversation is
client/conversation.py's, the chat page's too; the stream is read by client/stream.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from client.bodies import chat_body
from client.conversation import CONTINUE_PROMPT, SUMMARIZE_PROMPT, Conversation
from client.stream import StreamError, chunks, delta_text, error_text, event_data, one_line

DEFAULT_URL = "http://127.0.0.1:8000"
KEY_VARIABLES = ("LLM_API_KEY", "OPENAI_API_KEY")
USER_PROMPT = "USER: "
ASSISTANT_PREFIX = "ASSISTANT: "
TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=30.0, pool=10.0)
# Control characters would let a model's output drive the terminal: show U+FFFD instead,
# drop carriage returns, keep tabs and newlines.
UNPRINTABLE = {c: "\ufffd" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x09, 0x0A)} | {0x0D: None}
HELP = f"""Type a message and press Enter; the reply streams as it is generated.
  /continue      extend the last answer (sends "{CONTINUE_PROMPT}" as a hidden turn)
  /summarize     summarize the conversation; the summary becomes the system prompt
                 and the history starts afresh
  /reset         clear the history (the system prompt stays)
  /model NAME    talk to another model or LoRA adapter (the history stays)
  /models        list the served models and adapters
  /help          this help
  /quit          exit (so does Ctrl-D)
Ctrl-C stops a reply and keeps what arrived."""


class ChatError(Exception):
    """A failed request, already phrased as one line for the user."""


# --- HTTP, SSE and error bodies: small pure functions -----------------------------------


def api_key(environ: Mapping[str, str]) -> str:
    """The API key from LLM_API_KEY, else OPENAI_API_KEY; "" when neither is set."""
    for name in KEY_VARIABLES:
        if value := environ.get(name, "").strip():
            return value
    return ""


def request_headers(key: str) -> dict[str, str]:
    """Headers for every request: `Authorization: Bearer <key>` when there is a key."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def api_root(url: str) -> str:
    """The server's root URL; an OpenAI-style base URL ending in /v1 is accepted too."""
    url = url.strip().rstrip("/")
    return url.removesuffix("/v1")


def reply_pieces(data: Iterable[str]) -> Iterator[str]:
    """The text pieces of a streamed chat completion's events, up to `data: [DONE]`.

    Raises ChatError for an error event (how the server fails once streaming began), for a
    malformed event, and for a stream that ends without [DONE].
    """
    try:
        for chunk in chunks(data):
            if text := delta_text(chunk):
                yield text
    except StreamError as err:
        raise ChatError(f"error: {err}") from None


def error_message(status: int, body: str, retry_after: str | None = None) -> str:
    """One line for a failed response: status, the server's message, and when to retry."""
    try:
        message = error_text(json.loads(body))  # "" for JSON without a message
    except json.JSONDecodeError:
        message = one_line(body, 200)  # a proxy's HTML or text page
    message = message or httpx.codes.get_reason_phrase(status) or "request failed"
    line = f"error {status}: {message}"
    if retry_after and status in (429, 503):
        line += f" (retry after {retry_after} s)"
    if status == 401:
        line += f" (the key comes from {' or '.join(KEY_VARIABLES)})"
    return line


def transport_error(exc: httpx.HTTPError, root: str) -> str:
    """One line for a request that got no HTTP answer."""
    if isinstance(exc, httpx.ConnectError):
        return f"error: cannot connect to {root}: {exc}"
    if isinstance(exc, httpx.TimeoutException):
        return f"error: {root} did not answer in time ({type(exc).__name__})"
    return f"error: {type(exc).__name__}: {exc}"


def printable(text: str) -> str:
    """Model output made safe for a terminal: control characters shown as U+FFFD."""
    return text.translate(UNPRINTABLE)


# --- The server ------------------------------------------------------------------------


class Api:
    """The server's HTTP API: one connection pool, the API key on every request."""

    def __init__(self, url: str, key: str):
        self.root = api_root(url)
        self.http = httpx.Client(base_url=self.root, headers=request_headers(key), timeout=TIMEOUT)

    def close(self) -> None:
        self.http.close()

    @contextmanager
    def errors_as_lines(self) -> Iterator[None]:
        """Turn transport failures into ChatError."""
        try:
            yield
        except httpx.HTTPError as exc:
            raise ChatError(transport_error(exc, self.root)) from None

    def models(self) -> list[dict]:
        """GET /v1/models: the base model first, then the adapters."""
        with self.errors_as_lines():
            response = self.http.get("/v1/models")
        if response.status_code != 200:
            raise ChatError(error_message(response.status_code, response.text, response.headers.get("retry-after")))
        try:
            return [card for card in response.json()["data"] if isinstance(card, dict) and "id" in card]
        except (ValueError, KeyError, TypeError):
            raise ChatError(f"error: {self.root}/v1/models did not answer with a model list") from None

    @contextmanager
    def chat_stream(self, body: dict) -> Iterator[Iterator[str]]:
        """POST a streaming chat completion; yield its text pieces once the server accepted it.

        Leaving the block early (Ctrl-C) closes the response and its connection, and the
        server cancels the generation.
        """
        with self.errors_as_lines(), self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise ChatError(error_message(response.status_code, response.text, response.headers.get("retry-after")))
            yield reply_pieces(event_data(response))


# --- The conversation ------------------------------------------------------------------


@dataclass
class Session:
    """What the model sees: the model to ask, the system prompt and the conversation so far."""

    model: str
    system: str = ""
    temperature: float | None = None
    max_tokens: int | None = None
    conversation: Conversation = field(default_factory=Conversation)

    def body(self, asked: Conversation) -> dict:
        """A streaming request for the reply to `asked`'s last turn; unset sampling fields take
        the server's defaults."""
        return chat_body(self.model, asked.chat_messages(self.system), temperature=self.temperature,
                         max_tokens=self.max_tokens)


@dataclass
class Reply:
    """What arrived of a reply; `stopped` when Ctrl-C cut it short."""

    text: str
    stopped: bool = False


def stream_reply(api: Api, session: Session, asked: Conversation) -> Reply | None:
    """Ask for the reply to `asked`'s last turn and print it as it streams.

    None when the request failed (the error is printed). Ctrl-C returns what arrived.
    """
    pieces: list[str] = []
    try:
        with api.chat_stream(session.body(asked)) as stream:
            print(ASSISTANT_PREFIX, end="", flush=True)
            for piece in stream:
                pieces.append(piece)
                print(printable(piece), end="", flush=True)
    except KeyboardInterrupt:
        print("\n(stopped)", flush=True)
        return Reply("".join(pieces), stopped=True)
    except ChatError as err:
        print(("\n" if pieces else "") + str(err), flush=True)
        return None
    print(flush=True)
    return Reply("".join(pieces))


def say(api: Api, session: Session, text: str, hidden: bool = False) -> None:
    """One turn; a stopped reply keeps its partial text in the history (nothing if none arrived)."""
    asked = session.conversation.ask(text, hidden)
    reply = stream_reply(api, session, asked)
    if reply and (reply.text or not reply.stopped):
        session.conversation = asked.extend_reply(reply.text)


def continue_reply(api: Api, session: Session, _: str) -> None:
    """Extend the last answer: "continue." goes as a user turn the screen does not show."""
    if not session.conversation.exchanges:
        print("(nothing to continue yet)")
        return
    say(api, session, CONTINUE_PROMPT, hidden=True)


def summarize(api: Api, session: Session, _: str) -> None:
    """Ask for a summary; it becomes the system prompt and the history starts afresh."""
    if not session.conversation.exchanges:
        print("(nothing to summarize yet)")
        return
    reply = stream_reply(api, session, session.conversation.ask(SUMMARIZE_PROMPT))
    if reply is None or reply.stopped or not reply.text.strip():
        print("(the history is unchanged)")
        return
    session.system, session.conversation = reply.text.strip(), Conversation()
    print("(the summary is now the system prompt; the history starts afresh)")


def reset(_: Api, session: Session, __: str) -> None:
    """Forget the turns so far; the system prompt stays."""
    session.conversation = Conversation()
    print("(history cleared)")


def switch_model(api: Api, session: Session, name: str) -> None:
    """Talk to another model or adapter, if the server serves it; show the current one without a name."""
    if not name:
        print(f"(talking to {session.model}; /models lists the others)")
        return
    names = [card["id"] for card in api.models()]
    if name not in names:
        raise ChatError(f"error: unknown model `{name}`; the server has: {', '.join(names)}")
    session.model = name
    print(f"(now talking to {name})")


def list_models(api: Api, session: Session, _: str) -> None:
    """The served models and adapters, the current one starred."""
    for card in api.models():
        kind = f"adapter of {card['parent']}" if card.get("parent") else "base model"
        print(f"{'*' if card['id'] == session.model else ' '} {card['id']} ({kind})")


def show_help(*_: object) -> None:
    print(HELP)


Command = Callable[[Api, Session, str], None]
COMMANDS: dict[str, Command] = {
    "/summarize": summarize, "/continue": continue_reply, "/reset": reset, "/model": switch_model,
    "/models": list_models, "/help": show_help,
}
QUIT = ("/quit", "/exit")


def handle(api: Api, session: Session, line: str) -> bool:
    """Run one input line (a message or a command); False when the user wants to quit."""
    if not line.startswith("/"):
        say(api, session, line)
        return True
    name, _, argument = line.partition(" ")
    if name in QUIT:
        return False
    command = COMMANDS.get(name)
    if command is None:
        print(f"error: unknown command {name} (/help lists them)")
        return True
    command(api, session, argument.strip())
    return True


def repl(api: Api, session: Session) -> int:
    """Read lines until /quit or end of input; Ctrl-C at the prompt discards the line."""
    while True:
        try:
            line = input(USER_PROMPT).strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if not line:
            continue
        try:
            if not handle(api, session, line):
                return 0
        except ChatError as err:
            print(err, flush=True)
        except KeyboardInterrupt:
            print("\n(cancelled)", flush=True)
        except Exception as err:  # a bug in here must not end the conversation with a traceback
            print(f"error: {type(err).__name__}: {one_line(str(err))}", flush=True)


# --- The command line -------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client.cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL, metavar="URL", help=f"the server (default {DEFAULT_URL})")
    parser.add_argument("--model", metavar="NAME", help="model or adapter name (default: the server's base model)")
    parser.add_argument("--system", default="", metavar="TEXT", help="system prompt (the chat page's Context)")
    parser.add_argument("--temperature", type=non_negative_float, metavar="T", help="0 = greedy (default: the server's)")
    parser.add_argument("--max-tokens", type=positive_int, metavar="N", help="reply length limit (default: the server's)")
    return parser.parse_args(argv)


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be a number >= 0")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def enable_line_editing() -> None:
    """Arrow keys and history for input(), where readline exists."""
    try:
        import readline  # noqa: F401
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # any reply prints, whatever the terminal's encoding
    api = Api(args.url, api_key(os.environ))
    try:
        try:
            model = args.model or api.models()[0]["id"]
        except (ChatError, IndexError) as err:
            print(err if isinstance(err, ChatError) else f"error: {api.root} serves no model")
            return 1
        session = Session(model, args.system, args.temperature, args.max_tokens)
        print(f"Chatting with {model} at {api.root}. /help lists the commands; /quit or Ctrl-D exits.")
        enable_line_editing()
        return repl(api, session)
    except KeyboardInterrupt:
        print()
        return 130
    finally:
        api.close()


if __name__ == "__main__":
    sys.exit(main())
