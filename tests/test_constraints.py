"""Structured output on the tiny random model: whatever it says, the reply matches its grammar."""

from __future__ import annotations

import json

import jsonschema
import pytest

from engine.config import SamplingParams
from engine.grammar import Grammar
from engine.errors import InvalidRequestError
from engine.prompt import ChatMessage
from engine.request import Delta

PERSON = {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "ok", "tags"],
    "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
}


async def reply(engine, params: SamplingParams, text: str = "Hi") -> tuple[str, str]:
    request = engine.chat_request([ChatMessage("user", text)], params)
    out, finish = "", None
    async for delta in engine.submit(request):
        if isinstance(delta, Delta):  # not the RequestEnd after the deltas
            out, finish = out + delta.text, delta.finish_reason
    return out, finish


async def test_constrained_rows_match_the_schema_beside_free_rows(engine):
    """Greedy and sampled rows with the schema, and a free row, share steps; every
    constrained reply is valid JSON that validates, and the free row is untouched."""
    import asyncio

    grammar = Grammar.json_schema(PERSON)
    free = SamplingParams(max_tokens=30, temperature=0.0)
    runs = [reply(engine, SamplingParams(max_tokens=120, temperature=t, seed=s, grammar=grammar), f"Hi {s}")
            for t, s in ((0.0, 0), (1.0, 1), (1.0, 2), (0.7, 3))]
    *constrained, (alone, _) = await asyncio.gather(*runs, reply(engine, free))
    for text, finish in constrained:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    assert alone == (await reply(engine, free))[0]


async def test_json_object_replies_that_end_parse_as_objects(engine):
    """Any object is allowed, so a random model may write one string until max_tokens; every
    reply that ended by itself is an object, and with these seeds some do."""
    grammar = Grammar.json_schema({"type": "object"})
    ended = 0
    for seed in range(6):
        text, finish = await reply(engine, SamplingParams(max_tokens=60, temperature=1.0, seed=seed, grammar=grammar))
        assert text.startswith("{")
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
            ended += 1
    assert ended > 0


async def test_compiled_grammars_are_cached_and_bounded(engine):
    cache = engine.grammars
    grammar = Grammar.json_schema(PERSON)
    cache.constraint(grammar)
    compiled = cache._compiled[grammar]
    cache.constraint(grammar)
    assert cache._compiled[grammar] is compiled
    for i in range(cache.size + 1):
        cache.constraint(Grammar.json_schema({"type": "object", "properties": {f"k{i}": {"type": "integer"}}}))
    assert len(cache._compiled) == cache.size and grammar not in cache._compiled


@pytest.mark.parametrize("schema", [{"type": "objectx"}, {"type": "string", "pattern": "(unclosed"}])
async def test_a_schema_that_does_not_compile_is_refused(engine, schema):
    with pytest.raises(InvalidRequestError, match="cannot be used"):
        await reply(engine, SamplingParams(grammar=Grammar.json_schema(schema)))


async def test_a_complete_grammar_ends_the_reply_even_with_ignore_eos(engine):
    grammar = Grammar.json_schema({"enum": ["yes", "no"]})
    text, finish = await reply(engine, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True, grammar=grammar))
    assert json.loads(text) in ("yes", "no") and finish == "stop"


async def test_a_logit_bias_works_inside_the_grammar_never_against_it(engine):
    """The bias comes before the grammar's mask: +100 on a token the grammar forbids does not
    let it through, +100 on an allowed one is taken every step the grammar allows it."""
    digits = Grammar(kind="lark", source="start: /[0-9]{1,4}/")
    seven, letter = engine.loaded.tokenizer.convert_tokens_to_ids(["7", "a"])
    text, finish = await reply(engine, SamplingParams(max_tokens=10, temperature=0, grammar=digits,
                                                      logit_bias={letter: 100}))
    assert text.isdigit() and finish == "stop"
    text, finish = await reply(engine, SamplingParams(max_tokens=10, temperature=0, grammar=digits,
                                                      logit_bias={seven: 100}))
    assert (text, finish) == ("7777", "stop")
