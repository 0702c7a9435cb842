"""KV batch bookkeeping: padding, joining and retiring rows."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from engine.batch import KVBatch, left_pad, prefill_inputs


def fake_batch(lengths: list[int], heads: int = 2, dim: int = 3, layers: int = 2) -> KVBatch:
    """A batch whose cache values tag each real position with its row number + 1."""
    _, mask = left_pad([[1] * n for n in lengths], 0, torch.device("cpu"))
    cache = DynamicCache()
    tags = (mask * (torch.arange(len(lengths)) + 1).unsqueeze(1)).float()
    kv = tags[:, None, :, None].expand(len(lengths), heads, mask.shape[1], dim).contiguous()
    for layer in range(layers):
        cache.update(kv.clone(), kv.clone(), layer)
    return KVBatch(cache=cache, mask=mask)


def test_left_pad_and_prefill_positions():
    inputs = prefill_inputs([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert inputs["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_extend_left_pads_the_shorter_side():
    batch = fake_batch([2, 1])
    batch.extend(fake_batch([4]))
    assert batch.mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]
    keys = batch.cache.layers[1].keys[:, 0, :, 0]
    assert keys.tolist() == [[0, 0, 1, 1], [0, 0, 0, 2], [1, 1, 1, 1]]


def test_select_keeps_rows_and_trims_shared_padding():
    batch = fake_batch([5, 2, 3])
    batch.select([2, 1])
    assert batch.mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch.cache.layers[0].values[:, 0, :, 0].tolist() == [[3, 3, 3], [0, 2, 2]]
    assert batch.kv_tokens() == 6


def test_decode_inputs_grow_the_mask_and_follow_positions():
    batch = fake_batch([3, 1])
    inputs = batch.decode_inputs([9, 8])
    assert inputs["input_ids"].tolist() == [[9], [8]]
    assert batch.mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert inputs["position_ids"].tolist() == [[3], [1]]
