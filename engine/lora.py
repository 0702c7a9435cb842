"""LoRA adapters on one base model, applied per token segment of a packed forward.

The engine runs every scheduled token of every request as one packed row, sorted so that
the tokens of each adapter are contiguous (`LoraContext.segments`). PEFT does the reading:
config, target modules, rank and alpha patterns, weights. After PEFT injects an adapter, the
registry takes each target layer's A and B matrices and scaling, removes PEFT's wrappers again
(`unload()`), and puts a `LoraLinear` in the place of each targeted `nn.Linear`. It computes the
base layer for all tokens, then adds `B(A(x)) * scaling` to each adapter's segment only, as
S-LoRA and Punica do (with a loop over segments instead of their fused kernels). A step of
base-model rows pays one Python call per wrapped layer, not PEFT's per-row bookkeeping.

Adapters whose output is not a per-token function of a Linear layer's input are refused:
DoRA and other LoRA variants, LoRA biases, embedding or lm_head targets, `modules_to_save`.

Each adapter has an identity (its name and a hash of its weights) that the prefix cache puts
into its block keys, so KV computed under one adapter is never reused under another, nor
under a reload of the same name with other weights.

Thread: the engine calls `load`/`unload` on its worker thread between steps, and the runner
sets `context.segments` before each forward on the same thread.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from engine.errors import InvalidRequestError, UnknownAdapterError
from engine.fused_linear import FUSABLE_GROUPS, FusedProjection

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraContext:
    """What the LoRA layers need to know about the current forward: (adapter, start, stop)
    token ranges of the packed row; tokens outside every segment use the base model."""

    segments: list[tuple[str, int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class LoraWeights:
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    scaling: float


class LoraLinear(torch.nn.Linear):
    """A Linear layer (sharing the base layer's parameters) that adds each segment's LoRA.

    With `prepack`, the base matmul uses a copy of the weight in oneDNN's blocked layout:
    on this CPU (bf16) 1.6-1.9x faster than `F.linear` on weights that are not in cache, and
    bitwise equal to it. It costs the weight's memory again. Sibling layers that read the same
    input share one packed matmul (`fused`, engine/fused_linear.py)."""

    def __init__(self, base: torch.nn.Linear, context: LoraContext, prepack: bool = False):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.context = context
        self.adapters: dict[str, LoraWeights] = {}
        self.packed = torch.ops.mkldnn._reorder_linear_weight(base.weight.detach(), 16) if prepack else None
        self.fused: tuple[FusedProjection, int] | None = None  # (group, member index): see fuse_siblings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            group, member = self.fused
            out = group.output(member, x)
        elif self.packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        else:
            out = F.linear(x, self.weight, self.bias)
        for name, start, stop in self.context.segments:
            lora = self.adapters.get(name)
            if lora is not None:
                out[:, start:stop] += F.linear(F.linear(x[:, start:stop], lora.a), lora.b) * lora.scaling
        return out

    def as_linear(self) -> torch.nn.Linear:
        """A plain Linear with the same parameters (what PEFT expects to wrap)."""
        linear = torch.nn.Linear(0, 0, bias=False, device="meta")
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear


class AdapterRegistry:
    """The LoRA adapters loaded on a base model, by name."""

    def __init__(self, model: PreTrainedModel, hf_token: str | None = None, prepack: bool = False):
        """Wraps every Linear layer of `model` (see LoraLinear); `prepack` as there."""
        self._model = model
        self._hf_token = hf_token
        self.context = LoraContext()
        self._sources: dict[str, str] = {}
        self._identities: dict[str, bytes] = {}
        self._layers: dict[str, LoraLinear] = {}  # module name -> wrapper
        linears = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]
        for name in linears:
            self._wrapper(name, prepack)
        if prepack:
            fuse_siblings(model)

    @property
    def names(self) -> list[str]:
        return list(self._sources)

    def source(self, name: str) -> str:
        return self._sources[name]

    def identity(self, name: str | None) -> bytes:
        """What the prefix cache keys on: b"" for the base model, else name and weights hash."""
        return b"" if name is None else self._identities[name]

    def check(self, name: str | None) -> None:
        """Raise UnknownAdapterError unless `name` is None (the base model) or loaded."""
        if name is not None and name not in self._sources:
            loaded = ", ".join(self._sources) or "none"
            raise UnknownAdapterError(f"adapter {name!r} is not loaded (loaded: {loaded})")

    def load(self, name: str, source: str) -> None:
        """Load a PEFT LoRA adapter from a folder or hub id under `name` (same source: no-op)."""
        if not ADAPTER_NAME.match(name):
            raise InvalidRequestError(f"invalid adapter name {name!r}")
        if name in self._sources:
            if self._sources[name] == source:
                return
            raise InvalidRequestError(f"adapter {name!r} is already loaded from {self._sources[name]}")
        weights = self._read_with_peft(name, source)
        for module_name, lora in weights.items():
            self._wrapper(module_name).adapters[name] = lora
        self._sources[name] = source
        self._identities[name] = adapter_identity(name, weights)

    def unload(self, name: str) -> None:
        """Forget a loaded adapter's weights; the caller ensures no row still uses it."""
        self.check(name)
        for layer in self._layers.values():
            layer.adapters.pop(name, None)
        del self._sources[name], self._identities[name]

    def _read_with_peft(self, name: str, source: str) -> dict[str, LoraWeights]:
        """Let PEFT inject the adapter into the plain model, take its weights, remove PEFT."""
        self._swap_wrappers(to_plain=True)
        try:
            try:
                peft_model = PeftModel.from_pretrained(self._model, source, adapter_name=name, token=self._hf_token)
            except (OSError, ValueError) as err:
                raise InvalidRequestError(f"cannot load adapter {name!r} from {source!r}: {err}") from err
            try:
                return extract_lora_weights(peft_model, name, self._model.dtype)
            finally:
                peft_model.unload()
        finally:
            self._swap_wrappers(to_plain=False)

    def _wrapper(self, module_name: str, prepack: bool = False) -> LoraLinear:
        layer = self._layers.get(module_name)
        if layer is None:
            base = self._model.get_submodule(module_name)
            layer = self._layers[module_name] = LoraLinear(base, self.context, prepack)
            self._model.set_submodule(module_name, layer)
        return layer

    def _swap_wrappers(self, to_plain: bool) -> None:
        """Put plain Linear layers (for PEFT to wrap) or our wrappers in the targeted places."""
        for module_name, layer in self._layers.items():
            self._model.set_submodule(module_name, layer.as_linear() if to_plain else layer)


def fuse_siblings(model: torch.nn.Module) -> None:
    """Give each group of packed sibling layers (q/k/v, gate/up: FUSABLE_GROUPS) one matmul
    (engine/fused_linear.py); the members' own packed copies are dropped."""
    for parent in model.modules():
        for names in FUSABLE_GROUPS:
            members = [getattr(parent, name, None) for name in names]
            if not all(isinstance(m, LoraLinear) and m.packed is not None for m in members):
                continue
            if not FusedProjection.can_fuse(members):
                continue
            group = FusedProjection([m.weight for m in members], [m.bias for m in members])
            for index, member in enumerate(members):
                member.fused, member.packed = (group, index), None


def extract_lora_weights(peft_model: PeftModel, name: str, dtype: torch.dtype) -> dict[str, LoraWeights]:
    """{base module name: weights} of adapter `name`, refusing what is not plain per-token LoRA."""
    config = peft_model.peft_config[name]
    for unsupported in ("modules_to_save", "trainable_token_indices"):
        if getattr(config, unsupported, None):
            raise InvalidRequestError(f"adapter {name!r}: {unsupported} is not supported")
    weights = {}
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or name not in module.scaling:
            continue
        base_name = module_name.removeprefix(PEFT_PREFIX)
        if (
            name not in module.lora_A or name in module.lora_variant or module.lora_bias.get(name)
            or not isinstance(module.get_base_layer(), torch.nn.Linear) or base_name.endswith("lm_head")
        ):
            raise InvalidRequestError(
                f"adapter {name!r}: only plain LoRA on Linear layers inside the model is supported "
                f"(not DoRA, LoRA bias, embeddings or lm_head; found {base_name})"
            )
        a = module.lora_A[name].weight.detach().to(dtype).contiguous()
        b = module.lora_B[name].weight.detach().to(dtype).contiguous()
        weights[base_name] = LoraWeights(a, b, float(module.scaling[name]))
    if not weights:
        raise InvalidRequestError(f"adapter {name!r} has no LoRA layers")
    return weights


def adapter_identity(name: str, weights: dict[str, LoraWeights]) -> bytes:
    """Name plus a hash of every weight: a reload under the same name with new weights differs."""
    digest = hashlib.blake2b(name.encode(), digest_size=16)
    for module_name in sorted(weights):
        lora = weights[module_name]
        digest.update(module_name.encode())
        digest.update(repr(lora.scaling).encode())
        for tensor in (lora.a, lora.b):
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return name.encode() + b"#" + digest.digest()
