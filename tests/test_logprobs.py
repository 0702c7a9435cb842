"""Logprobs and n choices in the engine, driven one `step()` at a time on a tiny fp32 Llama.

The ground truth for logprobs is `log_softmax` of HF's own forward over the same tokens.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import SamplingParams
from engine.engine import Engine
from engine.errors import InvalidRequestError
from engine.request import Delta, GenerationRequest
from tests.tiny_models import LONG_TEXT, ids

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_logprobs(tiny_model_dir):
    """log_softmax of HF's forward over `tokens`: [len(tokens), vocab]; row p scores token p + 1."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def logprobs(tokens: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)

    return logprobs


def run(engine: Engine, requests: list[GenerationRequest]) -> dict[tuple[str, int], list[Delta]]:
    """Drive the core until every choice of every request finished; deltas by (request id, choice)."""
    for request in requests:
        for row in engine.new_rows(request):
            engine.core.add(row)
    return finish(engine, {}, sum(r.params.n for r in requests))


def finish(engine: Engine, deltas: dict, choices: int, events=()) -> dict[tuple[str, int], list[Delta]]:
    """`deltas` with `events` and those of further steps added, until `choices` choices finished."""
    events = list(events)
    for _ in range(10_000):
        for request_id, delta in events:
            assert delta.finish_reason in (None, "length", "stop"), delta.error
            deltas.setdefault((request_id, delta.index), []).append(delta)
        if sum(1 for d in deltas.values() if d[-1].finish_reason) == choices:
            return deltas
        events = engine.core.step()
    raise AssertionError("requests did not finish")


def tokens_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def assert_matches(entries, tokens: list[int], expected: torch.Tensor, top: int) -> None:
    """Each entry scores its token as `expected` (rows aligned with `tokens`) does, with its top list."""
    assert [e.token_id for e in entries] == tokens
    for entry, token, row in zip(entries, tokens, expected):
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        values, top_ids = row.topk(top)
        assert [i for i, _, _ in entry.top] == top_ids.tolist()
        assert [v for _, _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("params", [
    GREEDY.model_copy(update={"logprobs": 5}),
    # sampled with penalties: the logprobs are still the model's own distribution (engine/logprobs.py)
    SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.5, seed=3, max_tokens=6, ignore_eos=True, logprobs=3),
])
def test_sampled_token_logprobs_are_the_models_log_softmax(make_engine, hf_logprobs, params):
    engine = make_engine()
    prompt = ids(engine, "What is the capital of France?")
    plain = GenerationRequest(prompt, GREEDY, request_id="plain")  # shares the steps, asks for nothing
    deltas = run(engine, [GenerationRequest(prompt, params, request_id="lp"), plain])
    tokens = tokens_of(deltas["lp", 0])
    entries = [e for d in deltas["lp", 0] for e in d.logprobs]
    expected = hf_logprobs(prompt + tokens)[len(prompt) - 1 : -1]
    assert_matches(entries, tokens, expected, params.logprobs)
    assert all(d.logprobs is None and d.prompt_logprobs is None for d in deltas["plain", 0])


def test_prompt_logprobs_with_chunked_prefill_equal_one_shot(make_engine, hf_logprobs):
    params = GREEDY.model_copy(update={"prompt_logprobs": 2, "echo": True, "max_tokens": 2})
    results = []
    for step_tokens in (512, 8):  # one shot, then chunks of at most 8 tokens
        engine = make_engine(max_step_tokens=step_tokens, max_batch_size=4)
        prompt = ids(engine, LONG_TEXT)
        first = run(engine, [GenerationRequest(prompt, params, request_id="p")])["p", 0][0]
        assert first.prompt_text == engine.loaded.tokenizer.decode(prompt)
        scored = first.prompt_logprobs
        assert scored[0].token_id == prompt[0] and scored[0].logprob is None  # nothing scores the first token
        assert_matches(scored[1:], prompt[1:], hf_logprobs(prompt)[:-1], 2)
        results.append(scored)
    one_shot, chunked = results
    assert [e.token_id for e in one_shot] == [e.token_id for e in chunked] == prompt
    assert [e.logprob for e in one_shot[1:]] == pytest.approx([e.logprob for e in chunked[1:]], abs=1e-5)


def test_a_prompt_logprobs_request_computes_a_cached_prompt_again(make_engine, hf_logprobs):
    engine = make_engine()
    prompt = ids(engine, LONG_TEXT)
    run(engine, [GenerationRequest(prompt, GREEDY, request_id="warm")])
    hits = engine.stats().prefix_cache_hits
    params = GREEDY.model_copy(update={"prompt_logprobs": 0})
    first = run(engine, [GenerationRequest(prompt, params, request_id="scored")])["scored", 0][0]
    assert engine.stats().prefix_cache_hits == hits  # the cached blocks were not used
    assert_matches(first.prompt_logprobs[1:], prompt[1:], hf_logprobs(prompt)[:-1], 0)
    run(engine, [GenerationRequest(prompt, GREEDY, request_id="again")])
    assert engine.stats().prefix_cache_hits > hits  # its blocks are cached for the next request


def test_n_choices_share_one_prefill_of_the_prompt(make_engine, reference):
    engine = make_engine(enable_prefix_caching=False)
    prompt = ids(engine, LONG_TEXT)  # not a whole number of blocks
    assert len(prompt) % 4
    params = GREEDY.model_copy(update={"n": 3})
    rows = engine.new_rows(GenerationRequest(prompt, params, request_id="n"))
    for row in rows:
        engine.core.add(row)
    events = engine.core.step()  # the prompt, once; choice 0 samples
    assert [d.index for _, d in events] == [0] and engine.stats().running == 1
    events += engine.core.step()  # the forks join on the prompt's blocks and compute their tail
    shared, own = (len(prompt) - 1) // 4, -(-len(prompt) // 4)
    assert all(fork.table.blocks[:shared] == rows[0].table.blocks[:shared] for fork in rows[1:])
    assert len({b for fork in rows[1:] for b in fork.table.blocks[shared:]} - set(rows[0].table.blocks)) == 2 * (own - shared)
    assert [engine.core.blocks._refcount[b] for b in rows[0].table.blocks[:shared]] == [3] * shared
    assert engine.stats().kv_blocks_used == len(rows[0].table.blocks) + 2 * (own - shared)
    assert engine.stats().step_tokens == len(prompt) + 1 + 2 * (len(prompt) - 4 * shared)  # one prefill
    deltas = finish(engine, {}, 3, events)
    assert [tokens_of(deltas["n", i]) for i in range(3)] == [reference(prompt, 6)] * 3
    assert engine.stats().kv_blocks_used == 0


def test_a_seed_gives_n_different_but_reproducible_choices(make_engine):
    engine = make_engine()
    prompt = ids(engine, "Hello there")
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=11, n=3)
    first = run(engine, [GenerationRequest(prompt, params, request_id="a")])
    again = run(engine, [GenerationRequest(prompt, params, request_id="b")])
    choices = [tokens_of(first["a", i]) for i in range(3)]
    assert choices == [tokens_of(again["b", i]) for i in range(3)]
    assert len({tuple(c) for c in choices}) == 3


async def test_closing_an_n_choice_stream_cancels_every_choice(make_engine):
    engine = make_engine()
    params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True, n=3)
    stream = engine.submit(GenerationRequest(ids(engine, LONG_TEXT), params, request_id="n"))
    seen = set()
    async for delta in stream:
        seen.add(delta.index)
        if len(seen) == 3:
            break
    await stream.aclose()
    while engine.core.has_work():
        await asyncio.sleep(0.01)
    stats = engine.stats()
    assert stats.running == 0 and stats.kv_blocks_used == 0 and stats.tracked_requests == 0
    await engine.close()


def test_n_limits_are_among_a_requests_limits(make_engine):
    engine = make_engine(max_batch_size=4, max_kv_tokens=256)
    prompt = ids(engine, "Hello there")
    with pytest.raises(InvalidRequestError, match="max_batch_size"):
        engine.check_limits(GenerationRequest(prompt, GREEDY.model_copy(update={"n": 5})))
    with pytest.raises(InvalidRequestError, match="n x max_tokens"):
        engine.check_limits(GenerationRequest(prompt, GREEDY.model_copy(update={"n": 4, "max_tokens": 100})))
    engine.check_limits(GenerationRequest(prompt, GREEDY.model_copy(update={"n": 4, "max_tokens": 50})))
