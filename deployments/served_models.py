"""Which model names this server serves, and which adapter each one is: decided here, once.

Every front end asks `ServedModels.resolve(name)` before it calls the LLM deployment: the API's
routes (api.py) and the chat page (ui.py). The answer is a `ServedModel`, the base model (its
name or an alias), a configured adapter, or a runtime adapter with its id and folder
(runtime_adapters.py), and an unknown name is the one user-facing 404. What it returns goes into
the GenerateCall as it is; the layers below trust it:

- the LLM replica (llm.py) loads the adapter through Serve's multiplexer, and keeps only an
  internal invariant so that the multiplexer never loads a name the config does not list: a
  call naming such an adapter without a runtime folder is a caller's bug (a 500), never a 404;
- the engine refuses adapters that are not loaded (engine/engine.py), for its direct users
  (tests, benchmarks); for the server that holds by construction.

No HTTP and no Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployments.messages import ApiError
from deployments.runtime_adapters import RuntimeAdapters


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
        raise ApiError(404, f"The model `{name}` does not exist", "invalid_request_error", "model", "model_not_found")

    async def names(self) -> list[str]:
        """Every model name clients may use but the aliases: the base model first, then the adapters."""
        runtime = await self.runtime.all() if self.runtime is not None else []
        return [self.base, *self.adapters, *(adapter.name for adapter in runtime)]
