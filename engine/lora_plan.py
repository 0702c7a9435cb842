"""Which pool rows each token of a packed forward uses: the LoRA plan of one step.

Every LoRA layer (engine/lora.py) keeps its adapters' weights in a row pool; an adapter of
rank r holds r contiguous rows, the same rows in every layer (`Placement`). The runner
(engine/runner.py) orders the step's chunks by `order_key` and builds one `LoraStep`, which
every layer then reads:

    base-model tokens | long runs (one adapter each) | gathered tokens, rank class 8 | class 16 | ...

- A **segment** is a run of at least `LONG_RUN` tokens of one adapter (a prefill chunk, or a
  decode batch where many rows share an adapter): two matmuls on views of its rows.
- The other tokens are **gathered** by rank class: all tokens of one class are one batched
  computation, whatever the number of adapters among them. The class of rank r is
  max(8, the next power of two >= r): a rank-12 adapter computes 16 rows, the last 4 pointing
  at row 0, which is all zeros. Classes keep one rank-64 adapter in the batch from making
  every rank-8 token compute 64 rows, while bounding the padding of a token to less than 2x;
  the pool itself holds exactly r rows (no padding in memory).

A gathered class is cut into **pieces** of `length` tokens of one adapter each (an adapter's
tokens, split; the last piece padded by repeating a token whose result is then dropped).
The shrink is one `bmm` of the pieces' tokens [pieces, length, in] with their adapters' A
rows gathered once per piece [pieces, width, in] (a view instead when the pieces' rows lie
end to end in the pool: adapters of the class's rank placed side by side, no piece padded);
the expand is one `embedding_bag` over the B rows of every token, weighted by its shrink
(each B row read in place, nothing gathered).
So the number of ops per layer depends on the number of rank classes present, not on the
number of adapters. `length` is the mean number of tokens per adapter rounded up to a power
of two: decode steps have pieces of single tokens, prefill chunks pieces of whole chunks.

With the CPU kernel (`build(..., kernel=True)`; engine/lora_kernel.py) there are no classes
or pieces: a span of one adapter is a segment when its tokens x rank reach `KERNEL_WORK`
(there a matmul beats the kernel, whose cost grows with tokens x rank); every other token
using an adapter is a **kernel token**. `KernelTokens` holds, for the range from the first
kernel token to the last, each token's first pool row and rank as int32 tensors (rank 0 for
the base-model and segment tokens in between), built once per step; every layer passes them
to one kernel call, which computes each token at its adapter's own rank and blocks an
adapter's consecutive tokens (the order above keeps them together).

Thread: built and read on the engine's worker thread, one plan per forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby

import torch

LONG_RUN = 32  # tokens of one adapter in a step from which it is computed as its own segment
# With the CPU kernel: a span of one adapter is a segment (matmuls) from this many tokens x
# rank, else kernel tokens (the kernel's cost grows with tokens x rank, a matmul's far less;
# bench/README.md has where they cross).
KERNEL_WORK = 5632
MIN_CLASS = 8  # the smallest rank class: rows computed per gathered token at least


def rank_class(rank: int) -> int:
    """Rows a gathered token of a rank-`rank` adapter computes: max(8, next power of two)."""
    return max(MIN_CLASS, 1 << (rank - 1).bit_length())


@dataclass(frozen=True)
class Placement:
    """Where an adapter lives in the row pool: rows [start, start + rank) of every LoRA layer."""

    start: int
    rank: int
    rank_class: int


def order_key(placement: Placement | None, adapter_tokens: int) -> tuple[int, int, int]:
    """Sort key of a chunk in the packed row: base model first, then long runs, then gathered
    tokens by rank class; an adapter's chunks together (`adapter_tokens`: its tokens this step)."""
    if placement is None:
        return (0, 0, 0)
    if adapter_tokens >= LONG_RUN:
        return (1, 0, placement.start)
    return (2, placement.rank_class, placement.start)


@dataclass(frozen=True)
class LoraSegment:
    """Tokens [start, stop) of one adapter, whose rows are [first_row, first_row + rank)."""

    start: int
    stop: int
    first_row: int
    rank: int


@dataclass(frozen=True)
class LoraGather:
    """Tokens [start, stop) of one rank class (`width` rows each), as `pieces` x `length`."""

    start: int
    stop: int
    width: int
    pieces: int
    length: int
    rows: torch.Tensor | None  # [pieces * width] pool rows of each piece's adapter, then row 0; None: first_row on
    first_row: int  # with `rows` None, the pieces' rows are [first_row, first_row + pieces * width): a view
    token_rows: torch.Tensor  # [(stop - start) * width] pool rows of each token, likewise
    offsets: torch.Tensor  # [stop - start] where each token's rows begin in `token_rows` (embedding_bag's bags)
    gather: torch.Tensor | None  # [pieces * length] token (from start) in each slot; None: slot i = token i
    scatter: torch.Tensor | None  # [stop - start] slot of each token; None when `gather` is

    @classmethod
    def build(cls, spans: Sequence[tuple[int, int, Placement]], width: int, device: torch.device) -> LoraGather:
        """From contiguous (start, stop, placement) spans, one per adapter, all of one class."""
        start, stop = spans[0][0], spans[-1][1]
        length = min(LONG_RUN, _next_power_of_two(-(-(stop - start) // len(spans))))
        rows: list[int] = []
        token_rows: list[int] = []
        gather: list[int] = []
        scatter: list[int] = []
        for first, last, placement in spans:
            own = list(range(placement.start, placement.start + placement.rank)) + [0] * (width - placement.rank)
            token_rows += own * (last - first)
            for piece in range(first, last, length):
                tokens = range(piece - start, min(piece + length, last) - start)
                scatter += range(len(gather), len(gather) + len(tokens))
                gather += [*tokens] + [tokens[0]] * (length - len(tokens))
                rows += own
        padded = len(gather) != stop - start
        adjacent = rows == list(range(rows[0], rows[0] + len(rows)))  # no gaps, no padding rows
        return cls(
            start, stop, width, len(rows) // width, length,
            rows=None if adjacent else torch.tensor(rows, device=device), first_row=rows[0],
            token_rows=torch.tensor(token_rows, device=device),
            offsets=torch.arange(0, len(token_rows), width, device=device),
            gather=torch.tensor(gather, device=device) if padded else None,
            scatter=torch.tensor(scatter, device=device) if padded else None,
        )


@dataclass(frozen=True)
class KernelTokens:
    """Tokens [start, start + n) for the CPU kernel (engine/lora_kernel.py): token start + t
    uses pool rows [first[t], first[t] + rank[t]); rank 0: none here (a base-model token, or
    one of a segment between kernel tokens)."""

    start: int
    first: torch.Tensor  # int32 [n]
    rank: torch.Tensor  # int32 [n]

    @classmethod
    def build(cls, spans: Sequence[tuple[int, int, Placement]], device: torch.device) -> KernelTokens:
        """From (start, stop, placement) spans in row order."""
        start = spans[0][0]
        first = [0] * (spans[-1][1] - start)
        rank = [0] * len(first)
        for begin, end, placement in spans:
            first[begin - start : end - start] = [placement.start] * (end - begin)
            rank[begin - start : end - start] = [placement.rank] * (end - begin)
        return cls(start, torch.tensor(first, dtype=torch.int32, device=device),
                   torch.tensor(rank, dtype=torch.int32, device=device))


@dataclass(frozen=True)
class LoraStep:
    """The plan every LoRA layer follows in one forward (module docstring). Empty: base only."""

    segments: tuple[LoraSegment, ...] = ()
    gathers: tuple[LoraGather, ...] = field(default_factory=tuple)
    kernel: KernelTokens | None = None

    def __bool__(self) -> bool:
        return bool(self.segments or self.gathers or self.kernel)

    @classmethod
    def build(cls, runs: Sequence[tuple[int, int, Placement]], device: torch.device, kernel: bool = False) -> LoraStep:
        """The plan of (start, stop, placement) token runs that use an adapter, in row order
        (`order_key`'s); consecutive runs of one placement merge into one span. `kernel`: the
        layers have the CPU kernel, which takes every span of less than KERNEL_WORK tokens x rank."""
        spans: list[tuple[int, int, Placement]] = []
        for start, stop, placement in runs:
            if spans and spans[-1][2] == placement and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], stop, placement)
            else:
                spans.append((start, stop, placement))
        if kernel:
            long = [(e - s) * p.rank >= KERNEL_WORK for s, e, p in spans]
        else:
            long = [e - s >= LONG_RUN for s, e, _ in spans]
        segments = tuple(LoraSegment(s, e, p.start, p.rank) for (s, e, p), is_long in zip(spans, long) if is_long)
        rest = [span for span, is_long in zip(spans, long) if not is_long]
        if kernel:
            return cls(segments, (), KernelTokens.build(rest, device) if rest else None)
        gathers = tuple(
            LoraGather.build(list(group), width, device)
            for width, group in groupby(rest, key=lambda span: span[2].rank_class)
        )
        return cls(segments, gathers)


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()
