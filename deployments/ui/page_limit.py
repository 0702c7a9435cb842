"""The chat page's rate limit: the API's token bucket (guard.RateLimiter), per API key when the
page asks for one, else per client address.

With API keys the page's login takes any user name and a key as the password, and a user is
counted by that key (`guard.client_id`, as the API counts it) at the API's own
`rate_limit_per_minute` (the llm application's): the page gives a key no more replies than
the API does. Gradio keeps only the user name of a login, so `PageLogins` remembers which key
each login used, by the session token Gradio sets in its cookie (`KeyedLogins` reads it off
the login's answer). The API and the page count in their own processes (so does every ingress
replica): a key used on both gets its limit on each.

Without keys a client is its address (the browser session's id when the address is unknown),
at the ui application's `rate_limit_per_minute`. An address rather than the session: a new
session is one page reload away. Behind a proxy that hides addresses every user shares one
bucket; set the limit with that in mind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie

import gradio as gr
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.contract.errors import ApiError
from deployments.frontend.guard import (
    BodyTooLarge, RateLimiter, client_id, key_matches, read_body, reject_too_large, replay,
)

SESSION_COOKIE = "access-token-"  # the prefix of the cookies holding Gradio's login token
MAX_LOGIN_BYTES = 1 << 16


def page_client(request: gr.Request | None) -> str:
    """Who sent this page event: the client's address, else the session, else one shared name."""
    client = getattr(request, "client", None) if request is not None else None
    if client is not None and getattr(client, "host", None):
        return f"address:{client.host}"
    session = getattr(request, "session_hash", None) if request is not None else None
    return f"session:{session}" if session else "anonymous"


@dataclass
class PageLogins:
    """The page's API keys, and which key (its `client_id`) each login token was given for."""

    keys: tuple[str, ...]
    clients: dict[str, str] = field(default_factory=dict, repr=False)  # Gradio login token -> client id

    def check(self, _user: str, password: str) -> bool:
        """Gradio's auth function: any user name, an API key as the password."""
        return key_matches(password, self.keys)

    def bind(self, token: str, password: str) -> None:
        """Remember the key of a login that succeeded with `token` (a wrong key binds nothing)."""
        if self.check("", password):
            self.clients[token] = client_id(password)

    def client(self, request: gr.Request | None) -> str | None:
        """The key a page event's session logged in with (as a client id), None if unknown."""
        cookies = _cookies(request)
        return next((self.clients[value] for name, value in cookies.items()
                     if name.startswith(SESSION_COOKIE) and value in self.clients), None)


class KeyedLogins:
    """ASGI middleware around the page's app: tells `logins` which key each successful
    POST .../login used and which session token Gradio answered it with (its Set-Cookie)."""

    def __init__(self, app: ASGIApp, logins: PageLogins):
        self.app, self.logins = app, logins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/login"):
            return await self.app(scope, receive, send)
        try:
            body = await read_body(receive, MAX_LOGIN_BYTES)
        except BodyTooLarge:
            return await reject_too_large(send, MAX_LOGIN_BYTES)
        if body is None:
            return
        password = await _password(scope, replay(body, receive))

        async def send_and_bind(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200 and password is not None:
                for token in _session_tokens(message.get("headers", [])):
                    self.logins.bind(token, password)
            await send(message)

        await self.app(scope, replay(body, receive), send_and_bind)


@dataclass
class PageLimit:
    """`per_minute` replies per page user, None: no limit. Per key with `logins` (a session
    whose key is unknown is refused: log in again), else per client address."""

    per_minute: int | None
    logins: PageLogins | None = None

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(self.per_minute) if self.per_minute else None

    def refusal(self, request: gr.Request | None) -> ApiError | None:
        """An error to show on the page when this user is over the limit (and count the reply if not)."""
        if self.limiter is None:
            return None
        client = self.logins.client(request) if self.logins is not None else page_client(request)
        if client is None:
            return ApiError(401, "This session's API key is not known here: log in again.", code="invalid_api_key")
        if not (wait := self.limiter.retry_after(client)):
            return None
        whose = "for this API key" if self.logins is not None else "from this address"
        return ApiError(429, f"Too many replies {whose}: wait {math.ceil(wait)} s and send again.",
                        code="rate_limit_exceeded", retry_after=wait)


def _cookies(request: gr.Request | None) -> Mapping[str, str]:
    cookies = getattr(request, "cookies", None) if request is not None else None
    return {name: cookies[name] for name in cookies.keys()} if cookies else {}


def _session_tokens(headers: list[tuple[bytes, bytes]]) -> set[str]:
    """The values of the login-token cookies a response sets."""
    tokens = set()
    for name, value in headers:
        if name.lower() == b"set-cookie":
            for morsel in SimpleCookie(value.decode("latin-1")).values():
                if morsel.key.startswith(SESSION_COOKIE) and morsel.value:
                    tokens.add(morsel.value)
    return tokens


async def _password(scope: Scope, receive: Receive) -> str | None:
    """The `password` of a login form (urlencoded or multipart), None if there is none."""
    try:
        password = (await Request(scope, receive).form()).get("password")
    except Exception:  # not a form: Gradio answers it
        return None
    return password if isinstance(password, str) else None
