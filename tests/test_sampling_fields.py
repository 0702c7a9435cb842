"""The sampling fields are declared once (engine/config.py SamplingParams); these tests fail
when a form derived from it, or a list that remains beside it, drifts apart."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.http.protocol import (
    NOT_SAMPLING, OUTPUT_OPTIONS, AlpacaGenerationConfig, ChatCompletionRequest, CompletionRequest, SamplingFields,
)
from engine.config import (
    MAX_STOP_STRINGS, SERVER_DEFAULTS, GenerationDefaults, SamplingOverrides, SamplingParams, fields_model,
)

# A value other than the default for every HTTP sampling field (a new field must be added here).
SET_EVERY_FIELD = {
    "max_tokens": 7, "temperature": 0.5, "top_p": 0.5, "top_k": 3, "min_p": 0.1, "repetition_penalty": 1.2,
    "presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": 1, "stop": ["x"], "stop_token_ids": [5],
    "ignore_eos": True, "logit_bias": {5: -100.0}, "n": 2,
}
MESSAGES = [{"role": "user", "content": "hi"}]


def constraints(model, name: str) -> dict:
    """A field's JSON schema without its default, its title and the `null` branch of an optional field."""
    schema = dict(model.model_json_schema()["properties"][name])
    for key in ("default", "title"):
        schema.pop(key, None)
    branches = [b for b in schema.pop("anyOf", []) if b != {"type": "null"}]
    return {**schema, **branches[0]} if len(branches) == 1 else schema


def test_the_derived_forms_have_the_declared_fields_and_bounds():
    assert list(SamplingOverrides.model_fields) == list(SamplingParams.model_fields)
    assert set(GenerationDefaults.model_fields) == set(SERVER_DEFAULTS) <= set(SamplingParams.model_fields)
    assert GenerationDefaults().model_dump() == SERVER_DEFAULTS
    for name in SamplingParams.model_fields:
        assert constraints(SamplingOverrides, name) == constraints(SamplingParams, name), name
    for name in set(SamplingFields.model_fields) & set(SamplingParams.model_fields) - {"stop", "top_k"}:
        assert constraints(SamplingFields, name) == constraints(SamplingParams, name), name
    assert OUTPUT_OPTIONS <= NOT_SAMPLING <= set(SamplingParams.model_fields)


def test_every_sampling_field_reaches_the_overrides_from_http():
    assert set(SET_EVERY_FIELD) == set(SamplingFields.model_fields)
    chat = ChatCompletionRequest(model="m", messages=MESSAGES, logprobs=True, top_logprobs=2,
                                 response_format={"type": "json_object"}, **SET_EVERY_FIELD).to_overrides()
    completion = CompletionRequest(model="m", prompt="x", logprobs=2, echo=True, **SET_EVERY_FIELD).to_overrides()
    unset = SamplingOverrides()
    changed = {name for overrides in (chat, completion) for name in SamplingParams.model_fields
               if getattr(overrides, name) != getattr(unset, name)}
    assert changed == set(SamplingParams.model_fields)
    assert chat.resolve(GenerationDefaults()).model_dump(include=set(SET_EVERY_FIELD)) == SET_EVERY_FIELD


def test_the_wider_http_forms_accept_what_the_engine_does():
    assert SamplingFields(stop="x", top_k=-1).to_overrides().model_dump(include={"stop", "top_k"}) == {
        "stop": ["x"], "top_k": 0}
    assert SamplingFields(logit_bias={"5": 1}).to_overrides().logit_bias == {5: 1.0}  # JSON's string keys
    assert SamplingFields(logit_bias=None).to_overrides().logit_bias == {}
    most = ["s"] * MAX_STOP_STRINGS
    assert SamplingFields(stop=most).to_overrides().stop == SamplingParams(stop=most).stop
    for model in (SamplingFields, SamplingParams):
        with pytest.raises(ValidationError):
            model(stop=[*most, "one more"])


def test_the_seed_apis_own_names_keep_the_engines_bounds():
    for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
        assert constraints(AlpacaGenerationConfig, name) == constraints(SamplingParams, name), name
    assert constraints(AlpacaGenerationConfig, "max_new_tokens") == constraints(SamplingParams, "max_tokens")


def test_fields_model_refuses_names_it_does_not_have():
    with pytest.raises(ValueError, match="no fields"):
        fields_model("Typo", SamplingParams, {"temprature"})


PAGE_SLIDERS = {"Temperature": "temperature", "Top p": "top_p", "Top k (0: off)": "top_k",
                "Max new tokens": "max_tokens", "Repetition penalty": "repetition_penalty"}


def test_the_chat_pages_sliders_stay_within_the_declared_bounds():
    """Each settings slider's ends are values the field accepts; where the page has no narrower
    range of its own (temperature, top_p, top_k's minimum) a step beyond the end is refused."""
    import gradio as gr

    from deployments.frontend.service import RequestService
    from deployments.ui.page import ModelInfo, build_ui, slider_bounds
    from tests.fakes import ScriptedBackend

    page = build_ui(RequestService(ScriptedBackend([])), ModelInfo(("base",), "auto", GenerationDefaults()))
    sliders = {c.label: c for c in page.blocks.values() if isinstance(c, gr.Slider)}
    assert set(sliders) == set(PAGE_SLIDERS)
    for label, name in PAGE_SLIDERS.items():
        for end in (sliders[label].minimum, sliders[label].maximum):
            SamplingParams(**{name: end})  # raises if the page offers a value the engine refuses
    beyond = [("Temperature", -0.05, 0.05), ("Top p", -0.05, 0.05), ("Top k (0: off)", -1, None)]
    for label, below, above in beyond:
        name, slider = PAGE_SLIDERS[label], sliders[label]
        with pytest.raises(ValidationError):
            SamplingParams(**{name: slider.minimum + below})
        if above is not None:
            with pytest.raises(ValidationError):
                SamplingParams(**{name: slider.maximum + above})
    with pytest.raises(ValueError, match="no declared bound"):
        slider_bounds("top_k", 1)
