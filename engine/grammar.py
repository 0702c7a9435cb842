"""What a structured reply must match: the `Grammar` a request carries, and whether llguidance
accepts it.

Pure data and validation (llguidance's parser, no tokenizer, no torch): the HTTP front end
imports it to refuse a bad schema with a 400 before a request reaches a replica, and
`SamplingParams` carries it. engine/constraints.py compiles it against the tokenizer and masks
the logits.
"""

from __future__ import annotations

import json
from typing import Literal

import llguidance
from pydantic import BaseModel, ConfigDict, Field

GrammarKind = Literal["json_schema", "lark"]
COMPACT_JSON = {"whitespace_flexible": False}
"""JSON without free whitespace (`{"a":1}`): a weak model cannot pad a reply with blank lines
until it hits max_tokens or the newline guard, cutting the JSON short."""


class Grammar(BaseModel):
    """What a reply must match: a JSON schema (as JSON text) or a Lark grammar (llguidance's
    dialect, `%json {...}` embeds a schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: GrammarKind
    source: str = Field(max_length=1 << 20)

    @classmethod
    def json_schema(cls, schema: dict) -> Grammar:
        return cls(kind="json_schema", source=json.dumps(schema, sort_keys=True))


def grammar_error(grammar: Grammar) -> str | None:
    """Why llguidance refuses the grammar (an unsupported or invalid schema), or None."""
    try:
        return llguidance.LLMatcher.validate_grammar(llguidance_grammar(grammar)) or None
    except (ValueError, RuntimeError, TypeError) as err:
        return str(err)


def llguidance_grammar(grammar: Grammar) -> str:
    """The grammar in the form llguidance compiles (a JSON schema without free whitespace)."""
    if grammar.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(grammar.source, defaults=COMPACT_JSON)
    return llguidance.LLMatcher.grammar_from_lark(grammar.source)
