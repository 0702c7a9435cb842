"""Engine settings and per-request sampling settings.

Both are pydantic models: they are built from user input (serve_config.yaml, HTTP bodies),
so validation errors must be clear and early. Everything inside the engine reads them only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ByteSize, ConfigDict, Field, create_model, model_validator

from engine.grammar import Grammar

DEFAULT_MODEL = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    """Where converted built-in models and downloaded adapters go unless the config says:
    $LORA_SERVE_CACHE, else ~/.cache/lora-serve."""
    return Path(os.environ.get("LORA_SERVE_CACHE", Path.home() / ".cache" / "lora-serve"))


Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
PromptTemplate = Literal["auto", "chat", "alpaca"]

# What one request may ask of the per-token work (OpenAI allows 4 stop strings; vLLM sets no limit).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 128
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20  # most likely tokens listed per position (OpenAI's top_logprobs limit)
MAX_CHOICES = 128  # choices per request (OpenAI's limit); the engine also caps n at max_batch_size
MAX_LOGIT_BIAS = 300  # token ids one request may bias (OpenAI's limit)


class RepetitionGuardConfig(BaseModel):
    """When a row counts as looping (engine/repetition.py): a unit of at most `max_period`
    tokens repeated `min_repeats` times back to back, covering at least `min_tokens` tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_repeats: int = Field(8, ge=0, description="Repeats that make a loop (0 disables the guard).")
    min_tokens: int = Field(96, ge=1, description="Tokens a loop must cover (spares short runs like '0, 0, 0').")
    max_period: int = Field(64, ge=1, le=1024, description="Longest repeated unit looked for, in tokens.")


class EngineConfig(BaseModel):
    """How the engine loads its model and schedules work."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _step_fits_every_row(self) -> EngineConfig:
        if self.max_step_tokens < self.max_batch_size:
            raise ValueError("max_step_tokens must be at least max_batch_size (one token per running row)")
        return self

    model: str = Field(
        DEFAULT_MODEL,
        description="Built-in name, Hugging Face hub id, local checkpoint folder or .gguf file.",
    )
    dtype: Dtype = "auto"
    device: Device = "auto"
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters to load at start: name -> folder or hub id."
    )
    hf_token: str | None = Field(None, repr=False, description="Token for gated hub models.")
    cache_dir: str | None = Field(
        None, description="Where converted built-in models are kept (default ~/.cache/lora-serve)."
    )
    prompt_template: PromptTemplate = Field(
        "auto", description="auto: the tokenizer's chat template if it has one, else alpaca."
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="Rows (requests) running at once.")
    max_kv_tokens: int = Field(
        65536, ge=1,
        description="Token slots of the KV cache, allocated once at start (memory is bounded by it).",
    )
    kv_cache_memory_fraction: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="On CUDA: size the KV cache to this share of the free GPU memory instead.",
    )
    kv_block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV-cache block.")
    max_step_tokens: int = Field(
        512, ge=1,
        description="Tokens computed per step: decode rows first, then prompt chunks (chunked prefill).",
    )
    prepack_weights: bool = Field(
        True,
        description="CPU, bf16/fp16: keep a oneDNN-packed copy of every Linear weight (the weights' "
        "memory again; 1.6-1.9x faster matmuls on the CPU measured here).",
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV of cached prompt prefixes (same tokens and adapter)."
    )
    spare_core_rows: int = Field(
        0, ge=0,
        description="CPU, when the model's threads take every core: steps without prompt tokens and with at "
        "most this many rows run on one torch thread fewer, leaving a core to the processes that carry the "
        "streams (engine/step_threads.py; 0: every step on every thread).",
    )
    max_waiting: int = Field(256, ge=1, description="Requests a replica's engine queues before answering 503.")
    max_input_tokens: int | None = Field(
        None, ge=1, description="Cap on prompt tokens; default: the model's context window."
    )
    max_tokens_cap: int = Field(4096, ge=1, description="Hard cap on a request's max_tokens.")
    max_consecutive_newlines: int = Field(
        32, ge=0, description="Stop a row after this many newlines in a row (0 disables)."
    )
    repetition_guard: RepetitionGuardConfig = Field(
        default_factory=RepetitionGuardConfig, description="Stop a row that repeats a line or phrase."
    )
    request_timeout_s: float | None = Field(
        300, gt=0, description="Stop a request this long after it arrived (finish_reason length)."
    )
    # ----- many adapters (engine/adapters.py: tiers; engine/adapter_store.py: stores) -----
    adapter_stores: list[str] = Field(
        default_factory=list,
        description="Where adapters not listed in `adapters` are found by name, on first use: a local "
        "folder (every PEFT folder under it, named by its relative path), file://, hf://org, s3://, gs://.",
    )
    pinned_adapters: list[str] = Field(
        default_factory=list, description="Adapters kept in host memory for good (names from `adapters` or a store)."
    )
    max_active_adapters: int = Field(
        32, ge=1, le=1024,
        description="Adapter slots on the compute device: distinct adapters usable in one step.",
    )
    adapter_device_memory: ByteSize = Field(
        ByteSize(256 * 2**20),
        description="Bytes of the compute device's adapter pool (every active adapter's LoRA weights).",
    )
    adapter_host_memory: ByteSize = Field(
        ByteSize(2 * 2**30), description="Bytes of adapters kept in host memory (LRU beyond it)."
    )
    adapter_disk_cache: ByteSize = Field(
        ByteSize(10 * 2**30), description="Bytes of downloaded adapters kept on local disk (LRU beyond it)."
    )
    adapter_cache_dir: str | None = Field(
        None, description="Where downloaded adapters are kept (default: <cache_dir>/adapters)."
    )
    adapter_load_timeout_s: float = Field(
        60.0, gt=0, description="A request whose adapter takes longer to fetch and read fails (504)."
    )
    lora_kernel: Literal["auto", "torch"] = Field(
        "auto",
        description="How a step's LoRA is computed: auto = the CPU kernel (engine/csrc, built on first use) "
        "for a CPU model, else torch ops; torch = torch ops always (engine/lora.py).",
    )
    attention_kernel: Literal["auto", "torch"] = Field(
        "auto",
        description="How decode rows and prompt chunks attend on a CPU bf16 model: auto = the AVX-512 BF16 kernel "
        "(engine/csrc, built on first use; torch ops and SDPA where the CPU lacks it); torch = torch ops and SDPA "
        "always (engine/attention.py).",
    )
    fair_share: bool = Field(
        True, description="Admit waiting requests by least recent service per adapter and API key (VTC).",
    )


# Types and bounds of the sampling fields, named for SamplingParams below (the fields' one
# declaration) and for the seed API's own names (deployments/http/protocol.py, /generate).
MaxTokens = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 means greedy decoding.")]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=0, description="0 disables top-k.")]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
StopTokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)]
Choices = Annotated[int, Field(ge=1, le=MAX_CHOICES, description="Choices sampled for the prompt.")]
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS, description="Most likely tokens listed beside each token.")]


def token_id_key(key: Any) -> Any:
    """A logit_bias key: an int, or the decimal digits of one (JSON object keys are strings)."""
    if isinstance(key, str) and not re.fullmatch(r"[0-9]{1,12}", key):
        raise ValueError("a logit_bias key must be a token id: an integer of decimal digits")
    return key


LogitBias = Annotated[
    dict[Annotated[int, BeforeValidator(token_id_key), Field(ge=0)], Annotated[float, Field(ge=-100.0, le=100.0)]],
    Field(max_length=MAX_LOGIT_BIAS, description=(
        f"Token id -> bias in [-100, 100] added to its logit before sampling (at most {MAX_LOGIT_BIAS} "
        "ids, each in the model's vocabulary): -100 bans a token, +100 forces it."
    )),
]


class SamplingParams(BaseModel):
    """Per-request generation settings, complete. Temperature 0 means greedy decoding.

    The one declaration of the sampling fields: name, type, bounds, description and the
    engine's default. GenerationDefaults and SamplingOverrides below and the HTTP bodies
    (deployments/http/protocol.py) take their fields from here (`fields_model`), so a new field is
    one line here plus its use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: MaxTokens = 256
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    min_p: MinP = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    seed: Seed | None = None
    stop: StopStrings = Field(default_factory=list)
    stop_token_ids: StopTokenIds = Field(default_factory=list)
    ignore_eos: bool = False
    logit_bias: LogitBias = Field(default_factory=dict)
    # output options (engine/logprobs.py): None means no logprobs; k lists the k most likely beside each
    n: Choices = 1
    logprobs: Logprobs | None = None
    prompt_logprobs: Logprobs | None = None
    echo: bool = False
    grammar: Grammar | None = Field(None, description="What the reply must match (engine/constraints.py).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def uses_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def fields_model(
    name: str, source: type[BaseModel], names: Iterable[str] | None = None, *, optional: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None, base: type[BaseModel] = BaseModel,
) -> type[BaseModel]:
    """A model to inherit from, holding `source`'s fields (all, or `names`, in `source`'s order)
    with their types, bounds and descriptions: a field in `optional` also takes None, its
    default; `defaults` replaces a field's declared default. It belongs to `base`'s module
    (BaseModel: `source`'s)."""
    wanted, optional, defaults = set(names or source.model_fields), set(optional), defaults or {}
    if unknown := (wanted | optional | set(defaults)) - set(source.model_fields):
        raise ValueError(f"{source.__name__} has no fields {sorted(unknown)}")
    fields = {}
    for field_name, info in source.model_fields.items():
        if field_name not in wanted:
            continue
        annotation = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        if field_name in optional:
            fields[field_name] = (annotation | None, Field(None, description=info.description))
        elif field_name in defaults:
            fields[field_name] = (annotation, Field(defaults[field_name], description=info.description))
        elif info.default_factory is not None:
            fields[field_name] = (annotation, Field(default_factory=info.default_factory, description=info.description))
        else:
            fields[field_name] = (annotation, Field(info.default, description=info.description))
    module = (source if base is BaseModel else base).__module__
    return create_model(name, __base__=base, __module__=module, **fields)


SERVER_DEFAULTS = {"max_tokens": 256, "temperature": 0.7, "top_p": 0.95, "top_k": 0, "min_p": 0.0,
                   "repetition_penalty": 1.0}  # the fields the server fills in, and their shipped defaults


class GenerationDefaults(fields_model("GenerationDefaultFields", SamplingParams, SERVER_DEFAULTS,
                                      defaults=SERVER_DEFAULTS)):
    """Server-side defaults for what a request leaves out (serve_config.yaml, `reconfigure`):
    SamplingParams' fields named in SERVER_DEFAULTS."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingOverrides(fields_model("SamplingOverrideFields", SamplingParams, optional=SERVER_DEFAULTS)):
    """What one request sets: SamplingParams' fields, those of GenerationDefaults None unless
    set (None takes the server's default). Resolved once, in the LLM replica (`resolve`), where
    `reconfigure` keeps the defaults current."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def resolve(self, defaults: GenerationDefaults) -> SamplingParams:
        """Complete settings: the request's values where given, else the defaults."""
        fields = {**defaults.model_dump(), **self.model_dump(exclude_none=True, exclude={"grammar"})}
        return SamplingParams(**fields, grammar=self.grammar)
