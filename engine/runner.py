"""One forward pass over a step's chunks: packed inputs, adapters per segment, logits to sample.

Every chunk of the step (decode tokens and prompt chunks alike) goes into one packed row
`[1, T]`, ordered by `order_key` (engine/lora_plan.py): base-model chunks first, then long
runs of one adapter, then the other adapters' chunks by rank class, each adapter's chunks
together. The step's LoRA plan (`LoraStep`) says which pool rows each token uses; every LoRA
layer reads it from `LoraLayers.context` (engine/lora.py). The runner needs only the layers
and each adapter's `Placement` (a mapping name -> Placement that its owner keeps current).
The row's positions are the tokens' positions in their own sequences, and `StepLayout` tells
the attention layers which slots to write and which runs to read (engine/kv_cache.py). Only
the last position of each chunk that samples reaches the LM head (`logits_to_keep`), plus,
for a row that asks for prompt logprobs, the positions that score its prompt (engine/logprobs.py).

Thread: the engine core's worker thread.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from engine.attention import KERNEL_MIN_QUERIES, SHORT_CONTEXT, should_gather, use_paged_attention
from engine.attention_kernel import AttentionKernel
from engine.kv_cache import KernelDecodes, PagedKVCache, SequenceLayout, ShortDecodes, StepLayout
from engine.logprobs import PromptSpan, prompt_positions
from engine.lora import LoraLayers
from engine.lora_plan import LoraStep, Placement, order_key
from engine.row import Row
from engine.scheduler import ScheduledChunk


@dataclass
class PackedStep:
    """The tensors of one forward pass, and which row each kept logit belongs to."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    keep: torch.Tensor  # [S] positions in the row whose logits are sampled
    layout: StepLayout
    lora: LoraStep  # which pool rows each token uses (empty: base model only)
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

    def __init__(
        self, model: PreTrainedModel, cache: PagedKVCache, lora: LoraLayers, placements: Mapping[str, Placement],
        attention_kernel: AttentionKernel | None = None,
    ):
        """`placements`: each loaded adapter's rows, read at every step (its owner updates it
        between steps); `attention_kernel`: the CPU bf16 kernel for decode rows and prompt chunks,
        or None (torch ops, SDPA)."""
        use_paged_attention(model)
        self.model = model
        self.cache = cache
        self.attention_kernel = attention_kernel
        self.lora = lora
        self.placements = placements
        self.device = next(model.parameters()).device

    def run(self, chunks: list[ScheduledChunk]) -> StepLogits:
        """Compute the chunks' KV; return the logits of the rows that sample (and prompt spans).

        Call under `torch.inference_mode()`."""
        step = self.pack(chunks)
        self.cache.layout = step.layout
        self.lora.context.step = step.lora
        try:
            out = self.model(
                input_ids=step.input_ids, position_ids=step.position_ids, past_key_values=self.cache,
                use_cache=False, logits_to_keep=step.keep, kv_layout=step.layout,
            )
        finally:
            self.cache.layout = None
            self.lora.context.step = LoraStep()
        logits, sampled = out.logits[0], len(step.sampled_rows)
        return StepLogits(step.sampled_rows, logits[:sampled], step.prompt_spans, logits[sampled:])

    def ordered(self, chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
        """The chunks in `order_key` order (stable: base-model chunks keep theirs)."""
        tokens = Counter()
        for chunk in chunks:
            tokens[chunk.row.request.adapter] += chunk.length

        def key(chunk: ScheduledChunk) -> tuple[int, int, int]:
            adapter = chunk.row.request.adapter
            return order_key(None if adapter is None else self.placements[adapter], tokens[adapter])
        return sorted(chunks, key=key)

    def lora_step(self, chunks: list[ScheduledChunk], sequences: list[SequenceLayout]) -> LoraStep:
        """The plan of the chunks that use an adapter, laid out as `sequences` say."""
        runs = [
            (seq.q_start, seq.q_start + seq.q_len, self.placements[chunk.row.request.adapter])
            for chunk, seq in zip(chunks, sequences) if chunk.row.request.adapter is not None
        ]
        return LoraStep.build(runs, self.device, kernel=self.lora.kernel is not None) if runs else LoraStep()

    def pack(self, chunks: list[ScheduledChunk]) -> PackedStep:
        """Lay the chunks out in one row, in `order_key` order (see the module docstring)."""
        chunks = self.ordered(chunks)
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
        kernel_decodes, short, others = [], [], []
        for seq in sequences:
            if self.attention_kernel is not None and seq.q_len == 1:
                kernel_decodes.append(seq)
            elif seq.q_len == 1 and seq.context <= SHORT_CONTEXT:
                short.append(seq)
            elif self.attention_kernel is not None and seq.q_len >= KERNEL_MIN_QUERIES:
                others.append(seq.with_kernel_slots())
            else:
                others.append(seq.gathered(device) if should_gather(seq, device) else seq)
        layout = StepLayout(
            self.cache, torch.tensor(slots, device=device), len(ids),
            ShortDecodes.build(short, device) if short else None, others, self.attention_kernel,
            KernelDecodes.build(kernel_decodes) if kernel_decodes else None,
        )
        return PackedStep(
            input_ids=torch.tensor([ids], device=device),
            position_ids=torch.tensor([positions], device=device),
            keep=torch.tensor(keep + scoring, dtype=torch.long, device=device),
            layout=layout,
            lora=self.lora_step(chunks, sequences),
            sampled_rows=sampled,
            prompt_spans=spans,
        )
