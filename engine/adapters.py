"""Adapter residency on one replica: three tiers, counted in bytes, loads off the step thread.

Tiers (engine/adapter_report.py names them):
- **active**: the adapter's LoRA rows are in the compute device's pool (`LoraLayers`,
  engine/lora.py), so rows using it can run in a step. At most `max_active_adapters` at once,
  within `adapter_device_memory` bytes.
- **host**: read and converted (`HostAdapter`, engine/lora_weights.py) in host memory, one copy
  into the pool away from active. Least recently used first out beyond `adapter_host_memory`.
  An active adapter keeps its host copy (counted in the pool's budget, not this one), so it can
  leave the pool and come back by a copy.
- **disk**: in its store or the local disk cache (engine/adapter_store.py), a fetch and a read
  away.

Data: `_entries` (name -> `_Entry`: source, host copy, placement, pin, rows that need it, the
load in flight) and `placements` (name -> Placement of the active ones; the model runner reads it
to find each row's LoRA rows). An entry exists while the adapter is loading or in host memory.

One request, end to end:
1. the event loop awaits `ensure(name)`: a warm adapter returns at once; a cold one starts one
   load on the loader thread (fetch from the store, read the files: no model, no pool) and every
   concurrent caller for the name awaits that same load, each within `adapter_load_timeout_s`
   (AdapterTimeoutError: the request never queues; the load goes on and serves the next one);
   a finished load enters the host tier, evicting the least recently used adapters that no row
   needs and nobody pinned;
2. `acquire(name)` when the request is submitted; its rows wait in the scheduler;
3. the worker thread, before each step, calls `prepare_step(running, waiting)`: the adapters of
   the first waiting rows (in the scheduler's admission order) are copied into the pool,
   evicting active adapters that no running row uses, least recently used first; the scheduler
   admits a waiting row only once its adapter is active (`is_active`, its gate);
4. `release(name)` when the request has finished.
Eviction never removes an adapter that a running or waiting request needs: host eviction skips
acquired and pinned entries, pool eviction skips the adapters of running rows and those placed
for this step.

Threads: the event loop (ensure, acquire, release, load, unload, report), the loader thread
(`_read`: files only), the engine's worker thread (prepare_step, is_active; and the runner reading
`placements`). The event loop runs while a step runs, so every read or change of `_entries` and
`placements` holds `_lock`; the worker holds it for the few copies of `prepare_step`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.adapter_report import AdapterEvent, AdapterReport, EventKind, ResidentAdapter
from engine.errors import AdapterNotFoundError, AdapterTimeoutError, InvalidRequestError, UnknownAdapterError
from engine.adapter_store import check_name
from engine.lora import LoraLayers, Placement
from engine.lora_weights import HostAdapter, read_adapter

log = logging.getLogger(__name__)

Fetch = Callable[[str], Path]
"""A store lookup: adapter name -> local folder (blocking; raises AdapterNotFoundError)."""

MAX_EVENTS = 4096  # events kept between two reads of `drain_events` (the oldest dropped beyond)


@dataclass
class _Entry:
    """An adapter this replica has in memory or is loading."""

    name: str
    source: str | None  # a folder or hub id; None: found in the stores by name
    host: HostAdapter | None = None
    loading: asyncio.Future[HostAdapter] | None = None
    pinned: bool = False
    users: int = 0  # requests submitted and not finished
    last_used: float = field(default_factory=time.monotonic)
    draining: bool = False  # being unloaded: no new requests


@dataclass(frozen=True)
class TierLimits:
    """The manager's budgets (from EngineConfig)."""

    host_bytes: int
    load_timeout_s: float


class AdapterManager:
    """The replica's adapters across tiers (module docstring). Create on the event loop."""

    def __init__(
        self, layers: LoraLayers, limits: TierLimits, dtype: torch.dtype, device: torch.device,
        fetch: Fetch | None = None, loader: Executor | None = None,
    ):
        self.layers = layers
        self.limits = limits
        self.placements: dict[str, Placement] = {}
        self._dtype, self._pin = dtype, device.type == "cuda"
        self._fetch = fetch
        self._loader = loader or ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")
        self._entries: dict[str, _Entry] = {}
        self._sources: dict[str, str] = {}  # adapters with a fixed source (config, load_adapter)
        self._lock = threading.Lock()
        self._events: deque[AdapterEvent] = deque(maxlen=MAX_EVENTS)
        self._active_used: dict[str, float] = {}  # active adapter -> last step that used it
        self._placed: dict[str, bytes] = {}  # active adapter -> identity of the weights in the pool

    # ----- the event loop's side ---------------------------------------------------------

    def register(self, name: str, source: str) -> None:
        """Give `name` a fixed source (a folder or hub id) instead of the stores."""
        check_name(name)
        known = self._sources.get(name)
        if known is not None and known != source:
            raise InvalidRequestError(f"adapter {name!r} is already loaded from {known}")
        self._sources[name] = source

    async def ensure(self, name: str, source: str | None = None, hold: bool = False) -> float:
        """Make `name` resident in host memory; return the seconds this call waited (0: warm).
        With `hold`, the adapter counts as needed until `release(name)` (a caller that awaits
        something before it submits the request must hold it, or a load meanwhile may evict it).

        Raises AdapterNotFoundError (no store has it), InvalidRequestError (it cannot be read or
        does not fit the model), AdapterTimeoutError (not there within the load timeout)."""
        check_name(name)
        if source is not None:
            self.register(name, source)
        started = time.monotonic()
        waited = False
        while True:
            with self._lock:
                entry = self._entries.get(name)
                if entry is not None and entry.draining:
                    raise InvalidRequestError(f"adapter {name!r} is being unloaded")
                if entry is not None and entry.host is not None:
                    entry.last_used = time.monotonic()
                    entry.users += hold
                    return time.monotonic() - started if waited else 0.0
                if entry is None or entry.loading is None:
                    entry = self._entries.setdefault(name, _Entry(name, self._sources.get(name)))
                    entry.loading = self._start_load(entry)
                loading = entry.loading
            waited = True
            remaining = started + self.limits.load_timeout_s - time.monotonic()
            try:
                await asyncio.wait_for(asyncio.shield(loading), max(remaining, 0.0))
            except TimeoutError:
                raise AdapterTimeoutError(
                    f"adapter {name!r} was not loaded within {self.limits.load_timeout_s:g} s (it is still loading)"
                ) from None

    def preload(self, name: str, pinned: bool = False) -> None:
        """Read `name` into host memory on the calling thread (at start, before serving)."""
        host = self._read(name, self._sources.get(name))
        with self._lock:
            entry = self._entries.setdefault(name, _Entry(name, self._sources.get(name)))
            entry.host, entry.pinned = host, pinned
            self._evict_host(keep=name)
        self._event("load", name)

    def pin(self, name: str, pinned: bool = True) -> None:
        """Keep a host-resident adapter in host memory for good (or no longer)."""
        with self._lock:
            self._resident(name).pinned = pinned

    def acquire(self, name: str | None) -> None:
        """A request for `name` was submitted (None: the base model). It must be resident."""
        if name is None:
            return
        with self._lock:
            entry = self._resident(name)
            if entry.draining:
                raise InvalidRequestError(f"adapter {name!r} is being unloaded")
            entry.users += 1
            entry.last_used = time.monotonic()

    def release(self, name: str | None) -> None:
        """A request for `name` has finished."""
        if name is None:
            return
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.users > 0:
                entry.users -= 1

    def check(self, name: str | None) -> None:
        """UnknownAdapterError unless `name` is None or resident in host memory."""
        if name is not None:
            with self._lock:
                self._resident(name)

    def identity(self, name: str | None) -> bytes:
        """The prefix cache's key for the adapter: b"" for the base model, else name + weights hash."""
        if name is None:
            return b""
        with self._lock:
            return self._resident(name).host.identity

    def source(self, name: str) -> str | None:
        return self._sources.get(name)

    @property
    def names(self) -> list[str]:
        """Adapters resident in host memory (active ones included)."""
        with self._lock:
            return [name for name, entry in self._entries.items() if entry.host is not None]

    async def unload(self, name: str) -> None:
        """Refuse new requests for `name`, wait until the requests holding it have ended, then drop it
        from every tier (the pool copy at the next step) and forget its source."""
        with self._lock:
            entry = self._resident(name)
            entry.draining = True
        try:
            while entry.users > 0:
                await asyncio.sleep(0.01)
        finally:
            with self._lock:
                self._entries.pop(name, None)
                self._sources.pop(name, None)
        self._event("evict", name)

    def report(self) -> AdapterReport:
        with self._lock:
            adapters = [self._resident_adapter(entry) for entry in self._entries.values()]
            host_used = sum(e.host.nbytes for e in self._entries.values()
                            if e.host is not None and e.name not in self.placements)
        layers = self.layers
        return AdapterReport(
            adapters=adapters,
            active_slots=layers.max_adapters,
            device_bytes=layers.capacity_rows * layers.bytes_per_row,
            device_bytes_used=(layers.capacity_rows - layers.free_rows) * layers.bytes_per_row,
            host_bytes=self.limits.host_bytes,
            host_bytes_used=host_used,
        )

    def drain_events(self) -> list[AdapterEvent]:
        """The events since the last call (at most MAX_EVENTS)."""
        events = []
        while self._events:
            events.append(self._events.popleft())
        return events

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ----- the worker thread's side ---------------------------------------------------------

    def is_active(self, name: str | None, identity: bytes = b"") -> bool:
        """The scheduler's gate: a row may run once its adapter is in the pool (with the weights
        of `identity`, the row's: a name loaded again from other weights is another adapter)."""
        return name is None or (name in self.placements and self._placed[name] == identity)

    def prepare_step(self, running: Iterable[str | None], waiting: Iterable[str | None]) -> None:
        """Bring the adapters of the first waiting rows into the pool, in order, as far as slots
        and rows allow; free pool rows of adapters that left the host tier. Worker thread."""
        now = time.monotonic()
        with self._lock:
            self._drop_unloaded()
            protected = {name for name in running if name is not None}
            for name in protected:
                self._active_used[name] = now
            for name in dict.fromkeys(waiting):
                if name is None or name in self.placements:
                    if name is not None:
                        protected.add(name)
                    continue
                entry = self._entries.get(name)
                if entry is None or entry.host is None:  # (a draining adapter still serves its rows)
                    continue
                if not self._place(entry, protected):
                    break  # the pool is full of adapters in use: later rows wait too
                protected.add(name)
                self._active_used[name] = now

    def _place(self, entry: _Entry, protected: set[str]) -> bool:
        """Copy `entry` into the pool, evicting idle active adapters (least recently used first)."""
        while True:
            if len(self.placements) < self.layers.max_adapters:
                placement = self.layers.place(entry.host)
                if placement is not None:
                    self.placements[entry.name] = placement
                    self._placed[entry.name] = entry.host.identity
                    self._event("activate", entry.name)
                    return True
            idle = [name for name in self.placements if name not in protected]
            if not idle:
                return False
            self._deactivate(min(idle, key=lambda name: self._active_used.get(name, 0.0)))

    def _deactivate(self, name: str) -> None:
        """Free `name`'s pool rows; its host copy now counts in the host budget (under `_lock`)."""
        self.layers.remove(self.placements.pop(name))
        del self._placed[name]
        self._active_used.pop(name, None)
        self._event("deactivate", name)
        self._evict_host()

    def _drop_unloaded(self) -> None:
        """Pool copies of adapters unloaded since (or loaded again from other weights) leave the pool."""
        for name in list(self.placements):
            entry = self._entries.get(name)
            if entry is None or entry.host is None or entry.host.identity != self._placed[name]:
                self._deactivate(name)

    # ----- loading --------------------------------------------------------------------------

    def _start_load(self, entry: _Entry) -> asyncio.Future[HostAdapter]:
        """Read `entry` on the loader thread; when done (on the loop) it joins the host tier."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        future = loop.run_in_executor(self._loader, self._read, entry.name, entry.source)
        future.add_done_callback(lambda done: self._loaded(entry, done, time.monotonic() - started))
        return future

    def _read(self, name: str, source: str | None) -> HostAdapter:
        """Loader thread: find the folder (a fixed source or the stores) and read the weights."""
        if source is None:
            if self._fetch is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded and no adapter store is configured")
            source = str(self._fetch(name))
        host = read_adapter(name, source, self.layers.linear_shapes, self._dtype, pin_memory=self._pin)
        if host.rank > self.layers.capacity_rows:
            raise InvalidRequestError(
                f"adapter {name!r} has rank {host.rank}, more than the {self.layers.capacity_rows} rows of the "
                "device's adapter pool (raise adapter_device_memory)"
            )
        return host

    def _loaded(self, entry: _Entry, done: asyncio.Future[HostAdapter], seconds: float) -> None:
        with self._lock:
            entry.loading = None
            if done.cancelled() or done.exception() is not None:
                if self._entries.get(entry.name) is entry and entry.host is None:
                    del self._entries[entry.name]
                failed = True
            else:
                entry.host, entry.last_used = done.result(), time.monotonic()
                self._evict_host(keep=entry.name)
                failed = False
        if failed:
            error = "cancelled" if done.cancelled() else done.exception()
            log.warning("adapter %r failed to load: %s", entry.name, error)
        self._event("load_failed" if failed else "load", entry.name, seconds)

    def _evict_host(self, keep: str | None = None) -> None:
        """Least recently used adapters out of host memory until the tier fits its budget,
        skipping pinned and needed ones and `keep` (just loaded) (under `_lock`). Active adapters
        count in the device pool's budget instead: their host copy stays while they are active."""
        resident = [e for e in self._entries.values() if e.host is not None and e.name not in self.placements]
        used = sum(e.host.nbytes for e in resident)
        for entry in sorted(resident, key=lambda e: e.last_used):
            if used <= self.limits.host_bytes:
                return
            if entry.pinned or entry.users or entry.name == keep:
                continue
            used -= entry.host.nbytes
            del self._entries[entry.name]
            self._event("evict", entry.name)

    # ----- helpers --------------------------------------------------------------------------

    def _resident(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None or entry.host is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded (loaded: {', '.join(self._loaded_names()) or 'none'})")
        return entry

    def _loaded_names(self) -> list[str]:
        return [n for n, e in self._entries.items() if e.host is not None][:20]

    def _resident_adapter(self, entry: _Entry) -> ResidentAdapter:
        tier = "active" if entry.name in self.placements else "host" if entry.host is not None else "loading"
        host = entry.host
        return ResidentAdapter(
            entry.name, tier, rank=host.rank if host else 0, nbytes=host.nbytes if host else 0,
            pinned=entry.pinned, rows_using=entry.users,
        )

    def _event(self, kind: EventKind, name: str, seconds: float = 0.0) -> None:
        self._events.append(AdapterEvent(kind, name, seconds))
