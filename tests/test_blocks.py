"""Block manager: allocation, reference counts, prefix keys, adapter identity, eviction."""

from __future__ import annotations

import pytest

from dataclasses import dataclass, field

from engine.blocks import BlockManager, block_key, prefix_keys
from engine.kv_cache import BlockTable


@dataclass
class PlainSequence:
    """The part of a row the block manager keys (engine/blocks.py, KeyedSequence)."""

    tokens: list[int]
    adapter_identity: bytes = b""
    table: BlockTable = field(default_factory=BlockTable)
    num_computed: int = 0
    block_keys: list[bytes] = field(default_factory=list)

    def token_range(self, start: int, stop: int) -> list[int]:
        return self.tokens[start:stop]


def test_allocate_is_contiguous_and_bounded():
    blocks = BlockManager(num_blocks=10, block_size=4)
    first = blocks.allocate(4)
    assert first == [3, 4, 5, 6]  # the middle of the only gap: room to grow on both sides
    assert blocks.stats().held == 4 and blocks.available == 6
    assert blocks.allocate(7) is None  # more than is left: nothing taken
    assert blocks.stats().held == 4
    rest = blocks.allocate(6)
    assert sorted(rest) == [0, 1, 2, 7, 8, 9] and blocks.available == 0
    assert blocks.grow(first) is None


def test_grow_takes_the_next_block_when_nobody_holds_it():
    blocks = BlockManager(num_blocks=8, block_size=4)
    table = blocks.allocate(2)
    grown = blocks.grow(table)
    assert grown == table[-1] + 1
    neighbour = blocks.extend([grown], 1)
    blocks.register(neighbour[0], b"stale")
    blocks.release(neighbour)  # cached now, right after the table: taken for contiguity
    assert blocks.extend(table + [grown], 2) == [grown + 1, grown + 2]
    assert blocks.match([b"stale"]) == []


def test_release_frees_unkeyed_blocks_and_caches_keyed_ones():
    blocks = BlockManager(num_blocks=4, block_size=2)
    table = blocks.allocate(2)
    key = block_key(b"", b"", [1, 2])
    blocks.register(table[0], key)
    blocks.release(table)
    assert blocks.stats().cached == 1 and blocks.stats().free == 3
    assert blocks.match([key]) == [table[0]]
    with pytest.raises(ValueError):
        blocks.release([table[1]])  # released twice


def test_reference_counts_keep_shared_blocks_until_the_last_holder_leaves():
    blocks = BlockManager(num_blocks=4, block_size=2)
    table = blocks.allocate(1)
    key = block_key(b"", b"", [7, 8])
    blocks.register(table[0], key)
    blocks.hold(blocks.match([key]))  # a second sequence shares the block
    blocks.release(table)
    assert blocks.stats().held == 1  # still held by the second one
    assert blocks.allocate(4) is None
    blocks.release(table)
    assert blocks.stats().held == 0 and blocks.stats().cached == 1


def test_prefix_keys_chain_over_full_blocks_and_adapter_identity():
    tokens = [1, 2, 3, 4, 5, 6, 7]
    keys = prefix_keys(tokens, b"", block_size=3)
    assert len(keys) == 2  # the last, partial block has no key
    assert keys[1] == block_key(keys[0], b"", [4, 5, 6])
    assert prefix_keys([9, 2, 3, 4, 5, 6], b"", 3)[1] != keys[1]  # a different first block changes all later keys
    assert prefix_keys(tokens, b"pirate#1", 3) != keys  # another adapter never shares KV
    assert prefix_keys(tokens, b"pirate#1", 3) != prefix_keys(tokens, b"pirate#2", 3)  # nor a reload with new weights


def test_register_computed_keys_only_full_computed_blocks_once():
    blocks = BlockManager(num_blocks=8, block_size=2)
    seq = PlainSequence([1, 2, 3, 4, 5], adapter_identity=b"pirate#1")
    seq.table.extend(blocks.allocate(3))
    seq.num_computed = 3  # block 0 full, block 1 half computed
    blocks.register_computed(seq)
    assert seq.block_keys == blocks.keys([1, 2], b"pirate#1")
    seq.num_computed = 5  # block 1 full now; block 2 holds one token
    blocks.register_computed(seq)
    blocks.register_computed(seq)  # nothing new: no key twice
    assert seq.block_keys == prefix_keys([1, 2, 3, 4, 5], b"pirate#1", 2)
    table = seq.table.clear()
    blocks.release(table)
    assert blocks.match(blocks.keys([1, 2, 3, 4, 9], b"pirate#1")) == table[:2]  # the partial block has no key
    assert blocks.match(blocks.keys([1, 2, 3, 4], b"")) == []  # nor the base model the adapter's blocks


def test_match_stops_at_the_first_miss():
    blocks = BlockManager(num_blocks=6, block_size=2)
    keys = prefix_keys([1, 2, 3, 4, 5, 6], b"", 2)
    table = blocks.allocate(3)
    blocks.register(table[0], keys[0])
    blocks.register(table[2], keys[2])  # keyed, but its parent block is not
    assert blocks.match(keys) == [table[0]]


def test_lru_eviction_frees_the_least_recently_released_first():
    blocks = BlockManager(num_blocks=3, block_size=1)
    old, new = blocks.allocate(1), blocks.allocate(1)
    blocks.register(old[0], b"old")
    blocks.register(new[0], b"new")
    blocks.release(old)
    blocks.release(new)
    taken = blocks.allocate(2)
    assert old[0] in taken and blocks.match([b"old"]) == [] and blocks.match([b"new"]) == new


def test_first_copy_of_a_key_wins_and_duplicates_become_free():
    blocks = BlockManager(num_blocks=4, block_size=1)
    a, b = blocks.allocate(1), blocks.allocate(1)
    blocks.register(a[0], b"k")
    blocks.register(b[0], b"k")
    blocks.release(a + b)
    assert blocks.match([b"k"]) == a and blocks.stats().free == 3


def test_prefix_caching_switch_off_caches_nothing():
    blocks = BlockManager(num_blocks=2, block_size=1, enable_prefix_caching=False)
    table = blocks.allocate(1)
    blocks.register(table[0], b"k")
    blocks.release(table)
    assert blocks.match([b"k"]) == [] and blocks.stats().free == 2


def test_block_table_runs_and_slots():
    table = BlockTable()
    table.extend([4, 5, 9, 10, 11])
    assert table.runs == [[4, 2], [9, 3]]
    assert table.slot_runs(length=9, block_size=2) == [(8, 4), (18, 5)]
    assert table.slot_runs(length=3, block_size=2) == [(8, 3)]
    assert table.slots(3, 6, block_size=2) == [11, 18, 19]
    assert table.clear() == [4, 5, 9, 10, 11] and table.runs == []
