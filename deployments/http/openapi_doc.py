"""The OpenAPI document: FastAPI's, plus what a generation route's event stream carries.

FastAPI documents a route's JSON reply from its response_model; the `text/event-stream` the same
route answers with `stream: true` is declared here as the schema of one event, in the event
shape FastAPI uses for its own SSE routes: an object whose `data` is `[DONE]`, or JSON of the
route's chunk model or of ErrorResponse (a failure after the stream began). The document is
OpenAPI 3.1, which has no `itemSchema` (3.2 adds it, and there `schema` is the whole stream):
before 3.2 an event stream's `schema` describes each event, and schemathesis checks every
event against it. The chunk models enter the document's components through one hidden route
per stream whose JSON reply is `chunk | ErrorResponse`, so FastAPI names and builds their
schemas like every other model's; the hidden routes are taken out of `paths` again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel

from deployments.contract.errors import ErrorResponse
from deployments.http.openai_format import DONE

HIDDEN_PREFIX = "/_stream_events"


def document_streams(app: FastAPI, chunks: Mapping[str, type[BaseModel]]) -> None:
    """Make `app.openapi()` declare, for each POST path in `chunks`, the SSE events of its 200
    reply: the path's chunk model, an error, or [DONE]. The document is built once, on first use."""

    def openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            app.openapi_schema = _build(app, chunks)
        return app.openapi_schema

    app.openapi = openapi


def event_stream_content(payload: dict[str, Any]) -> dict[str, Any]:
    """The `text/event-stream` media type object (OpenAPI 3.1: its schema is one event's) whose
    events' data is `[DONE]` or JSON matching `payload` (a schema)."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    data = {"anyOf": [{"const": DONE}, json_data]}
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}


def _build(app: FastAPI, chunks: Mapping[str, type[BaseModel]]) -> dict[str, Any]:
    hidden = {path: _hidden_route(path, chunk) for path, chunk in chunks.items()}
    document = get_openapi(
        title=app.title, version=app.version, openapi_version=app.openapi_version, summary=app.summary,
        description=app.description, terms_of_service=app.terms_of_service, contact=app.contact,
        license_info=app.license_info, routes=[*app.routes, *hidden.values()], webhooks=app.webhooks.routes,
        tags=app.openapi_tags, servers=app.servers, separate_input_output_schemas=app.separate_input_output_schemas,
        external_docs=app.openapi_external_docs,
    )
    for path, route in hidden.items():
        payload = document["paths"].pop(route.path)["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        payload.pop("title", None)  # FastAPI's name for the hidden route's reply
        reply = document["paths"][path]["post"]["responses"]["200"]
        reply.setdefault("content", {})["text/event-stream"] = event_stream_content(payload)
    return document


def _hidden_route(path: str, chunk: type[BaseModel]) -> APIRoute:
    """A route never served, whose documented reply is one event's JSON payload."""

    async def events() -> None: ...

    return APIRoute(HIDDEN_PREFIX + path, events, methods=["POST"], response_model=chunk | ErrorResponse)
