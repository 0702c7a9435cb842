"""Fair share of the engine among its clients: virtual token counters (VTC).

After "Fairness in Serving Large Language Models" (Sheng et al., OSDI 2024; the VTC scheduler
of the S-LoRA group). A client is the `(adapter, tenant)` pair of a request (None for either
is a client like any other: the base model, no API key). When requests wait, the scheduler
admits the client that has received the least service, so a flood on one adapter or one API
key cannot starve the others.

`VirtualCounters` holds the rules, per client:

- **charge**: a client's counter grows by `ServiceWeights.prompt` per prompt token computed
  for it and `ServiceWeights.generated` per token sampled for it (1 and 4, see below).
- **order**: waiting work goes to the client with the least counter; FIFO within a client,
  and among equal counters the client whose oldest waiting row came first. Each pick adds
  its expected cost to (a copy of) its client's counter, so one step's admissions take turns.
- **lift**: when a client with no waiting rows gets a new one, its counter is raised to the
  `floor`: the least counter among clients with waiting rows (the highest such value seen,
  so it never falls, and it stands in when nobody waits). An idle client (or one that only
  had rows running while others queued) cannot bank credit. As in the paper, a client that
  still waits is never lifted, and a preempted row does not count as new.
- **state**: accounts only for clients with waiting or running rows, plus the counters of at
  most `max_idle` clients that went idle above the floor (their return is lifted no lower
  than where they left: a client cannot shed what it was served by pausing a moment). An idle
  counter at or below the floor is dropped: the lift would give the same value.

Weights: generated 4, prompt 1 (the paper's experiments use 1 and 2). What fair share should
spread here is step time, and a generated token costs a few prompt tokens of it, more on long
contexts (bench/README.md, Design notes, for the measurement behind 4). The weights only set the exchange rate between the two
kinds of service: the rules and their bounds are the same for any positive pair.

`FairShare` applies the rules to the scheduler's rows (engine/scheduler.py): it learns
arrivals by `sync`ing with the waiting queue each step, orders the waiting rows (preempted
ones first, in queue order, as without fair share), follows rows as they are admitted,
preempted and removed, and charges each scheduled chunk: the prompt tokens it computes for
the first time (cached tokens are not computed; a recompute after a preemption is the
scheduler's doing and is not charged again) and the token sampled after it.

Thread: the engine core's worker thread; plain Python.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from engine.row import Row

Client = tuple[str | None, str | None]
"""(adapter, tenant) of a request; None: the base model, or a caller without an API key."""

T = TypeVar("T")


@dataclass(frozen=True)
class ServiceWeights:
    """What one token adds to its client's counter (see the module docstring for the values)."""

    prompt: int = 1
    generated: int = 4

    def cost(self, prompt_tokens: int, generated_tokens: int) -> int:
        return self.prompt * prompt_tokens + self.generated * generated_tokens


@dataclass
class _Account:
    counter: int
    waiting: int = 0
    running: int = 0


class VirtualCounters:
    """One counter per client with work, and the floor (see the module docstring)."""

    def __init__(self, weights: ServiceWeights = ServiceWeights(), max_idle: int = 256):
        self.weights = weights
        self.max_idle = max_idle
        self.floor = 0
        self._active: dict[Client, _Account] = {}
        self._idle: dict[Client, int] = {}  # in the order they went idle

    @property
    def held(self) -> int:
        """Counters held: clients with rows, and the idle ones remembered."""
        return len(self._active) + len(self._idle)

    def counter(self, client: Client) -> int:
        """The client's counter; for a client without rows, what a new row would start from."""
        account = self._active.get(client)
        return account.counter if account else max(self._idle.get(client, 0), self.floor)

    def arrive(self, client: Client) -> None:
        """A new row of `client` waits; a client with none waiting is lifted to the floor first."""
        account = self._active.get(client)
        if account is None:
            account = self._active[client] = _Account(self._idle.pop(client, 0))
        if not account.waiting:
            account.counter = max(account.counter, self.floor)
        account.waiting += 1

    def start(self, client: Client) -> None:
        """One of the client's waiting rows was admitted."""
        account = self._active[client]
        account.waiting -= 1
        account.running += 1

    def requeue(self, client: Client) -> None:
        """One of the client's running rows was preempted: it waits again (no lift)."""
        account = self._active[client]
        account.running -= 1
        account.waiting += 1

    def leave(self, client: Client, running: bool) -> None:
        """One of the client's rows (running or waiting) is gone; with its last, its account."""
        account = self._active[client]
        if running:
            account.running -= 1
        else:
            account.waiting -= 1
        if not account.waiting and not account.running:
            del self._active[client]
            self._remember(client, account.counter)

    def charge(self, client: Client, prompt_tokens: int, generated_tokens: int) -> None:
        """Add the service a client with rows received."""
        self._active[client].counter += self.weights.cost(prompt_tokens, generated_tokens)

    def refresh_floor(self) -> None:
        """Raise the floor to the least counter of the clients with waiting rows, if higher."""
        waiting = [account.counter for account in self._active.values() if account.waiting]
        if waiting:
            self.floor = max(self.floor, min(waiting))

    def order(self, entries: Iterable[tuple[Client, T, int]]) -> Iterator[T]:
        """The items of `(client, item, cost)` entries (given in arrival order) by least counter:
        FIFO within a client and among equal counters; each pick adds `cost` to a copy of its
        client's counter. The counters themselves do not change."""
        queues: dict[Client, deque[tuple[int, T, int]]] = {}
        for position, (client, item, cost) in enumerate(entries):
            queues.setdefault(client, deque()).append((position, item, cost))
        heap = [(self.counter(client), queue[0][0], client) for client, queue in queues.items()]
        heapify(heap)  # positions are unique: clients themselves are never compared
        while heap:
            counter, _, client = heappop(heap)
            queue = queues[client]
            _, item, cost = queue.popleft()
            yield item
            if queue:
                heappush(heap, (counter + cost, queue[0][0], client))

    def _remember(self, client: Client, counter: int) -> None:
        """Keep an idle client's counter while it is above the floor, at most `max_idle` of them
        (those at or below the floor go first, then the longest idle)."""
        if counter <= self.floor or self.max_idle <= 0:
            return
        self._idle[client] = counter
        if len(self._idle) > self.max_idle:
            self._idle = {c: value for c, value in self._idle.items() if value > self.floor}
            while len(self._idle) > self.max_idle:
                del self._idle[next(iter(self._idle))]


def client_of(row: Row) -> Client:
    return row.request.adapter, row.request.tenant


@dataclass
class _RowState:
    client: Client
    running: bool = False
    preempted: bool = False
    charged_prompt: int = 0  # prompt positions below this were charged (or skipped as cached)


class FairShare:
    """The counters over the scheduler's waiting and running rows (see the module docstring).

    Contract with the scheduler: `sync(waiting)` before `order` in each step, then `started`,
    `preempted` and `removed` as rows move, and `charge` for every scheduled chunk. It holds
    state only for rows the scheduler holds.
    """

    def __init__(self, weights: ServiceWeights = ServiceWeights(), max_idle: int = 256):
        self.counters = VirtualCounters(weights, max_idle)
        self._rows: dict[Row, _RowState] = {}

    @property
    def tracked_rows(self) -> int:
        """Rows followed: the scheduler's waiting and running rows (once synced)."""
        return len(self._rows)

    def sync(self, waiting: Iterable[Row]) -> None:
        """Raise the floor, then take the rows of `waiting` not seen before as arrivals, in order."""
        self.counters.refresh_floor()
        for row in waiting:
            if row not in self._rows:
                state = self._rows[row] = _RowState(client_of(row))
                self.counters.arrive(state.client)

    def order(self, waiting: Iterable[Row]) -> Iterator[Row]:
        """`waiting` (synced, in queue order) in admission order: the preempted rows as they
        stand, then the others by least counter, each expected to cost its whole prompt and
        one sampled token. Reads `waiting` at the first item; changes nothing."""
        rows = [(row, self._rows[row]) for row in waiting]
        weights = self.counters.weights
        entries = [
            (state.client, row, weights.cost(len(row.request.prompt_ids) - state.charged_prompt, 1))
            for row, state in rows if not state.preempted
        ]
        yield from [row for row, state in rows if state.preempted]
        yield from self.counters.order(entries)

    def started(self, row: Row) -> None:
        state = self._rows[row]
        state.running, state.preempted = True, False
        self.counters.start(state.client)

    def preempted(self, row: Row) -> None:
        state = self._rows[row]
        state.running, state.preempted = False, True
        self.counters.requeue(state.client)

    def removed(self, row: Row) -> None:
        """The row finished or was cancelled (a row never synced is ignored)."""
        state = self._rows.pop(row, None)
        if state is not None:
            self.counters.leave(state.client, state.running)

    def charge(self, row: Row, start: int, length: int, sample: bool) -> None:
        """Charge a running row's client for computing tokens [start, start + length) and, when
        `sample`, for the token sampled after them; prompt tokens are charged once."""
        state = self._rows[row]
        end = min(start + length, len(row.request.prompt_ids))
        fresh = max(0, end - max(start, state.charged_prompt))
        state.charged_prompt = max(state.charged_prompt, end)
        self.counters.charge(state.client, fresh, int(sample))
