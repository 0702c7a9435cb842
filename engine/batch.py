"""The running batch's tensors: a left-padded KV cache and its attention mask.

Rows join (`extend`) and leave (`select`) between decode steps. The batch stays left-padded:
to join, both sides are left-padded to the same length and concatenated on the batch axis;
to retire, the kept rows are indexed and leading columns that are padding in every row are
dropped. Positions follow the mask (`cumsum(mask) - 1`), so padding never shifts a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """Token ids and mask [n, longest], left-padded."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, longest - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, longest - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def prefill_inputs(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict:
    """Model inputs for prefilling prompts of different lengths together, with a fresh cache."""
    ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions,
        "past_key_values": DynamicCache(),
        "use_cache": True,
        # An index tensor, not the int 1: indexing gives lm_head a contiguous [rows, 1, hidden]
        # input. The int slices a strided view, which with PEFT's wrapped layers sends lm_head
        # down a batched matmul that copies its weight once per row (~1 s here).
        "logits_to_keep": torch.tensor([ids.shape[1] - 1], device=device),
    }


@dataclass
class KVBatch:
    """KV cache [rows, heads, length, dim] per layer plus the mask [rows, length] it matches."""

    cache: DynamicCache
    mask: torch.Tensor

    @classmethod
    def from_prefill(cls, inputs: dict) -> KVBatch:
        cache = inputs["past_key_values"]
        if any(not isinstance(layer, DynamicLayer) or layer.is_sliding for layer in cache.layers):
            raise NotImplementedError("only full-attention KV caches can be joined and filtered")
        return cls(cache=cache, mask=inputs["attention_mask"])

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def decode_inputs(self, next_ids: Sequence[int]) -> dict:
        """Inputs for one decode step; the mask grows by one column for the new tokens."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return {
            "input_ids": torch.tensor(next_ids, device=self.mask.device).unsqueeze(-1),
            "attention_mask": self.mask,
            "position_ids": self.mask.sum(-1, keepdim=True) - 1,
            "past_key_values": self.cache,
            "use_cache": True,
        }

    def select(self, keep: Sequence[int]) -> None:
        """Keep only rows `keep` (in that order) and trim columns that are padding in all rows."""
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def extend(self, other: KVBatch) -> None:
        """Append the rows of `other` after this batch's rows."""
        length = max(self.length, other.length)
        self.mask = torch.cat([_pad_left(self.mask, length), _pad_left(other.mask, length)])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, length, 2), _pad_left(theirs.keys, length, 2)])
            mine.values = torch.cat(
                [_pad_left(mine.values, length, 2), _pad_left(theirs.values, length, 2)]
            )

    def kv_tokens(self) -> int:
        """Token slots the cache holds now (rows x padded length)."""
        return self.rows * self.length


def _pad_left(tensor: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """Zero-pad `tensor` on the left of `dim` up to `length`."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)
