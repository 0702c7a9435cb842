"""The engine on a tiny random Llama: exactness against HF generate, adapters, control, errors."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from engine.config import SamplingParams
from engine.errors import InvalidRequestError, PromptTooLongError, UnknownAdapterError
from engine.prompt import ChatMessage
from engine.request import Delta, GenerationRequest, RequestEnd

PROMPTS = [
    "Hello there",
    "What is the capital of France? The capital",
    "Once upon a time there was a small model that answered questions about the quick brown fox.",
    "Привет",
    "Continuous batching keeps every stream flowing",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


async def deltas_of(stream) -> list[Delta]:
    """A stream's deltas, read to its end: the one RequestEnd, its last item, checked and left out."""
    items = [item async for item in stream]
    assert isinstance(items[-1], RequestEnd) and all(isinstance(item, Delta) for item in items[:-1])
    return items[:-1]


async def collect(stream) -> tuple[list[int], str, Delta]:
    """All token ids and text of a stream, and its final delta."""
    deltas = await deltas_of(stream)
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), deltas[-1]


def encode(engine, text: str) -> list[int]:
    return engine.loaded.tokenizer(text)["input_ids"]


async def test_batched_greedy_equals_solo_generate(engine, reference):
    requests = [GenerationRequest(encode(engine, p), GREEDY) for p in PROMPTS]
    results = await asyncio.gather(*(collect(engine.submit(r)) for r in requests))
    for request, (tokens, text, final) in zip(requests, results):
        expected = reference(request.prompt_ids, GREEDY.max_tokens)
        assert tokens == expected
        assert text == engine.loaded.tokenizer.decode(expected, skip_special_tokens=True)
        assert final.finish_reason == ("length" if len(expected) == GREEDY.max_tokens else "stop")


async def test_requests_joining_mid_flight_match_solo_generate(engine, reference):
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    first = [GenerationRequest(encode(engine, p), long) for p in PROMPTS[:2]]
    streams = [engine.submit(r) for r in first]
    early = [await anext(s) for s in streams]  # the first rows are running now
    late = [GenerationRequest(encode(engine, p), GREEDY) for p in PROMPTS[2:]]
    late_results = await asyncio.gather(*(collect(engine.submit(r)) for r in late))
    first_results = await asyncio.gather(*(collect(s) for s in streams))
    for request, head, (tokens, _, _) in zip(first, early, first_results):
        all_tokens = head.token_ids + tokens
        expected = reference(request.prompt_ids, long.max_tokens)
        assert all_tokens[: len(expected)] == expected
    for request, (tokens, _, _) in zip(late, late_results):
        assert tokens == reference(request.prompt_ids, GREEDY.max_tokens)


async def test_mixed_adapter_batch_gives_each_row_its_adapter_output(engine, adapter_dirs, reference):
    for name in ("alpha", "beta"):
        await engine.load_adapter(name, str(adapter_dirs[name]))
    prompt = encode(engine, PROMPTS[1])
    plan = [None, "alpha", "beta", "alpha", None, "beta"]
    requests = [GenerationRequest(prompt, GREEDY, adapter) for adapter in plan]
    results = await asyncio.gather(*(collect(engine.submit(r)) for r in requests))
    outputs = {}
    for adapter, (tokens, _, _) in zip(plan, results):
        expected = reference(prompt, GREEDY.max_tokens, adapter_dirs[adapter] if adapter else None)
        assert tokens == expected, adapter
        outputs[adapter] = tuple(tokens)
    assert len(set(outputs.values())) == 3, "the adapters should change the output"


async def test_seed_reproduces_alone_and_inside_a_batch(engine):
    prompt = encode(engine, PROMPTS[0])
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    alone, _, _ = await collect(engine.submit(GenerationRequest(prompt, seeded)))
    noise = [GenerationRequest(encode(engine, p), SamplingParams(max_tokens=20)) for p in PROMPTS]
    batch = await asyncio.gather(
        *(collect(engine.submit(r)) for r in noise[:3] + [GenerationRequest(prompt, seeded)] + noise[3:])
    )
    assert batch[3][0] == alone
    other_seed = seeded.model_copy(update={"seed": 99})
    different, _, _ = await collect(engine.submit(GenerationRequest(prompt, other_seed)))
    assert different != alone


async def test_stop_string_cuts_text_before_it(engine, reference):
    prompt = encode(engine, PROMPTS[2])
    full = engine.loaded.tokenizer.decode(reference(prompt, 24), skip_special_tokens=True)
    stop = full[8:11]
    assert stop.strip() and full.index(stop) > 0
    params = GREEDY.model_copy(update={"stop": [stop]})
    deltas = await deltas_of(engine.submit(GenerationRequest(prompt, params)))
    text = "".join(d.text for d in deltas)
    assert text == full[: full.index(stop)]
    assert deltas[-1].finish_reason == "stop"


async def test_max_tokens_and_stop_token_ids(engine, reference):
    prompt = encode(engine, PROMPTS[0])
    expected = reference(prompt, 24)
    tokens, _, final = await collect(engine.submit(GenerationRequest(prompt, GREEDY.model_copy(update={"max_tokens": 5}))))
    assert tokens == expected[:5] and final.finish_reason == "length"
    assert final.stats.completion_tokens == 5 and final.stats.prompt_tokens == len(prompt)
    stop_id = expected[3]
    params = GREEDY.model_copy(update={"stop_token_ids": [stop_id]})
    tokens, _, final = await collect(engine.submit(GenerationRequest(prompt, params)))
    assert tokens == expected[: expected.index(stop_id)] and final.finish_reason == "stop"


def biased(bias: dict[int, float], **settings) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 12, "ignore_eos": True, "logit_bias": bias, **settings})


async def test_each_choices_first_delta_carries_the_prompts_length(engine):
    """Usage in every chunk needs the prompt's length from the first delta on: the engine puts it
    on each choice's first delta (later ones need not repeat it)."""
    prompt = encode(engine, PROMPTS[1])
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, n=2)
    by_choice: dict[int, list[Delta]] = {}
    for delta in await deltas_of(engine.submit(GenerationRequest(prompt, params))):
        by_choice.setdefault(delta.index, []).append(delta)
    assert sorted(by_choice) == [0, 1]
    for deltas in by_choice.values():
        assert [d.prompt_tokens for d in deltas] == [len(prompt)] + [None] * (len(deltas) - 1)


async def test_logit_bias_forces_and_bans_tokens_per_row(engine, reference):
    """+100 makes greedy take a token every step, -100 keeps the greedy token out; rows biased
    differently in one batch keep their own biases, and an unbiased row beside them is untouched."""
    prompts = [encode(engine, p) for p in PROMPTS[:3]]
    expected = reference(prompts[2], 12)
    first, second = engine.loaded.tokenizer.convert_tokens_to_ids(["7", "a"])
    banned = expected[0]
    forced_a, forced_b, untouched, without = await asyncio.gather(  # submitted together: one batch
        collect(engine.submit(GenerationRequest(prompts[0], biased({first: 100})))),
        collect(engine.submit(GenerationRequest(prompts[1], biased({second: 100, first: -5})))),
        collect(engine.submit(GenerationRequest(prompts[2], GREEDY.model_copy(update={"max_tokens": 12})))),
        collect(engine.submit(GenerationRequest(prompts[2], biased({banned: -100})))),
    )
    assert forced_a[0] == [first] * 12 and forced_b[0] == [second] * 12
    assert untouched[0] == expected
    assert len(without[0]) == 12 and banned not in without[0]


async def first_logprob(engine, prompt: list[int], params: SamplingParams):
    async for delta in engine.submit(GenerationRequest(prompt, params)):
        if isinstance(delta, Delta) and delta.logprobs:
            return delta.logprobs[0]


async def test_logprobs_are_the_models_own_under_a_logit_bias(engine):
    """Logprobs come from the logits before the bias (vLLM's raw_logprobs): forcing the fifth
    most likely token makes it the token, with the logprob and neighbours it had unbiased."""
    prompt = encode(engine, PROMPTS[1])
    plain = await first_logprob(engine, prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=5))
    fifth, _, logprob = plain.top[4]
    forced = await first_logprob(engine, prompt, biased({fifth: 100}, max_tokens=1, logprobs=5))
    assert forced.token_id == fifth and forced.logprob == pytest.approx(logprob, abs=1e-5) and logprob < -1e-3
    assert [t[0] for t in forced.top] == [t[0] for t in plain.top]
    assert [t[2] for t in forced.top] == pytest.approx([t[2] for t in plain.top], abs=1e-5)


async def test_logit_bias_ids_must_be_in_the_vocabulary(engine):
    vocab = engine.loaded.model.config.vocab_size
    prompt = encode(engine, PROMPTS[0])
    with pytest.raises(InvalidRequestError, match=f"logit_bias: token id {vocab}, {vocab + 7} is not in"):
        engine.completion_request(prompt, biased({3: 1, vocab + 7: 1, vocab: -1}))
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        engine.submit(GenerationRequest(prompt, biased({vocab: 1})))
    tokens, _, _ = await collect(engine.submit(engine.completion_request(prompt, biased({vocab - 1: 100}))))
    assert tokens == [vocab - 1] * 12


async def test_cancel_frees_the_row_and_others_continue(engine, reference):
    endless = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    victim = GenerationRequest(encode(engine, PROMPTS[0]), endless)
    other = GenerationRequest(encode(engine, PROMPTS[1]), GREEDY)
    victim_stream = engine.submit(victim)
    first = await anext(victim_stream)
    other_task = asyncio.create_task(collect(engine.submit(other)))
    engine.cancel(victim.request_id)
    tokens, _, final = await collect(victim_stream)
    assert final.finish_reason == "cancelled"
    assert final.stats.completion_tokens == len(first.token_ids) + len(tokens)  # all it made was delivered
    assert len(tokens) <= 1  # at most the step running when cancel was called
    other_tokens, _, _ = await other_task
    assert other_tokens == reference(other.prompt_ids, GREEDY.max_tokens)
    assert engine.stats().running == 0 and engine.stats().kv_blocks_used == 0


async def test_closing_the_stream_cancels_the_request(engine):
    endless = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    stream = engine.submit(GenerationRequest(encode(engine, PROMPTS[0]), endless))
    first = await anext(stream)
    await stream.aclose()
    for _ in range(100):
        if engine.stats().tracked_requests == 0:
            break
        await asyncio.sleep(0.01)
    stats = engine.stats()
    assert stats.running == stats.tracked_requests == stats.kv_blocks_used == 0 and stats.finished_requests == 1
    # what was read, plus at most the step running when the stream was closed
    assert stats.generated_tokens - len(first.token_ids) in (0, 1)


async def test_batch_and_kv_budgets_hold_rows_back(engine_config, reference):
    from engine.engine import Engine

    budget = {"max_batch_size": 2, "max_kv_tokens": 100, "kv_block_size": 4, "max_step_tokens": 16}
    engine = Engine.from_config(engine_config.model_copy(update=budget))
    try:
        requests = [GenerationRequest(encode(engine, p), GREEDY) for p in PROMPTS]
        tasks = [asyncio.create_task(collect(engine.submit(r))) for r in requests]
        peak = 0
        while not all(t.done() for t in tasks):
            stats = engine.stats()
            peak = max(peak, stats.running)
            assert stats.kv_blocks_total == 25 and stats.kv_tokens <= 100
            await asyncio.sleep(0.001)
        assert peak == 2
        for request, task in zip(requests, tasks):
            assert task.result()[0] == reference(request.prompt_ids, GREEDY.max_tokens)
    finally:
        await engine.close()


async def test_chat_history_is_trimmed_to_the_context_budget(tiny_model_dir):
    from engine.config import EngineConfig
    from engine.engine import Engine

    engine = Engine.from_config(EngineConfig(model=str(tiny_model_dir), dtype="float32", max_input_tokens=60))
    try:
        history = [ChatMessage("system", "Be brief.")]
        for i in range(6):
            history += [ChatMessage("user", f"Question number {i}?"), ChatMessage("assistant", f"Answer {i}.")]
        history.append(ChatMessage("user", "Last question?"))
        request = engine.chat_request(history, GREEDY)
        assert request.dropped_messages > 0 and len(request.prompt_ids) <= 60
        text = engine.loaded.tokenizer.decode(request.prompt_ids)
        assert "Be brief." in text and "Last question?" in text and "Question number 0" not in text
        _, _, final = await collect(engine.submit(request))
        assert final.stats.dropped_messages == request.dropped_messages
        with pytest.raises(PromptTooLongError):
            engine.chat_request([ChatMessage("user", "word " * 100)], GREEDY)
    finally:
        await engine.close()


async def test_adapter_load_unload_and_unknown_adapter(engine, adapter_dirs):
    prompt = encode(engine, PROMPTS[0])
    with pytest.raises(UnknownAdapterError):
        engine.submit(GenerationRequest(prompt, GREEDY, "alpha"))
    await engine.load_adapter("alpha", str(adapter_dirs["alpha"]))
    endless = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    stream = engine.submit(GenerationRequest(prompt, endless, "alpha"))
    unloading = asyncio.create_task(engine.unload_adapter("alpha"))
    await asyncio.sleep(0)
    with pytest.raises(InvalidRequestError, match="being unloaded"):
        engine.submit(GenerationRequest(prompt, GREEDY, "alpha"))
    tokens, _, final = await collect(stream)
    assert final.finish_reason == "length" and len(tokens) == 60  # the running row finished first
    await unloading
    assert engine.adapters.names == []
    with pytest.raises(UnknownAdapterError):
        engine.submit(GenerationRequest(prompt, GREEDY, "alpha"))
    with pytest.raises(InvalidRequestError, match="cannot load"):
        await engine.load_adapter("ghost", "/no/such/adapter")


async def test_adapters_swap_after_the_last_one_is_unloaded(engine, adapter_dirs, reference):
    prompt = encode(engine, PROMPTS[0])
    await engine.load_adapter("alpha", str(adapter_dirs["alpha"]))
    await engine.unload_adapter("alpha")
    await engine.load_adapter("beta", str(adapter_dirs["beta"]))
    for adapter, directory in ((None, None), ("beta", adapter_dirs["beta"])):
        tokens, _, _ = await collect(engine.submit(GenerationRequest(prompt, GREEDY, adapter)))
        assert tokens == reference(prompt, GREEDY.max_tokens, directory)


@pytest.mark.parametrize(
    "bad",
    [{"temperature": -0.5}, {"top_p": 1.5}, {"top_p": 0}, {"top_k": -1}, {"max_tokens": 0},
     {"min_p": 2}, {"presence_penalty": 3}, {"repetition_penalty": 0}, {"stop": [""]}, {"bogus": 1},
     {"logit_bias": {"x": 1}}, {"logit_bias": {"-1": 1}}, {"logit_bias": {-1: 1}}, {"logit_bias": {1: 100.5}},
     {"logit_bias": {i: 1 for i in range(301)}}],
)
def test_invalid_sampling_params_are_rejected(bad):
    with pytest.raises(ValidationError):
        SamplingParams(**bad)


async def test_request_level_limits(engine):
    prompt = encode(engine, PROMPTS[0])
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=401)))
    with pytest.raises(PromptTooLongError):
        engine.submit(GenerationRequest(prompt * 1000, SamplingParams(max_tokens=10)))
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.completion_request([1, 2, 10**6], GREEDY)


async def test_each_limit_is_checked_once_per_request(engine, monkeypatch):
    """The builders check a request's limits and submit trusts them; a request built by hand is
    checked at submit. max_tokens over the cap is a 400 before any trimming could make it a 413."""
    checks = []
    check_fit = engine._check_fit
    monkeypatch.setattr(engine, "_check_fit", lambda request: (checks.append(request), check_fit(request)))
    built = engine.completion_request(encode(engine, PROMPTS[0]), GREEDY)
    await collect(engine.submit(built))
    by_hand = GenerationRequest(encode(engine, PROMPTS[0]), GREEDY)
    await collect(engine.submit(by_hand))
    assert checks == [built, by_hand]
    with pytest.raises(InvalidRequestError, match="max_tokens is 5000") as refused:
        engine.chat_request([ChatMessage("user", "hi")], SamplingParams(max_tokens=5000))
    assert not isinstance(refused.value, PromptTooLongError)


async def test_a_broken_request_fails_alone(engine, adapter_dirs, reference):
    await engine.load_adapter("broken", str(adapter_dirs["broken"]))
    good = [GenerationRequest(encode(engine, p), GREEDY) for p in PROMPTS[:3]]
    bad = GenerationRequest(encode(engine, PROMPTS[3]), GREEDY, "broken")
    results = await asyncio.gather(*(collect(engine.submit(r)) for r in [good[0], bad, *good[1:]]))
    assert results[1][2].finish_reason == "error" and "non-finite" in results[1][2].error
    for request, (tokens, _, final) in zip(good, [results[0], *results[2:]]):
        assert final.finish_reason != "error"
        assert tokens == reference(request.prompt_ids, GREEDY.max_tokens)
    tokens, _, _ = await collect(engine.submit(good[0]))  # still serving
    assert tokens == reference(good[0].prompt_ids, GREEDY.max_tokens)


async def test_a_request_ends_with_one_request_end_after_every_choices_last_delta(engine):
    """The end says how each choice finished and counts usage as OpenAI does: the prompt once,
    the completion tokens summed over the choices."""
    prompt = encode(engine, PROMPTS[0])
    params = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True, n=3)
    items = [item async for item in engine.submit(GenerationRequest(prompt, params))]
    end, deltas = items[-1], items[:-1]
    assert isinstance(end, RequestEnd) and not end.failed and end.error is None
    lasts = [d for d in deltas if d.finish_reason]
    assert sorted(d.index for d in lasts) == [0, 1, 2]
    assert [(c.index, c.finish_reason) for c in end.choices] == [(0, "length"), (1, "length"), (2, "length")]
    assert end.stats.prompt_tokens == len(prompt) and end.stats.completion_tokens == 3 * 5
    assert end.stats.latency == max(d.stats.latency for d in lasts)


async def test_a_failed_choice_fails_its_request_and_cancels_the_others(engine, monkeypatch):
    """Choice 1's logits turn non-finite at its third token: nothing of the other choices follows
    its last delta but the request's end, which has failed; the other rows are cancelled."""
    import engine.postprocess as postprocess

    sample = postprocess.sample_next_tokens

    def choice_1_fails(logits, samplers):
        tokens = sample(logits, samplers)
        return [None if s.params.seed == 101 and len(s.output_ids) == 2 else t for s, t in zip(samplers, tokens)]

    monkeypatch.setattr(postprocess, "sample_next_tokens", choice_1_fails)
    params = SamplingParams(temperature=1.0, max_tokens=100, ignore_eos=True, n=3, seed=100)
    items = [item async for item in engine.submit(GenerationRequest(encode(engine, PROMPTS[1]), params))]
    *deltas, failed, end = items
    assert failed.index == 1 and failed.failed and not any(d.finish_reason for d in deltas)
    assert isinstance(end, RequestEnd) and end.failed and "non-finite" in end.error
    assert [c.finish_reason for c in end.choices] == ["cancelled", "error", "cancelled"]
    stats = engine.stats()
    assert stats.running == stats.tracked_requests == stats.kv_blocks_used == 0


def test_failed_means_an_error_or_a_cancel_for_a_choice_and_its_request():
    """The one definition of a failed finish, as a choice's last delta and its request's end read it."""
    for reason, failed in [("stop", False), ("length", False), ("error", True), ("cancelled", True)]:
        last = Delta(finish_reason=reason, index=1)
        assert last.failed is failed
        assert RequestEnd.of([Delta(finish_reason="stop"), last]).failed is failed
    assert not Delta("text").failed


async def test_stats_report_timing(engine):
    _, _, final = await collect(engine.submit(GenerationRequest(encode(engine, PROMPTS[0]), GREEDY)))
    stats = final.stats
    assert 0 < stats.time_to_first_token <= stats.latency
    assert stats.completion_tokens > 0
    assert engine.stats().finished_requests == 1


async def test_model_work_runs_off_the_event_loop(engine):
    import threading

    threads = set()
    hook = engine.loaded.model.register_forward_hook(lambda *_: threads.add(threading.current_thread()))
    try:
        await collect(engine.submit(GenerationRequest(encode(engine, PROMPTS[0]), GREEDY)))
    finally:
        hook.remove()
    assert threads and threading.current_thread() not in threads


async def test_request_time_limit_stops_a_row_as_length(engine_config):
    from engine.engine import Engine

    engine = Engine.from_config(engine_config.model_copy(update={"request_timeout_s": 0.02}))
    try:
        endless = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        tokens, _, final = await collect(engine.submit(GenerationRequest(encode(engine, PROMPTS[0]), endless)))
        assert final.finish_reason == "length" and 0 < len(tokens) < 400
    finally:
        await engine.close()


async def test_a_dead_loop_fails_its_requests_and_reports_not_alive(engine, monkeypatch):
    from engine.errors import EngineDeadError

    def broken_schedule():
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(engine.core.scheduler, "schedule", broken_schedule)  # a bug in the loop, not a request
    _, _, final = await collect(engine.submit(GenerationRequest(encode(engine, PROMPTS[0]), GREEDY)))
    assert final.finish_reason == "error" and "scheduler bug" in final.error
    assert not engine.alive  # what LLMServer.check_health reports, so Serve replaces the replica
    with pytest.raises(EngineDeadError):
        engine.submit(GenerationRequest(encode(engine, PROMPTS[0]), GREEDY))


async def test_pace_merges_deltas_but_never_holds_the_first_or_last(engine, reference):
    """With a pause far longer than the whole request: the first token at once, the rest
    merged into one delta that leaves as soon as the request finishes."""
    prompt = encode(engine, PROMPTS[0])  # its first greedy token has text ("O")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    start = asyncio.get_running_loop().time()
    deltas = await deltas_of(engine.submit(GenerationRequest(prompt, params), pace=lambda: 3600.0))
    assert asyncio.get_running_loop().time() - start < 60
    assert [len(d.token_ids) for d in deltas] == [1, 7]
    assert deltas[-1].finish_reason == "length"
    assert [t for d in deltas for t in d.token_ids] == reference(prompt, 8)


@pytest.mark.parametrize("prompt_index, stop", [(1, None), (0, "O\x00never")], ids=["partial-utf8", "stop-prefix"])
async def test_pace_starts_at_the_first_text_and_stats_say_how_long_it_was_held(engine, prompt_index, stop):
    """The first token's text held back (PROMPTS[1]'s greedy first token is part of a UTF-8
    character; PROMPTS[0]'s, "O", may begin the stop string): the deltas up to the first text go
    out unpaced, so pacing never delays what the user first sees, and the stats say how long
    the text was held after the first token."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=[stop] if stop else [])
    stream = engine.submit(GenerationRequest(encode(engine, PROMPTS[prompt_index]), params), pace=lambda: 3600.0)
    deltas = await deltas_of(stream)
    assert [d.text != "" for d in deltas] == [False, True, True]
    assert [len(d.token_ids) for d in deltas] == [1, 1, 6]
    assert deltas[-1].stats.first_text_held_s > 0


async def test_stats_report_no_hold_when_the_first_token_has_text(engine):
    prompt = encode(engine, PROMPTS[0])
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    *_, final = await collect(engine.submit(GenerationRequest(prompt, params)))
    assert final.stats.first_text_held_s == 0.0


async def test_pace_spaces_the_deltas_of_a_stream(engine):
    prompt = encode(engine, PROMPTS[0])
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    loop = asyncio.get_running_loop()
    arrivals, sizes = [], []
    async for delta in engine.submit(GenerationRequest(prompt, params), pace=lambda: 0.05):
        if isinstance(delta, RequestEnd):
            continue
        arrivals.append(loop.time())
        sizes.append(len(delta.token_ids))
    periods = [int(t // 0.05) for t in arrivals[:-1]]  # the last one may come early
    assert sum(sizes) == 40 and max(sizes) > 1
    assert len(set(periods)) == len(periods)  # at most one delta per period of the shared clock
