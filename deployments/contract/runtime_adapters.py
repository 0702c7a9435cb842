"""Adapters loaded at run time (vLLM's POST /v1/load_lora_adapter), off unless
`allow_runtime_adapters` is set, since it loads files from the server's disk.

Where replicas learn of them: the table of runtime adapters lives in one small named Ray actor
per application (`RegistryActor`, detached, so it outlives any one ingress replica; created by
the first ingress replica that needs it, found by name by the others). Every ingress replica
looks a model name up there when it is neither the base model nor a configured adapter, and a
request for a runtime adapter carries its source folder and its id in the GenerateCall. So an
LLM replica needs no registry of its own: any replica, one that autoscaling started after the
load included, loads the adapter on first use into its tiers (engine/adapters.py), exactly as it
loads a configured adapter or one from a store (evicted least recently used, by bytes).

Each load gets a new id, `runtime:<name>:<n>` (the engine's adapter name), so an adapter unloaded and loaded again under the same name from other weights is never
served from a replica's old copy, and the prefix cache (keyed by adapter name and weights,
engine/lora.py) cannot give it the old adapter's KV. Unloading takes the name out of the table:
every ingress answers 404 for it at once, and replicas free its weights when their tiers evict
it (no request asks for its id again). The table is in memory: a restart of the Ray
cluster forgets it, as vLLM forgets its runtime adapters on restart.

No Ray in `AdapterTable` (the API's tests use it in memory); `RegistryActor` wraps it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class RuntimeAdapter:
    """One loaded adapter: the name clients use, its folder, and the id replicas load it as."""

    name: str
    source: str
    id: str


class RuntimeAdapters(Protocol):
    """The application's runtime adapters, as the API reads and changes them (async: an actor)."""

    async def get(self, name: str) -> RuntimeAdapter | None: ...

    async def add(self, name: str, source: str) -> RuntimeAdapter | None: ...

    async def remove(self, name: str) -> bool: ...

    async def all(self) -> list[RuntimeAdapter]: ...


@dataclass
class AdapterTable:
    """Name -> RuntimeAdapter; every `add` of a name gets a new id."""

    adapters: dict[str, RuntimeAdapter] = field(default_factory=dict)
    loads: int = 0

    def get(self, name: str) -> RuntimeAdapter | None:
        return self.adapters.get(name)

    def add(self, name: str, source: str) -> RuntimeAdapter | None:
        """The new entry, or None if `name` is taken."""
        if name in self.adapters:
            return None
        self.loads += 1
        self.adapters[name] = adapter = RuntimeAdapter(name, source, f"runtime:{name}:{self.loads}")
        return adapter

    def remove(self, name: str) -> bool:
        return self.adapters.pop(name, None) is not None

    def all(self) -> list[RuntimeAdapter]:
        return list(self.adapters.values())


class InMemoryAdapters:
    """An AdapterTable behind the async interface: one process (tests, a single ingress)."""

    def __init__(self) -> None:
        self.table = AdapterTable()

    async def get(self, name: str) -> RuntimeAdapter | None:
        return self.table.get(name)

    async def add(self, name: str, source: str) -> RuntimeAdapter | None:
        return self.table.add(name, source)

    async def remove(self, name: str) -> bool:
        return self.table.remove(name)

    async def all(self) -> list[RuntimeAdapter]:
        return self.table.all()


class RegistryActor(AdapterTable):
    """The table as a Ray actor (deployments/http/ingress.py creates it with `ray.remote`)."""


class ActorAdapters:
    """RuntimeAdapters through the named registry actor: what every ingress replica shares."""

    def __init__(self, actor) -> None:
        self.actor = actor

    async def get(self, name: str) -> RuntimeAdapter | None:
        return await self.actor.get.remote(name)

    async def add(self, name: str, source: str) -> RuntimeAdapter | None:
        return await self.actor.add.remote(name, source)

    async def remove(self, name: str) -> bool:
        return await self.actor.remove.remote(name)

    async def all(self) -> list[RuntimeAdapter]:
        return await self.actor.all.remote()


def folder_problem(path: str) -> str | None:
    """Why `path` is not a PEFT adapter folder on this machine, or None if it looks like one."""
    folder = Path(path).expanduser()
    if not folder.is_absolute():
        return f"{path!r} is not an absolute path (give the adapter folder's full path on the server)"
    if not folder.is_dir():
        return f"{path!r} is not a folder on the server"
    if not (folder / "adapter_config.json").is_file():
        return f"{path!r} has no adapter_config.json (not a PEFT LoRA adapter folder)"
    return None
