"""Which tokens the next forward pass computes: admission, chunked prefill, preemption.

State: `waiting` (a deque in arrival order; preempted rows go back to its front) and
`running` (every row that holds KV blocks, in admission order). Each step has a token budget
(`max_step_tokens`), spent in this order:

1. every decoding row gets its one token, so no stream stalls behind a long prompt. A row
   whose next token starts a new block takes one; when none is left, the newest running row
   gives its blocks back and waits to be recomputed (preemption), never an out-of-memory;
2. rows still prefilling get the next chunk of their prompt, oldest first;
3. waiting rows are admitted, in admission order (below), while rows, budget and blocks
   last; the first row that does not get its blocks ends admission for the step (no row
   jumps ahead of it for memory). A newcomer reuses the
   blocks of its longest cached prefix (same tokens, same adapter), takes blocks for the rest
   of its tokens at once (so its prefill never stalls for memory halfway), and gets its
   first chunk. A long prompt is thus prefilled over several steps while streams go on.
   A row is admitted only in the step that schedules its first chunk, so it looks its prefix
   up then: requests that arrive together with a long common prefix (a shared system prompt
   or document) compute it once, in the first one's chunks, and the others find it cached.
   The other choices of a request with n > 1 (forks, engine/row.py) wait behind its first
   row until that has computed the prompt, then hold its prompt's blocks and compute only
   the last partial block themselves: one prefill for n choices. A row that needs prompt
   logprobs skips the prefix cache (engine/logprobs.py).

In 2 and 3 only the step's first prompt is split to fit the budget: a later prompt whose
rest does not fit waits for the next step, and so does every prompt behind it. A prompt's
first token comes when its last chunk is computed, so filling the budget's end with a piece
of the next prompt would delay every prompt that finishes in this step and still leave that
one a step to go (a worked example: bench/README.md, Design notes).

A chunk that reaches the end of a row's known tokens asks for a sample.

Admission order (`admission_order()`): preempted rows first, as they stand at the queue's
front; then, with fair share on (`fair_share`, engine/fairness.py), the others by least
service received per client (adapter, tenant): FIFO within a client, a flood on one adapter
or API key cannot starve the others. Every scheduled chunk is charged to its row's client.
With fair share off the order is the queue's: first come, first served.

Admission gate (`can_admit`): a waiting row for which `can_admit(row)` is False (say, its
adapter is not on the device yet) is skipped this step: the rows behind it are tried as if
it were not there, and it keeps its place in the queue and its client's counter. Whoever
brings adapters in reads `admission_order()` before a step to know which rows come first;
that list ignores the gate and the limits of rows and blocks. Read it on the core's thread,
between steps: rows given to `EngineCore.add` join the waiting queue at a step's start.

Thread: the engine core's worker thread; plain Python, no tensors.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from engine.blocks import BlockManager
from engine.fairness import FairShare
from engine.row import Row


@dataclass
class ScheduledChunk:
    """Compute tokens [start, start + length) of `row`; sample after them when `sample`."""

    row: Row
    start: int
    length: int

    @property
    def sample(self) -> bool:
        return self.start + self.length == self.row.num_tokens


@dataclass
class Prefix:
    """Where a waiting row would start: its prefix keys, the cached blocks it can reuse, and
    (a fork) the running parent whose prompt blocks those are."""

    keys: list[bytes]
    cached: list[int]
    parent: Row | None = None


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0
    preemptions: int = 0


class Scheduler:
    """Waiting and running rows, and the plan of each step (see the module docstring)."""

    def __init__(self, blocks: BlockManager, max_rows: int, max_step_tokens: int, fair_share: bool = True,
                 can_admit: Callable[[Row], bool] | None = None):
        """`fair_share`: admit by least service per client (else first come, first served);
        `can_admit`: the admission gate (None: every row may be admitted)."""
        if max_step_tokens < max_rows:
            raise ValueError("max_step_tokens must be at least max_batch_size (one token per row)")
        self.blocks = blocks
        self.max_rows = max_rows
        self.max_step_tokens = max_step_tokens
        self.can_admit = can_admit
        self.fair = FairShare() if fair_share else None
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []
        self.stats = PrefixCacheStats()

    def schedule(self) -> list[ScheduledChunk]:
        """The chunks of the next step; empty when there is nothing to compute."""
        if self.fair:
            self.fair.sync(self.waiting)
        chunks = self._decode_chunks()
        chunks += self._prompt_chunks(self.max_step_tokens - len(chunks))
        if self.fair:
            for chunk in chunks:
                self.fair.charge(chunk.row, chunk.start, chunk.length, chunk.sample)
        return chunks

    def _prompt_chunks(self, budget: int) -> list[ScheduledChunk]:
        """Prompt chunks within `budget` tokens: rows still prefilling, oldest first, then waiting
        rows admitted in admission order. Only the first chunk is split to fit; a waiting row is
        admitted only when its chunk is scheduled, so its cached prefix is looked up when its
        prefill starts (a prefix computed by a step it waited through counts)."""
        chunks: list[ScheduledChunk] = []

        def take(row: Row, remaining: int) -> bool:
            nonlocal budget
            if budget <= 0 or (remaining > budget and chunks):
                return False
            chunks.append(ScheduledChunk(row, row.num_computed, min(remaining, budget)))
            budget -= chunks[-1].length
            return True

        for row in [row for row in self.running if not row.decoding]:
            if not take(row, row.num_tokens - row.num_computed):
                return chunks
        for row in self._order():
            if len(self.running) >= self.max_rows or budget <= 0:
                break
            if self.can_admit is not None and not self.can_admit(row):
                continue
            prefix = self._prefix(row)
            if prefix is None or (row.num_tokens - len(prefix.cached) * self.blocks.block_size > budget and chunks):
                break
            if not self._admit(row, prefix):
                break
            self.waiting.remove(row)
            if self.fair:
                self.fair.started(row)
            take(row, row.num_tokens - row.num_computed)
        return chunks

    def admission_order(self) -> list[Row]:
        """The waiting rows in the order `schedule()` would try to admit them now (see the
        module docstring); the gate and the limits of rows and blocks are not applied."""
        if self.fair:
            self.fair.sync(self.waiting)
        return list(self._order())

    def _order(self) -> Iterator[Row]:
        if self.fair is None:
            return iter(list(self.waiting))
        return self.fair.order(self.waiting)

    def remove(self, row: Row) -> None:
        """Take a finished or cancelled row out, giving its blocks back (they stay cached)."""
        if row in self.running:
            self.running.remove(row)
        elif row in self.waiting:
            self.waiting.remove(row)
        if self.fair:
            self.fair.removed(row)
        self.blocks.release(row.table.clear())

    # ----- decode ------------------------------------------------------------------------

    def _decode_chunks(self) -> list[ScheduledChunk]:
        chunks = []
        for row in list(self.running):  # oldest first: preemption only takes rows not yet visited
            if row in self.running and row.decoding and self._reserve_next_slot(row):
                chunks.append(ScheduledChunk(row, row.num_computed, 1))
        return chunks

    def _reserve_next_slot(self, row: Row) -> bool:
        """Make sure `row` has a block for its next token, preempting the newest rows if need
        be; False when `row` itself had to give way."""
        while row.num_computed // self.blocks.block_size >= len(row.table.blocks):
            block = self.blocks.grow(row.table.blocks)
            if block is not None:
                row.table.append(block)
                continue
            victim = self.running[-1]
            self._preempt(victim)
            if victim is row:
                return False
        return True

    def _preempt(self, row: Row) -> None:
        """Free a running row's blocks; it waits at the front and is recomputed later (its
        full blocks stay cached, so a quick return costs little)."""
        self.running.remove(row)
        self.blocks.release(row.table.clear())
        row.num_computed = 0
        row.block_keys.clear()
        self.waiting.appendleft(row)
        if self.fair:
            self.fair.preempted(row)
        self.stats.preemptions += 1

    # ----- prefill -----------------------------------------------------------------------

    def _prefix(self, row: Row) -> Prefix | None:
        """The prefix keys of `row`'s tokens and the cached blocks it can start from (a fork:
        its parent's prompt blocks); None while a fork's parent has not computed the prompt."""
        tokens = row.tokens
        parent = self._running_parent(row)
        if parent is not None:  # a fork: shares the prompt blocks its parent computed
            if parent.num_computed < len(parent.request.prompt_ids):
                return None
            keys = parent.block_keys[: (len(tokens) - 1) // self.blocks.block_size]
            return Prefix(keys, parent.table.blocks[: len(keys)], parent)
        keys = self.blocks.keys(tokens[: len(tokens) - 1], row.adapter_identity)  # >= 1 token to compute
        return Prefix(keys, [] if row.scoring_prompt else self.blocks.match(keys))  # cached tokens have no logits

    def _admit(self, row: Row, prefix: Prefix) -> bool:
        """Give `row` its prefix's cached blocks and blocks for the rest of its tokens; False
        (and no change) when the blocks are not there, keeping one spare block per running row."""
        size = self.blocks.block_size
        tokens = row.tokens
        keys, cached = prefix.keys, prefix.cached
        if prefix.parent is not None:  # a fork shares its parent's prompt logprobs with its blocks
            row.prompt_logprobs = prefix.parent.prompt_logprobs
        self.blocks.hold(cached)
        needed = -(-len(tokens) // size) - len(cached)
        fresh = None
        if needed <= self.blocks.available - len(self.running):
            fresh = self.blocks.extend(cached, needed)
        if fresh is None:
            self.blocks.release(cached)
            return False
        row.table.extend(cached + fresh)
        row.block_keys = keys[: len(cached)]
        row.num_computed = len(cached) * size
        self.stats.queried_tokens += len(tokens)
        self.stats.hit_tokens += row.num_computed
        if row.admitted_at is None:
            row.admitted_at = time.monotonic()
            row.cached_prompt_tokens = min(row.num_computed, len(row.request.prompt_ids))
        self.running.append(row)
        return True

    def _running_parent(self, row: Row) -> Row | None:
        """The running row whose prompt blocks a fork (choice > 0 of a request) can share."""
        parent = row.parent
        if parent is None or row.sampler.output_ids or parent not in self.running:
            return None
        return parent
