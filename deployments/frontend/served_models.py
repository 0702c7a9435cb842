"""Which model names this server serves, and which adapter each one is: decided here, once.

Every front end asks `ServedModels.resolve(name)` before it calls the LLM deployment: the API's
routes (deployments/http/api.py) and the chat page (deployments/ui/page.py). The answer is a
`ServedModel`, the base model (its name or an alias), a configured adapter, a runtime adapter with
its id and folder (deployments/contract/runtime_adapters.py), or, with adapter stores configured,
any other valid adapter name: the replica looks it up in its stores and answers the 404 (naming it)
when none holds it, since only the replicas can read the stores. Otherwise an unknown name is a 404
here. What it returns goes into the GenerateCall as it is; the layers below trust it:

- the LLM replica (deployments/replica/llm.py) makes the adapter resident (engine/adapters.py), and
  without stores keeps an internal invariant: a call naming an adapter the config does not list,
  without a runtime folder, is a caller's bug (a 500), never a 404;
- the engine refuses adapters that are not loaded (engine/engine.py), for its direct users
  (tests, benchmarks); for the server that holds by construction.

No HTTP and no Ray here.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from engine.adapter_store import ADAPTER_NAME

from deployments.contract.errors import ApiError
from deployments.contract.runtime_adapters import RuntimeAdapters

StoredNames = Callable[[], Awaitable[list[str]]]
"""The names of the adapters the stores hold (asked of an LLM replica)."""


@dataclass(frozen=True)
class ServedModel:
    """What a GenerateCall carries for a model name: `adapter` None for the base model, else
    the adapter's name (a runtime adapter's id), and a runtime adapter's folder."""

    adapter: str | None = None
    adapter_source: str | None = None

    def call_fields(self) -> dict[str, str | None]:
        """`adapter` and `adapter_source`, as GenerateCall takes them."""
        return {"adapter": self.adapter, "adapter_source": self.adapter_source}


@dataclass
class ServedModels:
    """The base model's name and aliases, the configured adapters, and the runtime adapters
    (None: loading them at run time is off)."""

    base: str
    aliases: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()
    runtime: RuntimeAdapters | None = None
    stored: StoredNames | None = None  # None: no adapter stores

    def is_base(self, name: str) -> bool:
        return name == self.base or name in self.aliases

    def is_configured(self, name: str) -> bool:
        """The base model or an adapter of the application's args (a runtime name cannot take it)."""
        return self.is_base(name) or name in self.adapters

    async def resolve(self, name: str) -> ServedModel:
        """What `name` is; ApiError 404 (OpenAI's model_not_found) when this server does not serve it."""
        if self.is_base(name):
            return ServedModel()
        if name in self.adapters:
            return ServedModel(name)
        if self.runtime is not None and (loaded := await self.runtime.get(name)):
            return ServedModel(loaded.id, loaded.source)
        if self.stored is not None and ADAPTER_NAME.match(name):
            return ServedModel(name)
        raise ApiError(404, f"The model `{name}` does not exist", "invalid_request_error", "model", "model_not_found")

    async def names(self) -> list[str]:
        """Every model name clients may use but the aliases: the base model first, then the adapters."""
        runtime = await self.runtime.all() if self.runtime is not None else []
        stored = await self.stored() if self.stored is not None else []
        return list(dict.fromkeys([self.base, *self.adapters, *(adapter.name for adapter in runtime), *stored]))


@dataclass
class CachedNames:
    """A StoredNames answer reused for `ttl_s` seconds (the listing walks a store)."""

    fetch: StoredNames
    ttl_s: float = 5.0
    _names: list[str] = field(default_factory=list)
    _at: float = float("-inf")

    async def __call__(self) -> list[str]:
        if time.monotonic() - self._at > self.ttl_s:
            self._names, self._at = await self.fetch(), time.monotonic()
        return self._names
