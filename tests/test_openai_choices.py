"""logprobs, echo and n > 1 over HTTP, read by the openai SDK (the served tiny test app)."""

from __future__ import annotations

import openai
import pytest

from tests.serve_fixtures import SERVED_MODEL as MODEL
from tests.tiny_models import build_tokenizer

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_logprobs_streamed_equal_whole(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=3, **GREEDY)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 8
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode())
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the chosen token is the most likely
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=3, stream=True, **GREEDY
    )
    streamed = [e for chunk in stream for choice in chunk.choices if choice.logprobs for e in choice.logprobs.content]
    assert [(e.token, [t.token for t in e.top_logprobs]) for e in streamed] == [
        (e.token, [t.token for t in e.top_logprobs]) for e in content
    ]  # the second request's prompt comes from the prefix cache: the same numbers up to rounding
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == whole.choices[0].message.content


def test_completion_echo_with_logprobs_scores_the_prompt(client):
    tokenizer = build_tokenizer()
    prompt = "The quick brown fox jumps over the lazy dog."
    prompt_ids = tokenizer(prompt)["input_ids"]
    reply = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=1, temperature=0)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith(prompt) and len(logprobs.tokens) == len(prompt_ids) + 1
    assert "".join(logprobs.tokens[: len(prompt_ids)]) == prompt
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(isinstance(v, float) and v <= 0 for v in logprobs.token_logprobs[1:])
    assert all(len(top) <= 2 for top in logprobs.top_logprobs[1:])
    assert logprobs.text_offset[:3] == [0, len(logprobs.tokens[0]), len(logprobs.tokens[0]) + len(logprobs.tokens[1])]
    by_ids = client.completions.create(model=MODEL, prompt=prompt_ids, echo=True, logprobs=2, max_tokens=1, temperature=0)
    assert by_ids.choices[0].logprobs.token_logprobs == logprobs.token_logprobs
    echoed = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=1, temperature=0)
    assert echoed.choices[0].text == choice.text and echoed.choices[0].logprobs is None


def test_n_choices_with_a_seed_are_different_and_reproducible(client):
    def sample():
        return client.chat.completions.create(
            model=MODEL, messages=MESSAGES, n=3, seed=5, temperature=1.0, max_tokens=8, extra_body={"ignore_eos": True}
        )

    first, again = sample(), sample()
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices] and len(set(texts)) == 3
    assert first.usage.completion_tokens == 3 * 8 and first.usage.prompt_tokens == again.usage.prompt_tokens


def test_n_choices_stream_with_their_index_and_usage(client):
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", n=2, max_tokens=5, temperature=0, echo=True, logprobs=1,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    texts, finishes, tokens, usage = {0: "", 1: ""}, {}, {0: [], 1: []}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            tokens[choice.index] += choice.logprobs.tokens if choice.logprobs else []
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "length", 1: "length"}
    assert texts[0] == texts[1] and texts[0].startswith("Once upon a time")  # greedy: the same twice
    assert len(tokens[0]) == len(tokens[1]) == usage.prompt_tokens + 5
    assert usage.completion_tokens == 2 * 5


def test_bad_logprobs_and_n_get_400s(client):
    for kwargs in ({"top_logprobs": 21, "logprobs": True}, {"top_logprobs": 2}, {"n": 500}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **kwargs)
    with pytest.raises(openai.BadRequestError, match="max_batch_size"):
        client.completions.create(model=MODEL, prompt="hi", n=40, max_tokens=2)
