"""Which KV-cache blocks are free, who holds them, and which prefix each cached block stores.

The KV cache (engine/kv_cache.py) is `num_blocks` blocks of `block_size` token slots; slot
`block * block_size + i` holds token i of that block. A sequence's block table lists its
blocks in token order. Every block is in exactly one state:

- **free**: holds nothing anyone may want; in `_free`.
- **held**: `refcount > 0`; one or more block tables contain it.
- **cached**: `refcount == 0` but it holds a full block of a known prefix (its key). It is
  reused by a prefix hit, or evicted when free blocks run out: least recently released
  first (`_lru`).

A full block's key chains everything that determines its KV:
`blake2b(parent key | adapter identity | its token ids)`, the adapter identity being its name
plus a hash of its weights (engine/lora.py), so an adapter reloaded under the same name with
other weights never meets stale KV. All prefix keying is here: `keys` computes a token
sequence's keys, `match` finds the cached blocks of the longest keyed prefix, and
`register_computed` keys the full blocks a sequence has computed, as it computes them (the
scheduler calls the first two when it admits a row, the step's postprocessing the last).

Attention reads each contiguous run of a table's blocks in place (one attention call per
run), so `allocate` keeps tables contiguous where it can: a new sequence starts in the
middle of the largest free gap (leaving room to grow to the previous sequence and to itself),
and `grow` takes the block right after the table's last one when nobody holds it.

Thread: owned by the engine core (its worker thread); no locks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from engine.kv_cache import BlockTable

ROOT_KEY = b""


def block_key(parent: bytes, adapter: bytes, tokens: Sequence[int]) -> bytes:
    """The prefix key of a full block: its tokens, its adapter and every block before it."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(len(adapter).to_bytes(4, "little"))
    digest.update(adapter)
    digest.update(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens))
    return digest.digest()


def prefix_keys(tokens: Sequence[int], adapter: bytes, block_size: int, parent: bytes = ROOT_KEY) -> list[bytes]:
    """Keys of every full block of `tokens`, in order."""
    keys = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_key(parent, adapter, tokens[start : start + block_size])
        keys.append(parent)
    return keys


class KeyedSequence(Protocol):
    """What `register_computed` reads of a sequence (engine/row.py's Row): its adapter identity,
    its block table, how many of its tokens have their KV computed, its tokens, and the keys of
    its full computed blocks so far (which it extends)."""

    adapter_identity: bytes
    table: BlockTable
    num_computed: int
    block_keys: list[bytes]

    def token_range(self, start: int, stop: int) -> Sequence[int]: ...


@dataclass
class BlockStats:
    total: int
    held: int
    cached: int
    free: int


class BlockManager:
    """Allocation, reference counts, prefix keys and LRU eviction of KV-cache blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refcount = [0] * num_blocks
        self._key_of: list[bytes | None] = [None] * num_blocks
        self._block_of: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._free: set[int] = set(range(num_blocks))

    # ----- queries --------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Blocks a sequence could get now: free ones plus cached ones that may be evicted."""
        return len(self._free) + len(self._lru)

    def stats(self) -> BlockStats:
        cached = len(self._lru)
        free = len(self._free)
        return BlockStats(self.num_blocks, self.num_blocks - cached - free, cached, free)

    def keys(self, tokens: Sequence[int], adapter: bytes) -> list[bytes]:
        """Keys of every full block of `tokens` under `adapter` (an adapter identity), in order."""
        return prefix_keys(tokens, adapter, self.block_size)

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """Blocks holding the longest run of `keys` from the start (not yet held by the caller)."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    # ----- holding and releasing ------------------------------------------------------------

    def hold(self, blocks: Sequence[int]) -> None:
        """Take a reference on each block (cached blocks stop being evictable)."""
        for block in blocks:
            if self._refcount[block] == 0:
                if block in self._free:
                    raise ValueError(f"block {block} is free: it holds no cached prefix")
                del self._lru[block]
            self._refcount[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference per block; unreferenced blocks become cached (keyed) or free.

        Released in reverse, so a table's last blocks are evicted before its first ones
        (a shared prefix outlives the tails that extend it)."""
        for block in reversed(blocks):
            if self._refcount[block] <= 0:
                raise ValueError(f"block {block} is released more often than held")
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                if self._key_of[block] is not None:
                    self._lru[block] = None
                else:
                    self._free.add(block)

    def register(self, block: int, key: bytes) -> None:
        """Record that held `block` now stores the full block `key` (first copy wins)."""
        if self._refcount[block] <= 0:
            raise ValueError(f"block {block} is not held")
        if not self.enable_prefix_caching or key in self._block_of or self._key_of[block] is not None:
            return
        self._key_of[block] = key
        self._block_of[key] = block

    def register_computed(self, seq: KeyedSequence) -> None:
        """Key each full block of `seq` whose tokens are all computed and that has no key yet,
        chained to the block before it; record it (`register`) and append its key to
        `seq.block_keys`."""
        size = self.block_size
        for index in range(len(seq.block_keys), seq.num_computed // size):
            parent = seq.block_keys[-1] if seq.block_keys else ROOT_KEY
            key = block_key(parent, seq.adapter_identity, seq.token_range(index * size, (index + 1) * size))
            self.register(seq.table.blocks[index], key)
            seq.block_keys.append(key)

    # ----- allocation -----------------------------------------------------------------------

    def allocate(self, count: int) -> list[int] | None:
        """`count` new held blocks, contiguous where possible; None if fewer are available."""
        if count == 0:
            return []
        if count > self.available:
            return None
        self._evict_until(count)
        blocks: list[int] = []
        while len(blocks) < count:
            start, length = self._largest_free_gap()
            need = count - len(blocks)
            if length > need:
                start += (length - need) // 2
            blocks.extend(range(start, start + min(length, need)))
            self._take(blocks[-min(length, need) :])
        return blocks

    def extend(self, table: Sequence[int], count: int) -> list[int] | None:
        """`count` new held blocks to append to `table`: the ones right after it in memory
        while nobody holds them, the rest from `allocate`; None if fewer are available."""
        if count > self.available:
            return None
        blocks: list[int] = []
        after = table[-1] + 1 if table else None
        while after is not None and len(blocks) < count and after < self.num_blocks and self._refcount[after] == 0:
            if after in self._lru:
                self._evict(after)
            self._take([after])
            blocks.append(after)
            after += 1
        rest = self.allocate(count - len(blocks))
        if rest is None:  # cannot happen after the check above; keep the books straight anyway
            self.release(blocks)
            return None
        return blocks + rest

    def grow(self, table: Sequence[int]) -> int | None:
        """One more held block for `table` (see `extend`), or None when none is available."""
        blocks = self.extend(table, 1)
        return blocks[0] if blocks else None

    def _take(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self._free.remove(block)
            self._refcount[block] = 1

    def _evict_until(self, count: int) -> None:
        """Evict least recently used cached blocks until `count` blocks are free."""
        while len(self._free) < count:
            self._evict(next(iter(self._lru)))

    def _evict(self, block: int) -> None:
        del self._lru[block]
        key = self._key_of[block]
        self._key_of[block] = None
        if key is not None:
            del self._block_of[key]
        self._free.add(block)

    def _largest_free_gap(self) -> tuple[int, int]:
        """(first block, length) of the longest run of free blocks; the first one on ties."""
        best_start, best_length, start = 0, 0, None
        for block in range(self.num_blocks + 1):
            if block < self.num_blocks and block in self._free:
                start = block if start is None else start
                continue
            if start is not None and block - start > best_length:
                best_start, best_length = start, block - start
            start = None
        return best_start, best_length
