"""The application's settings: the `args` of serve_config.yaml, validated by pydantic.

One place to configure the model, adapters, batching, limits and generation defaults.
Ray Serve options (replicas, autoscaling, num_gpus overrides) live beside these in the
`deployments` section of serve_config.yaml.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.config import (
    DEFAULT_MODEL, Device, Dtype, EngineConfig, GenerationDefaults, PromptTemplate, RepetitionGuardConfig,
)


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


class AppArgs(BaseModel):
    """Everything serve_config.yaml's `args` can set."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="Built-in name, hub id, local folder or .gguf file.")
    served_model_name: str | None = Field(None, description="Name clients use; default: `model`.")
    dtype: Dtype = "auto"
    device: Device = "auto"
    num_gpus: float = Field(0, ge=0, description="GPUs per LLM replica (ray_actor_options).")
    num_cpus: float = Field(1, ge=0, description="CPUs reserved per LLM replica.")
    hf_token: str | None = Field(None, repr=False, description="Default: the HF_TOKEN environment variable.")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters: name -> hub id, absolute folder, or ./folder in this project."
    )
    preload_adapters: list[str] | Literal["all"] = "all"
    max_adapters_per_replica: int = Field(8, ge=1)
    prompt_template: PromptTemplate = "auto"
    max_batch_size: int = Field(64, ge=1, description="Rows the engine decodes together at most.")
    max_kv_tokens: int = Field(65536, ge=1, description="KV-cache token slots per replica, allocated at start.")
    kv_cache_memory_fraction: float | None = Field(
        None, gt=0, lt=1, description="On CUDA: size the KV cache to this share of free GPU memory instead."
    )
    kv_block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV-cache block (prefix-cache granularity).")
    max_step_tokens: int = Field(512, ge=1, description="Tokens per engine step: decode rows, then prompt chunks.")
    enable_prefix_caching: bool = Field(True, description="Reuse cached KV of shared prompt prefixes.")
    prepack_weights: bool = Field(True, description="CPU bf16/fp16: oneDNN-packed weight copies (faster, 2x weight memory).")
    max_input_tokens: int | None = Field(None, ge=1)
    max_tokens_cap: int = Field(4096, ge=1)
    max_consecutive_newlines: int = Field(32, ge=0, description="Stop a reply after this many line breaks in a row.")
    repetition_guard: RepetitionGuardConfig = Field(
        default_factory=RepetitionGuardConfig, description="Stop a reply that repeats a line or phrase."
    )
    max_waiting: int = Field(256, ge=1, description="Requests a replica's engine queues before answering 503.")
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests waiting for a busy LLM replica before the ingress answers 503 (-1: no limit)."
    )
    request_timeout_s: float | None = Field(300, gt=0, description="Time limit per request (finish_reason length).")
    api_keys: list[str] = Field(
        default_factory=list, repr=False, description="Bearer keys for the API and the chat page; also LLM_API_KEYS."
    )
    rate_limit_per_minute: int | None = Field(None, ge=1, description="Requests per minute per API key (429 beyond).")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body (413 beyond).")
    max_messages: int = Field(256, ge=1, description="Most chat messages in one request.")
    batch: BatchSettings = Field(default_factory=BatchSettings)
    request_log_file: str | None = Field(None, description="Also append one line per request here.")
    cache_dir: str | None = None

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
        """Adapters each replica loads at start (at most `max_adapters_per_replica`)."""
        names = list(self.adapters) if self.preload_adapters == "all" else self.preload_adapters
        return names[: self.max_adapters_per_replica]

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=_expand(self.model),
            dtype=self.dtype,
            device=self.device,
            hf_token=self.hf_token or os.environ.get("HF_TOKEN"),
            cache_dir=self.cache_dir,
            prompt_template=self.prompt_template,
            max_batch_size=self.max_batch_size,
            max_kv_tokens=self.max_kv_tokens,
            kv_cache_memory_fraction=self.kv_cache_memory_fraction,
            kv_block_size=self.kv_block_size,
            max_step_tokens=self.max_step_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
            prepack_weights=self.prepack_weights,
            max_waiting=self.max_waiting,
            max_input_tokens=self.max_input_tokens,
            max_tokens_cap=self.max_tokens_cap,
            max_consecutive_newlines=self.max_consecutive_newlines,
            repetition_guard=self.repetition_guard,
            request_timeout_s=self.request_timeout_s,
        )

    def adapter_source(self, name: str) -> str:
        return _expand(self.adapters[name])


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _expand(source: str) -> str:
    """Local paths: `~` expanded, `./x` relative to the project folder (where serve_config.yaml
    lives), absolute as they are. Anything else is a hub id ("owner/name")."""
    if source.startswith(("./", "../")):
        return str((PROJECT_ROOT / source).resolve())
    return str(Path(source).expanduser()) if source.startswith(("~", "/")) else source
