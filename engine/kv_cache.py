"""The KV cache the engine owns: tensors written in place, block tables, step layouts.

Memory: per layer, keys and values of shape [kv_heads, num_slots, head_dim], allocated once
(`num_slots = num_blocks * block_size`). A sequence's token at position p lives in slot
`table.blocks[p // block_size] * block_size + p % block_size`. Nothing is ever concatenated,
padded or copied when sequences join or leave.

One forward pass of the engine runs every scheduled token of every sequence as one packed
row `[1, T]` (decode tokens and prompt chunks alike). `StepLayout` describes it: where each
sequence's queries sit in the row, which slots the new tokens are written to, and the
contiguous slot runs that hold each sequence's context. It reaches the model's attention
layers through transformers' own extension points:

- `PagedKVCache.update` is the cache object the model calls with each layer's new keys and
  values (`past_key_values.update`): it writes them into their slots, in place;
- the attention function (engine/attention.py), registered in transformers'
  `AttentionInterface`, gets `kv_layout` among the forward's keyword arguments and reads each
  sequence's context where it lies.

Thread: tensors are written and read only on the engine's worker thread, inside a forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PretrainedConfig

if TYPE_CHECKING:
    from engine.attention_kernel import AttentionKernel
    from engine.config import EngineConfig


@dataclass
class BlockTable:
    """A sequence's blocks in token order, and the contiguous runs they form."""

    blocks: list[int] = field(default_factory=list)
    runs: list[list[int]] = field(default_factory=list)  # [first block, number of blocks]

    def append(self, block: int) -> None:
        if self.runs and self.runs[-1][0] + self.runs[-1][1] == block:
            self.runs[-1][1] += 1
        else:
            self.runs.append([block, 1])
        self.blocks.append(block)

    def extend(self, blocks: list[int]) -> None:
        for block in blocks:
            self.append(block)

    def clear(self) -> list[int]:
        """Forget every block; returns them (for the block manager to release)."""
        blocks, self.blocks, self.runs = self.blocks, [], []
        return blocks

    def slots(self, start: int, stop: int, block_size: int) -> list[int]:
        """Slot of every token position in [start, stop)."""
        return [self.blocks[p // block_size] * block_size + p % block_size for p in range(start, stop)]

    def slot_runs(self, length: int, block_size: int) -> list[tuple[int, int]]:
        """(first slot, tokens) of each contiguous run holding positions [0, length)."""
        runs, left = [], length
        for first, count in self.runs:
            if left <= 0:
                break
            tokens = min(count * block_size, left)
            runs.append((first * block_size, tokens))
            left -= tokens
        return runs


@dataclass
class SequenceLayout:
    """One sequence's share of a packed forward: queries [q_start, q_start + q_len) of the row
    are positions [context - q_len, context) of the sequence, whose KV is in `runs`."""

    q_start: int
    q_len: int
    runs: list[tuple[int, int]]
    gather: torch.Tensor | None = None  # [context] slots in order: attention copies the context out first
    kernel_slots: torch.Tensor | None = None  # [context] int32 slots in order: the attention kernel reads them

    @property
    def context(self) -> int:
        return sum(length for _, length in self.runs)

    def context_slots(self) -> torch.Tensor:
        """The slot of every context position, in order (on the CPU)."""
        return torch.cat([torch.arange(first, first + length) for first, length in self.runs])

    def gathered(self, device: torch.device) -> SequenceLayout:
        """This layout with `gather` set."""
        return SequenceLayout(self.q_start, self.q_len, self.runs, self.context_slots().to(device))

    def with_kernel_slots(self) -> SequenceLayout:
        """This layout with `kernel_slots` set (the kernel runs on the CPU)."""
        return SequenceLayout(self.q_start, self.q_len, self.runs, kernel_slots=self.context_slots().int())


@dataclass
class ShortDecodes:
    """Decode tokens of sequences with short contexts, attended together: their context slots
    padded to the longest ([rows, longest]; padding points at slot 0 and is masked by -inf
    in `bias`), and where their queries sit in the packed row."""

    positions: torch.Tensor  # [rows] query index in the packed row
    slots: torch.Tensor  # [rows, longest]
    bias: torch.Tensor  # [rows, longest] float32: 0 for context, -inf for padding

    @classmethod
    def build(cls, sequences: list[SequenceLayout], device: torch.device) -> ShortDecodes:
        longest = max(seq.context for seq in sequences)
        slots = torch.zeros(len(sequences), longest, dtype=torch.long)
        bias = torch.full((len(sequences), longest), float("-inf"))
        for row, seq in enumerate(sequences):
            slots[row, : seq.context] = torch.cat([torch.arange(first, first + n) for first, n in seq.runs])
            bias[row, : seq.context] = 0.0
        positions = torch.tensor([seq.q_start for seq in sequences])
        return cls(positions.to(device), slots.to(device), bias.to(device))


@dataclass
class KernelDecodes:
    """Decode tokens the CPU attention kernel attends in one call per layer (any context
    length): where their queries sit in the packed row, and their contexts' slots end to end
    (row r's are `slots[offsets[r]:offsets[r + 1]]`)."""

    positions: torch.Tensor  # [rows] query index in the packed row, increasing
    slots: torch.Tensor  # [N] int32
    offsets: torch.Tensor  # [rows + 1] int32

    @classmethod
    def build(cls, sequences: list[SequenceLayout]) -> KernelDecodes:
        """The layout of `sequences` (decode rows, in packed order). Every run of every row is
        expanded in a few numpy ops: an arange per run costs about 1 ms a step at 32 rows."""
        runs = np.array([run for seq in sequences for run in seq.runs], dtype=np.int64)  # (first slot, tokens)
        ends = runs[:, 1].cumsum()
        slots = np.arange(ends[-1]) + np.repeat(runs[:, 0] - (ends - runs[:, 1]), runs[:, 1])
        contexts = np.cumsum([0] + [seq.context for seq in sequences])
        positions = torch.tensor([seq.q_start for seq in sequences])
        return cls(positions, torch.from_numpy(slots.astype(np.int32)), torch.from_numpy(contexts.astype(np.int32)))

    @property
    def rows(self) -> int:
        return self.positions.shape[0]


@dataclass
class StepLayout:
    """Everything attention needs about one packed forward: the decodes attended together
    (by the CPU kernel, or short ones by torch ops), and every other sequence (prompt chunks,
    long contexts without the kernel) on its own."""

    cache: PagedKVCache
    write_slots: torch.Tensor  # [T] slot of each new token
    tokens: int  # T
    short_decodes: ShortDecodes | None
    sequences: list[SequenceLayout]
    attention_kernel: AttentionKernel | None = None  # attends kernel_decodes and the sequences with kernel_slots
    kernel_decodes: KernelDecodes | None = None


class PagedKVCache:
    """Keys and values of every layer, written in place by slot (see the module docstring)."""

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_layers, 2, kv_heads, num_blocks * block_size, head_dim)
        self._kv = torch.zeros(shape, dtype=dtype, device=device)
        self.layout: StepLayout | None = None

    @staticmethod
    def bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
        kv_heads, head_dim = attention_shape(config)
        return config.num_hidden_layers * 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @classmethod
    def for_model(
        cls, config: PretrainedConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
        device: torch.device,
    ) -> PagedKVCache:
        kv_heads, head_dim = attention_shape(config)
        return cls(config.num_hidden_layers, num_blocks, block_size, kv_heads, head_dim, dtype, device)

    @classmethod
    def for_engine(
        cls, model: PretrainedConfig, dtype: torch.dtype, device: torch.device, config: EngineConfig
    ) -> PagedKVCache:
        """The engine's cache for `model`, in blocks of `config.kv_block_size` tokens: on CUDA with
        `kv_cache_memory_fraction` set, that share of the device's free memory; else
        `max_kv_tokens` worth (rounded up to whole blocks). At least one block."""
        size = config.kv_block_size
        fraction = config.kv_cache_memory_fraction
        if device.type == "cuda" and fraction is not None:
            free, _total = torch.cuda.mem_get_info(device)
            num_blocks = max(1, int(free * fraction) // (cls.bytes_per_token(model, dtype) * size))
        else:
            num_blocks = max(1, -(-config.max_kv_tokens // size))
        return cls.for_model(model, num_blocks, size, dtype, device)

    @property
    def nbytes(self) -> int:
        return self._kv.numel() * self._kv.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer: [kv_heads, num_slots, head_dim] each."""
        return self._kv[index, 0], self._kv[index, 1]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_args):
        """Write the step's new keys/values ([1, kv_heads, T, head_dim]) into their slots.

        The model calls this on `past_key_values`; the return value is what it hands to the
        attention function, which reads the cache instead."""
        keys, values = self.layer(layer_idx)
        slots = self.layout.write_slots
        keys.index_copy_(1, slots, key_states[0])
        values.index_copy_(1, slots, value_states[0])
        return key_states, value_states


def attention_shape(config: PretrainedConfig) -> tuple[int, int]:
    """(kv heads, head dim) of a decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim
