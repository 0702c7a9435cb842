"""The application's settings: the `args` of serve_config.yaml, validated by pydantic.

One place to configure the model, adapters, batching, limits and generation defaults.
Ray Serve options (replicas, autoscaling, num_gpus overrides) live beside these in the
`deployments` section of serve_config.yaml.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.config import EngineConfig, GenerationDefaults

log = logging.getLogger(__name__)


class BatchSettings(BaseModel):
    """What `reconfigure` may change on a running LLM replica (its `user_config`)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(16, ge=1, description="@serve.batch: requests admitted as one group.")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, description="How long a group waits to fill.")
    stream_interval_s: float = Field(
        0.25, ge=0.0,
        description="Pause between two messages of a stream at full load (9+ running rows); shorter "
        "under lighter load, none for a lone stream. Coalescing tokens saves Ray CPU.",
    )
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)


class AppArgs(EngineConfig):
    """Everything serve_config.yaml's `args` can set: the engine's settings (EngineConfig's
    fields, declared there once, with their defaults) plus the application's own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    served_model_name: str | None = Field(None, description="Name clients use; default: `model`.")
    num_gpus: float = Field(0, ge=0, description="GPUs per LLM replica (ray_actor_options).")
    num_cpus: float = Field(1, ge=0, description="CPUs reserved per LLM replica.")
    preload_adapters: list[str] | Literal["all"] = Field(
        "all", description="Adapters of `adapters` each replica reads into host memory at start.",
    )
    allow_runtime_adapters: bool = Field(
        False, description="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they load folders from the "
        "server's disk, so off by default; behind the API keys when on).",
    )
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests waiting for a busy LLM replica before the ingress answers 503 (-1: no limit)."
    )
    api_keys: list[str] = Field(
        default_factory=list, repr=False, description="Bearer keys for the API and the chat page; also LLM_API_KEYS."
    )
    rate_limit_per_minute: int | None = Field(None, ge=1, description="Requests per minute per API key (429 beyond).")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body (413 beyond).")
    max_messages: int = Field(256, ge=1, description="Most chat messages in one request.")
    batch: BatchSettings = Field(default_factory=BatchSettings)
    request_log_file: str | None = Field(None, description="Also append one line per request here.")

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, data: Any) -> Any:
        """`max_adapters_per_replica` (before adapter tiers) is now `max_active_adapters`."""
        if isinstance(data, dict) and "max_adapters_per_replica" in data:
            data = dict(data)
            old = data.pop("max_adapters_per_replica")
            data.setdefault("max_active_adapters", old)
            log.warning("max_adapters_per_replica is now max_active_adapters (adapters on the device at once)")
        return data

    @model_validator(mode="after")
    def _preloads_are_known(self) -> AppArgs:
        if self.preload_adapters != "all":
            unknown = set(self.preload_adapters) - set(self.adapters)
            if unknown:
                raise ValueError(f"preload_adapters names unknown adapters: {sorted(unknown)}")
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def preloaded(self) -> list[str]:
        """Adapters each replica reads into host memory at start."""
        return list(self.adapters) if self.preload_adapters == "all" else list(self.preload_adapters)

    def engine_config(self) -> EngineConfig:
        """The engine's part, with local paths expanded and the token from HF_TOKEN if unset."""
        fields = self.model_dump(include=set(EngineConfig.model_fields))
        fields.update(
            model=_expand(self.model), hf_token=self.hf_token or os.environ.get("HF_TOKEN"),
            adapters={name: _expand(source) for name, source in self.adapters.items()},
            adapter_stores=[_expand(store) for store in self.adapter_stores],
        )
        return EngineConfig(**fields)

    def adapter_source(self, name: str) -> str:
        return _expand(self.adapters[name])


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _expand(source: str) -> str:
    """Local paths: `~` expanded, `./x` relative to the project folder (where serve_config.yaml
    lives), absolute as they are. Anything else is a hub id ("owner/name")."""
    if source.startswith(("./", "../")):
        return str((PROJECT_ROOT / source).resolve())
    return str(Path(source).expanduser()) if source.startswith(("~", "/")) else source
