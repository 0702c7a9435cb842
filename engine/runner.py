"""One forward pass over a step's chunks: packed inputs, adapters per segment, logits to sample.

Every chunk of the step (decode tokens and prompt chunks alike) goes into one packed row
`[1, T]`, ordered by adapter so that each adapter's tokens form one segment (engine/lora.py).
The row's positions are the tokens' positions in their own sequences, and `StepLayout` tells
the attention layers which slots to write and which runs to read (engine/kv_cache.py). Only
the last position of each chunk that samples reaches the LM head (`logits_to_keep`), plus,
for a row that asks for prompt logprobs, the positions that score its prompt (engine/logprobs.py).

Thread: the engine core's worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby

import torch
from transformers import PreTrainedModel

from engine.attention import SHORT_CONTEXT, use_paged_attention
from engine.kv_cache import PagedKVCache, SequenceLayout, ShortDecodes, StepLayout
from engine.logprobs import PromptSpan, prompt_positions
from engine.lora import AdapterRegistry
from engine.row import Row
from engine.scheduler import ScheduledChunk


@dataclass
class PackedStep:
    """The tensors of one forward pass, and which row each kept logit belongs to."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    keep: torch.Tensor  # [S] positions in the row whose logits are sampled
    layout: StepLayout
    segments: list[tuple[str, int, int]]  # (adapter, start, stop) in the row
    sampled_rows: list[Row]
    prompt_spans: list[PromptSpan] = field(default_factory=list)  # kept after the sampled positions


@dataclass
class StepLogits:
    """The kept logits of one forward pass: one row per sampling row, then the prompt spans'."""

    rows: list[Row]
    logits: torch.Tensor  # [rows, vocab]
    prompt_spans: list[PromptSpan]
    prompt_logits: torch.Tensor  # [sum of the spans' counts, vocab]


class ModelRunner:
    """Runs the model on packed steps over the engine's KV cache."""

    def __init__(self, model: PreTrainedModel, cache: PagedKVCache, adapters: AdapterRegistry):
        use_paged_attention(model)
        self.model = model
        self.cache = cache
        self.adapters = adapters
        self.device = next(model.parameters()).device

    def run(self, chunks: list[ScheduledChunk]) -> StepLogits:
        """Compute the chunks' KV; return the logits of the rows that sample (and prompt spans).

        Call under `torch.inference_mode()`."""
        step = self.pack(chunks)
        self.cache.layout = step.layout
        self.adapters.context.segments = step.segments
        try:
            out = self.model(
                input_ids=step.input_ids, position_ids=step.position_ids, past_key_values=self.cache,
                use_cache=False, logits_to_keep=step.keep, kv_layout=step.layout,
            )
        finally:
            self.cache.layout = None
            self.adapters.context.segments = []
        logits, sampled = out.logits[0], len(step.sampled_rows)
        return StepLogits(step.sampled_rows, logits[:sampled], step.prompt_spans, logits[sampled:])

    def pack(self, chunks: list[ScheduledChunk]) -> PackedStep:
        """Lay the chunks out in one row, grouped by adapter (base-model chunks first)."""
        chunks = sorted(chunks, key=lambda c: c.row.request.adapter or "")
        size = self.cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sequences, keep, sampled, spans, scoring = [], [], [], [], []
        for chunk in chunks:
            row, stop = chunk.row, chunk.start + chunk.length
            sequences.append(SequenceLayout(len(ids), chunk.length, row.table.slot_runs(stop, size)))
            ids += row.token_range(chunk.start, stop)
            positions += range(chunk.start, stop)
            slots += row.table.slots(chunk.start, stop, size)
            if chunk.sample:
                keep.append(len(ids) - 1)
                sampled.append(row)
            if row.prompt_logprobs is not None:
                scored = prompt_positions(row.prompt_logprobs, len(row.request.prompt_ids), chunk.start, stop)
                if scored:
                    spans.append(PromptSpan(row, scored.start, len(scored)))
                    scoring += range(len(ids) - stop + scored.start, len(ids) - stop + scored.stop)
        device = self.device
        short, others = [], []
        for seq in sequences:
            (short if seq.q_len == 1 and seq.context <= SHORT_CONTEXT else others).append(seq)
        layout = StepLayout(
            self.cache, torch.tensor(slots, device=device), len(ids),
            ShortDecodes.build(short, device) if short else None, others,
        )
        return PackedStep(
            input_ids=torch.tensor([ids], device=device),
            position_ids=torch.tensor([positions], device=device),
            keep=torch.tensor(keep + scoring, dtype=torch.long, device=device),
            layout=layout,
            segments=adapter_segments(chunks, sequences),
            sampled_rows=sampled,
            prompt_spans=spans,
        )


def adapter_segments(chunks: list[ScheduledChunk], sequences: list[SequenceLayout]) -> list[tuple[str, int, int]]:
    """(adapter, start, stop) of each run of consecutive chunks that use the same adapter."""
    segments = []
    pairs = list(zip(chunks, sequences))
    for adapter, group in groupby(pairs, key=lambda pair: pair[0].row.request.adapter):
        group = list(group)
        if adapter is not None:
            first, last = group[0][1], group[-1][1]
            segments.append((adapter, first.q_start, last.q_start + last.q_len))
    return segments
