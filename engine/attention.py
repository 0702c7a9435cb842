"""Attention over the engine's paged KV cache, plugged into transformers' `AttentionInterface`.

`paged_attention` replaces the model's attention function: the model hands it the packed
step's queries `[1, heads, T, dim]` (after RoPE; the new keys and values were already
written into the cache by `PagedKVCache.update`) and, among the forward's keyword arguments,
`kv_layout`, which says where each sequence's queries and context are. Every path computes
the same causal attention; which one a sequence takes is a matter of cost on the CPU (the
measurements behind each choice: bench/README.md, Design notes):

- decode rows with short contexts (at most `SHORT_CONTEXT` tokens) are attended all at once:
  their context slots are gathered into one padded tensor and two batched matmuls and a
  softmax do the rest (SDPA's fixed cost per call exceeds copying a short context);
- decode rows with long contexts read their context where it lies, one SDPA call per row.
  The query heads sharing a KV head are folded into the query axis
  (`[1, kv_heads, group, dim]`), so grouped-query attention reads each KV head once
  instead of repeating it `group` times;
- a prompt chunk at position 0 of a sequence: SDPA with `is_causal`;
- any other chunk (after earlier context, or over several runs of blocks): on CPU, one
  SDPA call with no mask for the earlier context (every query sees all of it) and a
  causal call for the chunk's own keys, merged exactly by their log-sum-exps (a masked
  SDPA over the whole context visits every masked block). Elsewhere (CUDA), one softmax
  over the runs' scores with an explicit causal mask.
- on a CPU bf16 model with the attention kernel on (EngineConfig.attention_kernel, a CPU
  with AVX-512 BF16), every decode row instead goes to the kernel's `decode` (one call per
  layer for all of them, whatever their context lengths and runs: it reads each row's slots
  where they lie), and a prompt chunk of at least `KERNEL_MIN_QUERIES` tokens goes whole to
  its `attend` (engine/attention_kernel.py): bf16 dot products at about three times SDPA's
  speed here, one parallel region per layer instead of one per torch op.

A conversation's context fragments as it grows: each turn's prompt takes its blocks at once,
but reply blocks are taken one at a time, interleaved with other streams', and each run of
blocks costs a call (and for a chunk a log-sum-exp merge) per layer. When the context lies
in more runs than pay off (`should_gather`), the runner gives the sequence a `gather` index
and attention copies the context into one contiguous tensor first (one `index_select` per
layer), then proceeds as for one run.

Supported model families: those whose attention calls `past_key_values.update` and then the
configured attention function, with full (not sliding-window) attention. Tested on Llama
(SmolLM2 and tiny random Llamas), Mistral and Qwen2 (tiny random models); others are refused.

Thread: the engine's worker thread, inside a forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PretrainedConfig

from engine.attention_kernel import AttendOp
from engine.kv_cache import SequenceLayout, ShortDecodes, StepLayout

ATTENTION_NAME = "lora_serve_paged"
# Decode rows with at most this many context tokens are attended together on a gathered copy
# of their contexts; longer ones where they lie (about where the two cost the same here).
SHORT_CONTEXT = 1024
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
# A long decode row's context is copied out (`gather`) when it lies in more runs than
# 1 + context // GATHER_DECODE_TOKENS_PER_RUN: a call per run costs about what copying this
# many tokens does. Prompt chunks gather whenever their earlier context is in more than one
# run: the copy is small beside the chunk's own work.
GATHER_DECODE_TOKENS_PER_RUN = 1024
# Prompt chunks of at least this many tokens use the CPU bf16 kernel when it is on (a chunk
# of 16 over 2,600 keys runs in half SDPA's time there; shorter ones gain less than the
# kernel's repacking of the context costs).
KERNEL_MIN_QUERIES = 16


def should_gather(seq: SequenceLayout, device: torch.device) -> bool:
    """True when copying `seq`'s context into one tensor costs less than a call per run (CPU)."""
    if device.type != "cpu" or len(seq.runs) < 2:
        return False
    if seq.q_len == 1:
        return len(seq.runs) > 1 + seq.context // GATHER_DECODE_TOKENS_PER_RUN
    split = split_runs(seq.runs, seq.context - seq.q_len)
    return split is None or len(split[0]) > 1


def use_paged_attention(model: torch.nn.Module) -> None:
    """Make `model` attend through `paged_attention` (registered in transformers' interface)."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    model.set_attn_implementation(ATTENTION_NAME)


def check_supported(config: PretrainedConfig, context_window: int) -> None:
    """Raise NotImplementedError for models whose attention this cache cannot serve exactly."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise NotImplementedError(
            f"model type {config.model_type!r} is not supported by the paged KV cache "
            f"(supported: {supported})"
        )
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < context_window:
        raise NotImplementedError(
            f"sliding-window attention ({window} tokens) is not supported; "
            f"set max_input_tokens so prompt plus completion stay within {window} tokens"
        )


def paged_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
    kv_layout: StepLayout | None = None, **_kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [1, heads, T, dim] -> output [1, T, heads, dim]."""
    if kv_layout is None:
        raise RuntimeError(f"attention {ATTENTION_NAME!r} runs only inside the engine (no kv_layout)")
    keys, values = kv_layout.cache.layer(module.layer_idx)
    _, heads, _, dim = query.shape
    kv_heads = keys.shape[0]
    scale = scaling if scaling is not None else dim**-0.5
    tokens = query[0].transpose(0, 1)  # [T, heads, dim]: a token's heads side by side
    decodes, kernel = kv_layout.kernel_decodes, kv_layout.attention_kernel
    if decodes is not None and decodes.rows == kv_layout.tokens:  # a decode-only step: one call
        return kernel.decode(tokens, keys, values, decodes.slots, decodes.offsets, scale).unsqueeze(0), None
    tokens = tokens.contiguous()
    out = tokens.new_empty(tokens.shape)
    if decodes is not None:
        q = tokens.index_select(0, decodes.positions)
        out.index_copy_(0, decodes.positions, kernel.decode(q, keys, values, decodes.slots, decodes.offsets, scale))
    short = kv_layout.short_decodes
    if short is not None:
        out.index_copy_(0, short.positions, attend_short(tokens.index_select(0, short.positions), keys, values, short, scale))
    for seq in kv_layout.sequences:
        if seq.kernel_slots is not None:
            out[seq.q_start : seq.q_start + seq.q_len] = attend_kernel(
                kernel.attend, tokens[seq.q_start : seq.q_start + seq.q_len], keys, values,
                seq.kernel_slots, scale)
            continue
        seq_keys, seq_values, runs = keys, values, seq.runs
        if seq.gather is not None:  # many runs: one copy of the context (see the module docstring)
            seq_keys, seq_values, runs = keys.index_select(1, seq.gather), values.index_select(1, seq.gather), [
                (0, seq.context)]
        if seq.q_len == 1 and len(runs) == 1:  # a long context, read where it lies
            first, length = runs[0]
            folded = tokens[seq.q_start].view(1, kv_heads, heads // kv_heads, dim)
            result = F.scaled_dot_product_attention(
                folded, seq_keys[None, :, first : first + length], seq_values[None, :, first : first + length],
                scale=scale,
            ).view(1, heads, dim)
        else:
            q = tokens[seq.q_start : seq.q_start + seq.q_len].transpose(0, 1)
            result = attend(q, seq_keys, seq_values, runs, scale).transpose(0, 1)
        out[seq.q_start : seq.q_start + seq.q_len] = result
    return out.unsqueeze(0), None


def attend_kernel(
    kernel: AttendOp, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, scale: float
) -> torch.Tensor:
    """A prompt chunk's queries [n, heads, dim] over its context (`slots`, in order, the chunk
    last) through the CPU bf16 kernel (engine/attention_kernel.py) -> [n, heads, dim]."""
    n, heads, dim = q.shape
    kv_heads = keys.shape[0]
    folded = q.transpose(0, 1).reshape(kv_heads, heads // kv_heads * n, dim)  # row g * n + i: query i of head g
    return kernel(folded, keys, values, slots, n, scale).view(heads, n, dim).transpose(0, 1)


def attend_short(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, short: ShortDecodes, scale: float
) -> torch.Tensor:
    """One query per row [rows, heads, dim], every row's short context gathered -> [rows, heads, dim]:
    matmuls and a softmax over all rows at once (`short.bias` masks each row's padding)."""
    rows, heads, dim = q.shape
    kv_heads = keys.shape[0]
    longest = short.slots.shape[1]
    flat = short.slots.view(-1)
    k = keys.index_select(1, flat).view(kv_heads, rows, longest, dim)
    v = values.index_select(1, flat).view(kv_heads, rows, longest, dim)
    folded = q.view(rows, kv_heads, heads // kv_heads, dim).transpose(0, 1)  # [kv_heads, rows, group, dim]
    scores = torch.matmul(folded, k.transpose(-1, -2)).float() * scale + short.bias[None, :, None, :]
    probs = scores.softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, v).transpose(0, 1).reshape(rows, heads, dim)


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, runs: list[tuple[int, int]], scale: float | None
) -> torch.Tensor:
    """Causal attention of one sequence's queries [heads, n, dim] to its context, which lies in
    `runs` (first slot, tokens) of `keys` / `values`, the queries last -> [heads, n, dim]."""
    n = q.shape[1]
    if len(runs) == 1 and runs[0][1] == n:  # a whole sequence at once
        first, length = runs[0]
        return F.scaled_dot_product_attention(
            q.unsqueeze(0), keys[None, :, first : first + length], values[None, :, first : first + length],
            is_causal=True, scale=scale, enable_gqa=True,
        )[0]
    own = split_runs(runs, sum(length for _, length in runs) - n)
    if q.device.type == "cpu" and own is not None:
        return attend_merged(q, keys, values, own[0], own[1], scale)
    return attend_runs(q, keys, values, runs, scale)


def split_runs(
    runs: list[tuple[int, int]], earlier: int
) -> tuple[list[tuple[int, int]], tuple[int, int]] | None:
    """(runs of the first `earlier` positions, the single run of the rest), or None when the
    rest is not contiguous."""
    before, left = [], earlier
    for index, (first, length) in enumerate(runs):
        if left >= length:
            before.append((first, length))
            left -= length
            continue
        if left:
            before.append((first, left))
        if index != len(runs) - 1:
            return None
        return before, (first + left, length - left)
    return None


def attend_merged(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, earlier: list[tuple[int, int]],
    own: tuple[int, int], scale: float | None,
) -> torch.Tensor:
    """CPU: one unmasked SDPA per run of earlier context plus a causal one over the queries'
    own keys, combined exactly through their log-sum-exps (see the module docstring)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    heads, n, dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    folded = q.reshape(1, kv_heads, group * n, dim)  # no mask on earlier context: fold the groups
    parts = []
    for first, length in earlier:
        out, lse = flash(folded, keys[None, :, first : first + length], values[None, :, first : first + length],
                         scale=scale)
        parts.append((out.reshape(heads, n, dim), lse.reshape(heads, n)))
    first, length = own
    own_keys = keys[:, first : first + length].repeat_interleave(group, 0)
    own_values = values[:, first : first + length].repeat_interleave(group, 0)
    out, lse = flash(q.unsqueeze(0), own_keys[None], own_values[None], is_causal=True, scale=scale)
    parts.append((out[0], lse[0]))
    top = torch.stack([lse for _, lse in parts]).amax(dim=0)
    weights = [(lse - top).exp() for _, lse in parts]
    total = sum(w.unsqueeze(-1) * out.float() for w, (out, _) in zip(weights, parts))
    return (total / sum(weights).unsqueeze(-1)).to(q.dtype)


def attend_runs(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, runs: list[tuple[int, int]], scale: float | None
) -> torch.Tensor:
    """Any device: one softmax over the scores of every run, with an explicit causal mask."""
    heads, n, dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    folded = q.reshape(kv_heads, group * n, dim)  # row g * n + j is query j of head group g
    scale = scale if scale is not None else dim**-0.5
    scores = torch.cat(
        [folded @ keys[:, first : first + length].transpose(1, 2) for first, length in runs], dim=-1
    ).float() * scale
    allowed = causal_mask(n, scores.shape[-1], q.device).repeat(group, 1)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).to(q.dtype)
    out, start = None, 0
    for first, length in runs:
        part = probs[..., start : start + length] @ values[:, first : first + length]
        out = part if out is None else out + part
        start += length
    return out.reshape(heads, n, dim)


def causal_mask(queries: int, context: int, device: torch.device) -> torch.Tensor:
    """[queries, context] bool: query j (position context - queries + j) sees keys up to itself."""
    return torch.ones(queries, context, dtype=torch.bool, device=device).tril(context - queries)
