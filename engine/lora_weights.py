"""A PEFT LoRA adapter read from its folder into host memory, ready for the row pool.

`read_adapter` reads the adapter's files with PEFT's own readers (`PeftConfig.from_pretrained`
for the config, `load_peft_weights` for the tensors) and never touches the model: it may run
on any thread, several at once, while the engine's worker thread runs steps. What it returns,
`HostAdapter`, is immutable:

    weights: base module name (as in `model.named_modules()`, e.g.
             "model.layers.0.self_attn.q_proj") -> (A [r_m, in], B^T * scaling [r_m, out])

on the CPU in the model's dtype (in pinned memory when asked, for asynchronous copies to a
GPU). B is stored transposed with the module's LoRA scaling folded in, the layout of the row
pool (engine/lora.py): row i of the pair is the i-th rank-one piece `x . A[i]` -> `* B^T[i]`.
Each module's rank and alpha come from the config as PEFT computes them: `rank_pattern` and
`alpha_pattern` matched with PEFT's `get_pattern_key`, scaling `alpha / r`, or `alpha / sqrt(r)`
with rsLoRA. `rank` is the largest module rank: the rows the adapter occupies in the pool.

Refused (InvalidRequestError naming the adapter): a config that is not LoRA, LoRA variants
(DoRA and every variant PEFT tags as one), LoRA biases, `modules_to_save`,
`trainable_token_indices`, `target_parameters`, `layer_replication`, weights of anything but a
Linear layer's lora_A / lora_B (embeddings, lm_head, magnitude vectors), a module the model
does not have among `linear_shapes` (module name -> (in, out) of the layers the pool wraps),
shapes that do not fit, and an adapter with no LoRA weights at all.

Threads: the conversions touch small pieces at a time (at most `SERIAL_ELEMENTS` elements per
op), below the size at which torch starts an OpenMP parallel region, so a loader thread never
adds OpenMP threads beside the worker's (engine/engine.py `from_config` says why that hurts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig
from peft.utils import load_peft_weights
from peft.utils.other import get_pattern_key

from engine.errors import InvalidRequestError

PEFT_PREFIX = "base_model.model."
WEIGHT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
SERIAL_ELEMENTS = 16384  # below ATen's parallel grain (32768): such an op runs on the calling thread alone
UNSUPPORTED_FIELDS = ("modules_to_save", "trainable_token_indices", "target_parameters", "layer_replication", "lora_bias")


@dataclass(frozen=True)
class HostAdapter:
    """An adapter's LoRA weights in host memory, laid out for the row pool (module docstring)."""

    name: str
    source: str
    rank: int  # the largest module rank: rows taken in the pool
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r_m, in], B^T * scaling [r_m, out])
    identity: bytes  # name + b"#" + hash of the weights: what the prefix cache keys on

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.weights.values() for t in pair)


def read_adapter(
    name: str, folder: str | Path, linear_shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype,
    pin_memory: bool = False,
) -> HostAdapter:
    """Read the PEFT LoRA adapter in `folder` as `name` (thread-safe; files only, never the model)."""
    source = str(folder)
    config = _read_config(name, source)
    try:
        tensors = load_peft_weights(source, device="cpu")
    except (OSError, ValueError, RuntimeError) as err:
        raise InvalidRequestError(f"cannot load adapter {name!r} from {source!r}: {err}") from err
    pairs = _module_pairs(name, tensors, linear_shapes)
    weights = {}
    for module, (a, b) in pairs.items():
        rank, scaling = module_rank_and_scaling(config, module)
        in_features, out_features = linear_shapes[module]
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise InvalidRequestError(
                f"adapter {name!r}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; the model's layer "
                f"({in_features} -> {out_features}) at rank {rank} needs A {(rank, in_features)} and B {(out_features, rank)}"
            )
        weights[module] = (_converted(a, 1.0, dtype, pin_memory), _converted(b.T, scaling, dtype, pin_memory))
    return HostAdapter(name, source, max(a.shape[0] for a, _ in weights.values()), weights, _identity(name, weights))


def module_rank_and_scaling(config: LoraConfig, module: str) -> tuple[int, float]:
    """A module's rank and LoRA scaling, as PEFT's LoraModel computes them."""
    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return rank, alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _read_config(name: str, source: str) -> LoraConfig:
    """The adapter's LoraConfig, refusing what is not plain per-token LoRA on Linear layers."""
    try:
        config = PeftConfig.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise InvalidRequestError(f"cannot load adapter {name!r} from {source!r}: {err}") from err
    if not isinstance(config, LoraConfig):
        raise InvalidRequestError(f"adapter {name!r} is not a LoRA adapter ({config.peft_type})")
    for field_name in UNSUPPORTED_FIELDS:
        if getattr(config, field_name, None):
            raise InvalidRequestError(f"adapter {name!r}: {field_name} is not supported")
    if variants := lora_variants(config):
        raise InvalidRequestError(f"adapter {name!r}: LoRA variants are not supported ({', '.join(variants)})")
    return config


def lora_variants(config: LoraConfig) -> list[str]:
    """The LoRA variants (DoRA, ...) a config asks for, by the field metadata PEFT resolves them with."""
    variants = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.metadata.get("is_lora_variant") and value:
            variants.append(field.name)
        elif field.name == "init_lora_weights" and value in field.metadata.get("lora_variants", ()):
            variants.append(f"init_lora_weights={value}")
    return variants


def _module_pairs(
    name: str, tensors: Mapping[str, torch.Tensor], linear_shapes: Mapping[str, tuple[int, int]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{base module name: (lora_A weight, lora_B weight)} from a PEFT state dict's keys."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = WEIGHT_KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise InvalidRequestError(
                f"adapter {name!r}: only plain LoRA on Linear layers inside the model is supported "
                f"(not DoRA, LoRA bias, embeddings or lm_head; found {key})"
            )
        module = match["module"]
        if module not in linear_shapes:
            raise InvalidRequestError(
                f"adapter {name!r} targets {module}, which is not a Linear layer of this model that takes "
                "LoRA (embeddings and lm_head are not supported)"
            )
        found.setdefault(module, {})[match["which"]] = tensor
    if not found:
        raise InvalidRequestError(f"adapter {name!r} has no LoRA layers")
    if incomplete := sorted(m for m, pair in found.items() if len(pair) != 2):
        raise InvalidRequestError(f"adapter {name!r}: {incomplete[0]} lacks lora_A or lora_B")
    return {module: (pair["A"], pair["B"]) for module, pair in found.items()}


def _converted(tensor: torch.Tensor, scaling: float, dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
    """`tensor * scaling` as a new contiguous `dtype` tensor, a few rows per op (module docstring)."""
    out = torch.empty(tensor.shape, dtype=dtype, pin_memory=pin_memory)
    step = max(1, SERIAL_ELEMENTS // max(1, tensor.shape[1]))
    for first in range(0, tensor.shape[0], step):
        part = tensor[first : first + step]
        out[first : first + step].copy_(part * scaling if scaling != 1.0 else part)
    return out


def _identity(name: str, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> bytes:
    """Name plus a hash of every weight: a reload under the same name with new weights differs."""
    digest = hashlib.blake2b(name.encode(), digest_size=16)
    for module in sorted(weights):
        digest.update(module.encode())
        for tensor in weights[module]:
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return name.encode() + b"#" + digest.digest()
