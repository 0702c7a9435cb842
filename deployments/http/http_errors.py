"""Every error the HTTP layer answers, in OpenAI's error JSON, and nothing internal in it.

Covers what happens before a route runs (a body that is not JSON, not UTF-8, nested too
deeply, or fails validation; an unknown route or method) as well as `ApiError`s raised by
the routes and exceptions nobody caught. A 500 tells the client only a request id; the
details go to the server log under the same id.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from engine.request import new_request_id

from deployments.contract.errors import ApiError, ErrorResponse, generic_500

log = logging.getLogger("ray.serve")


class JsonBodyRequest(Request):
    """A request whose JSON body decodes bytes that are not UTF-8 as lone surrogates (which
    validation then refuses by field, see protocol.Text) and refuses deep nesting with a 400."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            text = (await self.body()).decode("utf-8", "surrogateescape")
            try:
                self._json = json.loads(text)
            except RecursionError:
                raise HTTPException(400, "invalid request: the JSON body is nested too deeply") from None
        return self._json


class JsonBodyRoute(APIRoute):
    """Routes that read their body through JsonBodyRequest (FastAPI's custom-route pattern)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(JsonBodyRequest(request.scope, request.receive))

        return handle


def install_error_handling(app: FastAPI) -> None:
    """Make every error `app` answers OpenAI's error JSON. Call before adding routes."""
    app.router.route_class = JsonBodyRoute

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, err: RequestValidationError) -> Response:
        return error_response(ErrorResponse.of(describe(err), param=first_param(err)), 400)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> Response:
        return error_response(err.body, err.status, err.retry_after)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> Response:
        return error_response(ApiError(err.status_code, str(err.detail)).body, err.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> Response:
        request_id = new_request_id()
        log.exception("request %s failed", request_id, exc_info=err)
        return error_response(generic_500(request_id).body, 500)


def error_response(body: ErrorResponse, status: int, retry_after: float | None = None) -> Response:
    """OpenAI error JSON (the model's own serialisation); 503 and 429 tell the client when to
    retry, 401 how to authenticate."""
    headers = {}
    if status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after or 1)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return Response(body.model_dump_json(), status_code=status, headers=headers, media_type="application/json")


def describe(err: RequestValidationError) -> str:
    """The first validation errors as one line: `field.path: message; ...`."""
    if any(e.get("type") == "json_invalid" for e in err.errors()):
        return "invalid request: the body is not valid JSON"
    parts = []
    for e in err.errors()[:5]:
        where = _location(e)
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


def first_param(err: RequestValidationError) -> str | None:
    """The field at fault: the deepest one named (a union's branches fail at different depths)."""
    named = [where for e in err.errors() if (where := _location(e))]
    return max(named, key=lambda where: where.count("."), default=None)


def _location(error: dict) -> str:
    """The error's field path, without pydantic's union-branch tags (`str`, `list[TextPart]`,
    `function-after[...]`); a key that is not valid text is shown escaped."""
    parts = [str(p) for p in error.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    return ".".join(parts).encode("utf-8", "backslashreplace").decode("utf-8")


def _is_union_tag(part: int | str) -> bool:
    """A tag pydantic puts in a union's path, not a field name or a dict key (`-1` is a key)."""
    return isinstance(part, str) and (part in _SCALAR_TAGS or "[" in part or ("-" in part and not _is_number(part)))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_SCALAR_TAGS = {"str", "int", "float", "bool"}
