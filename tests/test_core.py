"""The engine core driven one `step()` at a time on a tiny random Llama (fp32, exact greedy)."""

from __future__ import annotations

import torch

from engine.config import SamplingParams
from engine.engine import Engine
from engine.attention import attend, attend_runs, paged_attention, should_gather
from engine.kv_cache import KernelDecodes, PagedKVCache, SequenceLayout, StepLayout
from engine.request import GenerationRequest
from tests.tiny_models import LONG_TEXT, ids

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def run(engine: Engine, requests: list[GenerationRequest], on_step=None) -> dict[str, list[int]]:
    """Drive the core until every request finished; token ids by request id."""
    rows = [engine.new_row(r) for r in requests]
    for row in rows:
        engine.core.add(row)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished = set()
    for _ in range(10_000):
        if finished >= set(tokens):
            return tokens
        for request_id, delta in engine.core.step():
            tokens.setdefault(request_id, []).extend(delta.token_ids)
            if delta.finish_reason:
                assert delta.finish_reason in ("length", "stop"), delta.error
                finished.add(request_id)
        if on_step:
            on_step(engine)
    raise AssertionError("requests did not finish")


def test_prefix_cache_hit_gives_the_cold_prefill_tokens(make_engine, reference):
    engine = make_engine()
    prompt = ids(engine, LONG_TEXT)
    cold = run(engine, [GenerationRequest(prompt, GREEDY, request_id="cold")])["cold"]
    assert cold == reference(prompt, GREEDY.max_tokens)
    assert engine.stats().prefix_cache_hits == 0
    warm = run(engine, [GenerationRequest(prompt, GREEDY, request_id="warm")])["warm"]
    assert warm == cold
    stats = engine.stats()
    assert stats.prefix_cache_hits == (len(prompt) - 1) // 4 * 4  # every full block but the last token's
    # the next turn of a conversation re-sends the whole history: only the new part is computed
    turn = prompt + cold + ids(engine, " And what food should I try there?")
    followup = run(engine, [GenerationRequest(turn, GREEDY, request_id="turn")])["turn"]
    assert followup == reference(turn, GREEDY.max_tokens)
    assert engine.stats().prefix_cache_hits - stats.prefix_cache_hits >= len(prompt) + len(cold) - 4


def test_prefix_caching_can_be_switched_off(make_engine):
    engine = make_engine(enable_prefix_caching=False)
    prompt = ids(engine, LONG_TEXT)
    run(engine, [GenerationRequest(prompt, GREEDY, request_id=str(i)) for i in range(2)])
    assert engine.stats().prefix_cache_hits == 0 and engine.stats().kv_blocks_cached == 0


def test_chunked_prefill_equals_one_shot_and_streams_keep_flowing(make_engine, reference):
    engine = make_engine(max_batch_size=4, max_step_tokens=8)
    short = GenerationRequest(ids(engine, "Hello there"), GREEDY.model_copy(update={"max_tokens": 40}), request_id="short")
    long = GenerationRequest(ids(engine, LONG_TEXT), GREEDY, request_id="long")
    engine.core.add(engine.new_row(short))
    while not engine.core.step():  # until the short one streams
        pass
    decoded_per_step = []

    def watch(engine: Engine) -> None:
        rows = {r.request_id: r for r in engine.core.scheduler.running}
        if "long" in rows and not rows["long"].decoding and "short" in rows:
            decoded_per_step.append(len(rows["short"].sampler.output_ids))

    tokens = run(engine, [long], on_step=watch)
    assert tokens["long"] == reference(long.prompt_ids, GREEDY.max_tokens)
    assert len(decoded_per_step) >= len(long.prompt_ids) // 8 - 1  # the prompt took many steps
    assert decoded_per_step == list(range(decoded_per_step[0], decoded_per_step[0] + len(decoded_per_step)))


def test_only_a_steps_first_prompt_is_split(make_engine, reference):
    engine = make_engine(max_batch_size=4, max_step_tokens=16, enable_prefix_caching=False)
    prompt = ids(engine, LONG_TEXT)[:10]
    requests = [GenerationRequest(prompt, GREEDY, request_id=str(i)) for i in range(3)]
    computed = []
    tokens = run(engine, requests, on_step=lambda e: computed.append(e.stats().step_tokens - sum(computed)))
    # 10 of the first; the second's 10 do not fit in the 6 left, so it waits whole; then each
    # step's decodes and the next whole prompt; no prompt needed two steps
    assert computed[:4] == [10, 1 + 10, 2 + 10, 3]
    assert all(tokens[r.request_id] == reference(prompt, GREEDY.max_tokens) for r in requests)
    # a prompt longer than the budget is split, step after step; the one behind it waits
    long = ids(engine, LONG_TEXT)
    done, computed = engine.stats().step_tokens, []
    run(engine, [GenerationRequest(long, GREEDY, request_id="long"), GenerationRequest(prompt, GREEDY, request_id="short")],
        on_step=lambda e: computed.append(e.stats().step_tokens - done - sum(computed)))
    chunks, rest = divmod(len(long), 16)
    assert 0 < rest and rest + 10 > 16  # the long prompt's last chunk leaves no room for the short one
    assert computed[: chunks + 2] == [16] * chunks + [rest, 1 + 10]


def test_requests_arriving_together_compute_their_shared_prefix_once(make_engine, reference):
    engine = make_engine(max_batch_size=4, max_step_tokens=24)
    shared = ids(engine, LONG_TEXT)[:20]
    prompts = [shared + ids(engine, f" user {i}") for i in range(3)]
    requests = [GenerationRequest(p, GREEDY, request_id=str(i)) for i, p in enumerate(prompts)]
    stats = {}
    rows = [engine.new_row(r) for r in requests]
    for row in rows:
        engine.core.add(row)
    while not all(row.finish_reason for row in rows):
        for request_id, delta in engine.core.step():
            if delta.stats:
                stats[request_id] = delta.stats
    # the first computes the shared tokens; the others wait (their prompts do not fit beside it)
    # and, admitted in the next step, find its full blocks (4 tokens each) cached
    common = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1])) if a != b)
    assert common >= 20
    assert [stats[str(i)].cached_prompt_tokens for i in range(3)] == [0, common // 4 * 4, common // 4 * 4]
    assert all(row.sampler.output_ids == reference(p, GREEDY.max_tokens) for row, p in zip(rows, prompts))
    assert all(stats[str(i)].queue_s >= 0 for i in range(3))


def test_memory_stays_within_the_budget_and_preempted_rows_resume_exactly(make_engine, reference):
    engine = make_engine(max_kv_tokens=160, max_batch_size=8, max_step_tokens=64)
    params = GREEDY.model_copy(update={"max_tokens": 50})
    texts = [LONG_TEXT[:60], "Hello there", LONG_TEXT[40:120], "Привет, мир!", LONG_TEXT[100:], "ok"]
    requests = [GenerationRequest(ids(engine, t), params, request_id=str(i)) for i, t in enumerate(texts)]
    peak = []

    def watch(engine: Engine) -> None:
        stats = engine.stats()
        assert stats.kv_blocks_used <= stats.kv_blocks_total == 40
        peak.append(stats.kv_blocks_used)

    tokens = run(engine, requests, on_step=watch)
    for request in requests:
        expected = reference(request.prompt_ids, params.max_tokens)  # cut at the first end token
        assert tokens[request.request_id][: len(expected)] == expected
    stats = engine.stats()
    assert stats.preemptions > 0 and max(peak) > 30
    assert stats.kv_blocks_used == 0 and stats.running == 0


def test_cancelled_and_failed_rows_give_their_blocks_back(make_engine, reference):
    engine = make_engine()
    endless = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    row = engine.new_row(GenerationRequest(ids(engine, LONG_TEXT), endless, request_id="victim"))
    engine.core.add(row)
    made = sum(len(d.token_ids) for _ in range(5) for _, d in engine.core.step())
    assert engine.stats().kv_blocks_used > 0 and made == engine.stats().generated_tokens > 0
    row.cancelled = True
    events = engine.core.step()
    assert [(rid, d.finish_reason, d.token_ids) for rid, d in events] == [("victim", "cancelled", [])]
    assert events[0][1].stats.completion_tokens == made == engine.stats().generated_tokens  # nothing after the cancel
    assert engine.stats().kv_blocks_used == 0

    real_model = engine.core.runner.model
    engine.core.runner.model = lambda **_: (_ for _ in ()).throw(RuntimeError("device lost"))
    engine.core.add(engine.new_row(GenerationRequest(ids(engine, "Hello there"), GREEDY, request_id="doomed")))
    events = engine.core.step()
    assert events[0][1].finish_reason == "error" and "device lost" in events[0][1].error
    assert engine.stats().kv_blocks_used == 0
    engine.core.runner.model = real_model  # the core goes on serving
    prompt = ids(engine, "Hello there")
    assert run(engine, [GenerationRequest(prompt, GREEDY, request_id="after")])["after"] == reference(prompt, 12)


async def test_adapter_identity_keeps_prefix_caches_apart(make_engine, adapter_dirs, reference):
    engine = make_engine()
    prompt = ids(engine, LONG_TEXT)
    await engine.load_adapter("alpha", str(adapter_dirs["alpha"]))
    run(engine, [GenerationRequest(prompt, GREEDY, request_id="base")])
    hits = engine.stats().prefix_cache_hits
    tokens = run(engine, [GenerationRequest(prompt, GREEDY, "alpha", request_id="alpha")])["alpha"]
    assert engine.stats().prefix_cache_hits == hits  # the base model's KV is not alpha's
    assert tokens == reference(prompt, 12, adapter_dirs["alpha"])
    await engine.unload_adapter("alpha")
    await engine.load_adapter("alpha", str(adapter_dirs["beta"]))  # same name, other weights
    tokens = run(engine, [GenerationRequest(prompt, GREEDY, "alpha", request_id="reloaded")])["reloaded"]
    assert engine.stats().prefix_cache_hits == hits
    assert tokens == reference(prompt, 12, adapter_dirs["beta"])
    await engine.close()


def test_attention_over_several_runs_equals_one_contiguous_context():
    torch.manual_seed(0)
    heads, kv_heads, dim, context, queries = 4, 2, 8, 23, 5
    q = torch.randn(heads, queries, dim)
    keys, values = torch.randn(kv_heads, 64, dim), torch.randn(kv_heads, 64, dim)
    runs = [(50, 8), (26, 12), (40, 3)]  # scattered: 8 + 12 + 3 = 23 positions
    k = torch.cat([keys[:, first : first + n] for first, n in runs], dim=1)
    v = torch.cat([values[:, first : first + n] for first, n in runs], dim=1)
    keys[:, 0:context], values[:, 0:context] = k, v  # the same context, contiguous at slot 0
    contiguous = attend(q, keys, values, [(0, context)], None)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=torch.ones(queries, context, dtype=torch.bool).tril(context - queries),
        enable_gqa=True,
    )[0]
    torch.testing.assert_close(contiguous, expected)  # earlier context and own chunk merged on CPU
    torch.testing.assert_close(attend(q, keys, values, runs, None), expected)
    torch.testing.assert_close(attend_runs(q, keys, values, runs, None), expected)  # the other devices' path
    one = attend(q[:, -1:], keys, values, runs, None)
    torch.testing.assert_close(one, expected[:, -1:])


def test_a_context_in_many_runs_is_gathered_and_attended_as_one():
    """The attention layer copies a fragmented context out (`gather`) and gets what the runs
    give read in place; prompt chunks gather once their earlier context is in two runs or
    more, long decodes only when the runs outnumber what copying costs, and never off the CPU."""
    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 8
    cache = PagedKVCache(1, num_blocks=16, block_size=8, kv_heads=kv_heads, head_dim=dim, dtype=torch.float32,
                         device=torch.device("cpu"))
    keys, values = cache.layer(0)
    keys.normal_(), values.normal_()
    runs = [(96, 16), (8, 24), (64, 8), (40, 5)]  # 53 positions: 48 earlier, then 5 queries
    query = torch.randn(1, heads, 5, dim)
    module = torch.nn.Module()
    module.layer_idx = 0
    outputs = []
    for seq in (SequenceLayout(0, 5, runs), SequenceLayout(0, 5, runs).gathered(torch.device("cpu"))):
        layout = StepLayout(cache, torch.zeros(5, dtype=torch.long), 5, None, [seq])
        outputs.append(paged_attention(module, query, None, None, None, kv_layout=layout)[0])
    torch.testing.assert_close(outputs[1], outputs[0])
    assert outputs[1].shape == (1, 5, heads, dim)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert should_gather(SequenceLayout(0, 5, runs), cpu) and not should_gather(SequenceLayout(0, 5, runs), cuda)
    assert not should_gather(SequenceLayout(0, 5, [(96, 16), (8, 5)]), cpu)  # one earlier run, then its own
    assert not should_gather(SequenceLayout(0, 1, [(0, 600), (800, 600)]), cpu)  # 2 runs of 1,200 tokens
    assert should_gather(SequenceLayout(0, 1, [(i * 100, 50) for i in range(24)]), cpu)


def test_kernel_decodes_lay_every_rows_context_end_to_end():
    rows = [SequenceLayout(0, 1, [(96, 16), (8, 5)]), SequenceLayout(3, 1, [(40, 1)]),
            SequenceLayout(7, 1, [(64, 3), (0, 2), (200, 4)])]
    decodes = KernelDecodes.build(rows)
    assert decodes.rows == 3 and decodes.positions.tolist() == [0, 3, 7]
    assert decodes.slots.dtype == decodes.offsets.dtype == torch.int32
    assert decodes.offsets.tolist() == [0, 21, 22, 31]
    assert decodes.slots.tolist() == torch.cat([seq.context_slots() for seq in rows]).tolist()


async def test_prepacked_bf16_weights_give_the_same_tokens(engine_config, adapter_dirs):
    """On the CPU in bf16 the Linear layers run on oneDNN-packed copies of their weights, q/k/v
    and gate/up each as one fused matmul: bitwise the same results as F.linear per layer, with
    and without an adapter's segment (alpha adapts q and v, so LoRA adds into fused columns)."""
    outputs = []
    for prepack in (False, True):
        config = engine_config.model_copy(update={"dtype": "bfloat16", "prepack_weights": prepack, "kv_block_size": 4})
        engine = Engine.from_config(config)
        layers = engine.lora.layers
        assert all((layer.packed is not None or layer.fused is not None) == prepack for layer in layers.values())
        fused = {name.rsplit(".", 1)[-1] for name, layer in layers.items() if layer.fused is not None}
        assert fused == ({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} if prepack else set())
        await engine.load_adapter("alpha", str(adapter_dirs["alpha"]))
        prompt = ids(engine, LONG_TEXT)
        requests = [GenerationRequest(prompt, GREEDY, adapter, request_id=str(adapter)) for adapter in (None, "alpha")]
        outputs.append(run(engine, requests))
        await engine.close()
    assert outputs[0] == outputs[1]
    assert outputs[0]["None"] != outputs[0]["alpha"]


def test_step_counters_count_computed_tokens_and_rows(make_engine):
    engine = make_engine(max_step_tokens=16, max_batch_size=4, enable_prefix_caching=False)
    prompt = ids(engine, LONG_TEXT)  # longer than one step's budget: prefilled in chunks
    steps_with_rows = []
    run(engine, [GenerationRequest(prompt, GREEDY, request_id="a"), GenerationRequest(prompt[:5], GREEDY, request_id="b")],
        on_step=lambda e: steps_with_rows.append(e.core.stats(0).batch_size))
    stats = engine.stats()
    computed = [n for n in steps_with_rows if n]
    assert stats.steps == len(computed)
    assert stats.step_rows == sum(computed)
    # every prompt token and every sampled token but each request's last is computed once
    assert stats.step_tokens == len(prompt) + 5 + 2 * (GREEDY.max_tokens - 1)
    assert stats.step_seconds > 0
