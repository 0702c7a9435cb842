"""The CPU bf16 attention kernel (engine/csrc/attention_kernel.cpp), both ops (`attend` for
prompt chunks, `decode` for decode rows), against a float64 reference, through paged
attention, and in the engine (skipped on CPUs without AVX-512 BF16)."""

from __future__ import annotations

import pytest
import torch

from engine.attention import KERNEL_MIN_QUERIES, paged_attention
from engine.attention_kernel import kernel_for, load_kernel
from engine.engine import Engine
from engine.kv_cache import KernelDecodes, PagedKVCache, SequenceLayout, StepLayout
from engine.request import GenerationRequest
from tests.test_core import GREEDY, run
from tests.tiny_models import LONG_TEXT, ids

KERNEL = load_kernel()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no AVX-512 BF16 on this CPU (or the kernel did not build)")


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, queries: int,
              scale: float, causal: bool = True) -> torch.Tensor:
    """Causal attention in float64: row m is query m % queries, the context's last `queries` keys its own."""
    k, v = keys[:, slots.long()].double(), values[:, slots.long()].double()
    scores = q.double() @ k.transpose(1, 2) * scale
    context = k.shape[1]
    query = torch.arange(q.shape[1]) % queries
    if causal:
        allowed = torch.arange(context)[None, :] <= (context - queries + query)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def bf16_error_bound(expected: torch.Tensor) -> float:
    """Rounding the output and the probabilities to bf16 (8 significant bits) moves a value by
    a few of its last bits: allow 2**-6 of the largest."""
    return expected.abs().max().item() * 2**-6


@pytest.mark.parametrize("kv_heads, group, queries, context, dim", [
    (3, 3, 340, 1000, 64),  # SmolLM2's heads; a chunk after earlier context, not a multiple of the blocks
    (2, 2, 33, 33, 128),  # a whole prompt (no earlier context), Llama's head size
    (1, 4, 5, 70, 16),  # a few queries, the tiny models' head size
    (2, 1, 1, 1, 32),  # one token, one key
])
def test_the_kernel_matches_float64_attention(kv_heads, group, queries, context, dim):
    torch.manual_seed(0)
    slots_in_cache = context + 40
    keys = torch.randn(kv_heads, slots_in_cache, dim).bfloat16()
    values = torch.randn(kv_heads, slots_in_cache, dim).bfloat16()
    slots = torch.randperm(slots_in_cache)[:context].int()  # the context scattered over the cache
    q = (torch.randn(kv_heads, group * queries, dim) * 2).bfloat16()
    out = KERNEL.attend(q, keys, values, slots, queries, dim**-0.5)
    expected = reference(q, keys, values, slots, queries, dim**-0.5)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert (out.double() - expected).abs().max().item() <= bf16_error_bound(expected)
    if queries > 1:  # the causal mask matters: attending to every key gives another answer
        unmasked = reference(q, keys, values, slots, queries, dim**-0.5, causal=False)
        assert (unmasked - expected).abs().max().item() > 10 * bf16_error_bound(expected)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "q": a["q"].float()}, "bfloat16"),
    (lambda a: {**a, "slots": a["slots"].long()}, "slots int32"),
    (lambda a: {**a, "slots": a["slots"] + 1000}, "slot out of range"),
    (lambda a: {**a, "queries": 7}, "queries must divide"),
    (lambda a: {**a, "keys": a["keys"][:1]}, "same KV heads"),
])
def test_bad_calls_are_refused_with_a_reason(change, message):
    args = {"q": torch.zeros(2, 8, 16).bfloat16(), "keys": torch.zeros(2, 20, 16).bfloat16(),
            "values": torch.zeros(2, 20, 16).bfloat16(), "slots": torch.arange(10).int(), "queries": 4}
    args = change(args)
    with pytest.raises(RuntimeError, match=message):
        KERNEL.attend(args["q"], args["keys"], args["values"], args["slots"], args["queries"], 0.25)


@pytest.mark.parametrize("kv_heads, group, dim, contexts", [
    (3, 3, 64, [230, 1, 17, 3000]),  # SmolLM2's heads; one row with only its own key, one long
    (2, 7, 48, [40, 129]),  # a group of more than four heads (two passes); 48 = 32 + half a vector
    (1, 4, 16, [5]),  # the tiny models' head size: half a vector only
    (2, 2, 128, [300, 64]),  # Llama's head size
])
def test_decode_matches_float64_attention(kv_heads, group, dim, contexts):
    torch.manual_seed(0)
    slots_in_cache = sum(contexts) + 50
    keys = torch.randn(kv_heads, slots_in_cache, dim).bfloat16()
    values = torch.randn(kv_heads, slots_in_cache, dim).bfloat16()
    slots = torch.randperm(slots_in_cache)[: sum(contexts)].int()  # every context scattered over the cache
    offsets = torch.tensor([0, *contexts]).cumsum(0).int()
    q = (torch.randn(len(contexts), kv_heads * group, dim) * 2).bfloat16()
    out = KERNEL.decode(q, keys, values, slots, offsets, dim**-0.5)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    for row in range(len(contexts)):
        folded = q[row].view(kv_heads, group, dim)  # heads h * group + g share KV head h
        own = slots[offsets[row] : offsets[row + 1]]
        expected = reference(folded, keys, values, own, 1, dim**-0.5, causal=False)
        got = out[row].view(kv_heads, group, dim).double()
        assert (got - expected).abs().max().item() <= bf16_error_bound(expected), row


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "offsets": torch.tensor([0, 2, 4, 6], dtype=torch.int32)}, "offsets int32"),  # 3 rows' worth
    (lambda a: {**a, "offsets": torch.tensor([0, 2, 10], dtype=torch.int32)}, "offsets must run from 0 to N"),
    (lambda a: {**a, "offsets": torch.tensor([0, 0, 6], dtype=torch.int32)}, "at least one key"),
    (lambda a: {**a, "slots": a["slots"] + 1000}, "slot out of range"),
    (lambda a: {**a, "q": torch.zeros(2, 3, 16).bfloat16()}, "divisor of q's heads"),
    (lambda a: {**a, "q": a["q"].float()}, "bfloat16"),
])
def test_bad_decode_calls_are_refused_with_a_reason(change, message):
    args = {"q": torch.zeros(2, 4, 16).bfloat16(), "keys": torch.zeros(2, 20, 16).bfloat16(),
            "values": torch.zeros(2, 20, 16).bfloat16(), "slots": torch.arange(6).int(),
            "offsets": torch.tensor([0, 2, 6], dtype=torch.int32)}
    args = change(args)
    with pytest.raises(RuntimeError, match=message):
        KERNEL.decode(args["q"], args["keys"], args["values"], args["slots"], args["offsets"], 0.25)


def paged_cache(kv_heads: int, dim: int) -> PagedKVCache:
    cache = PagedKVCache(1, num_blocks=16, block_size=8, kv_heads=kv_heads, head_dim=dim, dtype=torch.bfloat16,
                         device=torch.device("cpu"))
    keys, values = cache.layer(0)
    keys.normal_(), values.normal_()
    return cache


def attention_layer() -> torch.nn.Module:
    module = torch.nn.Module()
    module.layer_idx = 0
    return module


@pytest.mark.parametrize("with_chunk", [False, True], ids=["decode-only step", "decodes beside a prompt chunk"])
def test_paged_attention_gives_every_decode_row_to_the_kernel(with_chunk):
    """Decode rows (short and fragmented contexts) through the kernel's one call match the
    torch paths, in a decode-only step and beside a prompt chunk (which SDPA attends)."""
    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 16
    cache = paged_cache(kv_heads, dim)
    decodes = [SequenceLayout(0, 1, [(96, 16), (8, 5)]), SequenceLayout(1, 1, [(40, 1)]),
               SequenceLayout(2, 1, [(64, 30)])]
    chunk = [SequenceLayout(3, 4, [(0, 6)])] if with_chunk else []
    tokens = 3 + (4 if with_chunk else 0)
    query = torch.randn(1, heads, tokens, dim).bfloat16()
    write = torch.zeros(tokens, dtype=torch.long)
    torch_layout = StepLayout(cache, write, tokens, None, decodes + chunk)
    kernel_layout = StepLayout(cache, write, tokens, None, chunk, KERNEL, KernelDecodes.build(decodes))
    expected = paged_attention(attention_layer(), query, None, None, None, kv_layout=torch_layout)[0].double()
    got = paged_attention(attention_layer(), query, None, None, None, kv_layout=kernel_layout)[0].double()
    assert got.shape == expected.shape == (1, tokens, heads, dim)
    assert (got - expected).abs().max().item() <= bf16_error_bound(expected)


def test_paged_attention_gives_a_long_chunk_to_the_kernel_whatever_its_runs():
    torch.manual_seed(0)
    heads, kv_heads, dim, queries = 4, 2, 16, KERNEL_MIN_QUERIES + 3
    cache = paged_cache(kv_heads, dim)
    runs = [(96, 16), (8, 24), (64, 8), (40, 19)]  # 67 positions: 48 earlier, then the chunk's 19
    query = torch.randn(1, heads, queries, dim).bfloat16()
    module = attention_layer()
    outputs = []
    for seq, kernel in ((SequenceLayout(0, queries, runs), None), (SequenceLayout(0, queries, runs).with_kernel_slots(), KERNEL)):
        layout = StepLayout(cache, torch.zeros(queries, dtype=torch.long), queries, None, [seq], kernel)
        outputs.append(paged_attention(module, query, None, None, None, kv_layout=layout)[0].double())
    assert (outputs[1] - outputs[0]).abs().max().item() <= bf16_error_bound(outputs[0])


def test_the_kernel_is_chosen_only_where_it_runs():
    cpu = torch.device("cpu")
    assert kernel_for("auto", cpu, torch.bfloat16, 64) is KERNEL
    assert kernel_for("torch", cpu, torch.bfloat16, 64) is None
    assert kernel_for("auto", cpu, torch.float32, 64) is None  # fp32 models keep SDPA's exact fp32
    assert kernel_for("auto", torch.device("cuda"), torch.bfloat16, 64) is None
    assert kernel_for("auto", cpu, torch.bfloat16, 40) is None  # not a multiple of 16
    with pytest.raises(ValueError, match="attention_kernel"):
        kernel_for("fast", cpu, torch.bfloat16, 64)


async def test_a_bf16_engine_with_the_kernel_scores_prompts_as_sdpa_does(engine_config):
    """Prompt logprobs of a long prompt (prefilled in chunks over earlier context) with the
    kernel and with SDPA: the same up to bf16 rounding."""
    params = GREEDY.model_copy(update={"prompt_logprobs": 0, "max_tokens": 1})
    scored = {}
    for setting in ("auto", "torch"):
        config = engine_config.model_copy(update={"dtype": "bfloat16", "attention_kernel": setting, "kv_block_size": 4,
                                                  "max_step_tokens": 24, "max_batch_size": 4})
        engine = Engine.from_config(config)
        assert (engine.core.runner.attention_kernel is not None) == (setting == "auto")
        prompt = ids(engine, LONG_TEXT)
        row = engine.new_row(GenerationRequest(prompt, params, request_id=setting))
        engine.core.add(row)
        while not row.finish_reason:
            engine.core.step()
        scored[setting] = torch.tensor([entry.logprob for entry in row.prompt_logprobs[1:]])
        await engine.close()
    assert len(scored["auto"]) == len(prompt) - 1 > 3 * 24
    assert (scored["auto"] - scored["torch"]).abs().max().item() < 0.1


async def test_a_bf16_engine_with_the_kernel_decodes_the_argmax(engine_config):
    """Greedy replies decoded with the kernel (rows of different lengths decoding together,
    beside a prompt still prefilling in chunks, contexts in blocks of 4) are, token by token,
    the most likely under the SDPA path, up to bf16 rounding."""
    base = engine_config.model_copy(update={"dtype": "bfloat16", "kv_block_size": 4, "max_step_tokens": 24,
                                            "max_batch_size": 4})
    engine = Engine.from_config(base.model_copy(update={"attention_kernel": "auto"}))
    prompts = [ids(engine, LONG_TEXT[:length]) for length in (40, 90, len(LONG_TEXT))]
    requests = [GenerationRequest(p, GREEDY, request_id=str(i)) for i, p in enumerate(prompts)]
    replies = run(engine, requests)
    await engine.close()
    engine = Engine.from_config(base.model_copy(update={"attention_kernel": "torch"}))
    scoring = GREEDY.model_copy(update={"prompt_logprobs": 1, "max_tokens": 1})
    for i, prompt in enumerate(prompts):
        sequence = prompt + replies[str(i)]
        row = engine.new_row(GenerationRequest(sequence, scoring, request_id=f"score-{i}"))
        engine.core.add(row)
        while not row.finish_reason:
            engine.core.step()
        for entry in row.prompt_logprobs[len(prompt):]:
            assert entry.logprob >= entry.top[0][2] - 0.05, (i, entry)
    await engine.close()
