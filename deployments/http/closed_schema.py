"""Closing a function's parameters schema for the forced tool-call grammar.

Why: JSON Schema lets an object hold any property it does not declare unless it says
`additionalProperties: false`, and most clients do not say it (LangChain's `bind_tools`, pydantic's
`model_json_schema`, many hand-written tools). Under a grammar that follows the schema to the letter,
a small model then invents property after property (`{"city": "Tokyo", "type": "string", ...}`)
until `max_tokens` cuts the call. OpenAI's strict mode reads such schemas as closed: every object
holds its declared properties and no others. `closed_schema` does the same for the grammar, on a
copy (the client's tool definition, which also goes into the prompt, is left as sent); an object
that says `additionalProperties` (true, or a schema for the extra values) keeps its word.
"""

from __future__ import annotations

from typing import Any

_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
"""Keywords whose value maps names to subschemas."""
_LISTS = ("anyOf", "oneOf", "prefixItems")
"""Keywords whose value is a list of subschemas (allOf is apart: see `closed_schema`)."""
_SINGLE = ("items", "additionalItems", "additionalProperties", "contains", "not", "if", "then", "else")
"""Keywords whose value is one subschema (`items` may also be a list, as in draft 4)."""


def closed_schema(schema: Any) -> Any:
    """A copy of `schema` in which every object schema without `additionalProperties` (or
    `unevaluatedProperties`) has `additionalProperties: false`, at any depth. The branches of an
    `allOf` and the object holding it are not closed, since each would forbid the properties the
    others declare; the objects nested inside them are. Non-dict schemas (`true`) are returned as they are."""
    return _closed(schema, close=True)


def _closed(schema: Any, close: bool) -> Any:
    if isinstance(schema, list):
        return [_closed(sub, close) for sub in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(sub, True) for name, sub in out[key].items()}
    for key in (*_LISTS, *_SINGLE):
        if key in out:
            out[key] = _closed(out[key], True)
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [_closed(sub, False) for sub in out["allOf"]]
        close = False
    if close and _is_object(out) and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


def _is_object(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in schema
