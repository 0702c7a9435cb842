"""Sibling Linear layers that read the same input, computed as one packed matmul.

A decoder layer calls q_proj, k_proj and v_proj on the same hidden states, and gate_proj and
up_proj on the same input of the MLP. On the CPU (bf16, oneDNN-packed weights) each call has a
fixed cost that dominates at decode sizes, so one call over the concatenated weight is faster
(bench/README.md, Design notes). The results are bitwise equal (each output column is the same
dot product).

`FusedProjection` holds the packed concatenated weight of a group. The first member called
with a new input computes the whole group's output once; every member returns its own
columns of it (a view: LoRA adds into it in place, each member into its own columns). Once
every member has taken its part, the group drops the input and output, so nothing is kept
between forwards and a later input can never be served a stale output.

The model's module structure stays as transformers built it; only the members' forward
(engine/lora.py `LoraLinear`) asks the group for its part. Used only with `prepack` (the
packed copies exist there anyway; the fused copy replaces the members' own).

Thread: the engine's worker thread, inside a forward pass.
"""

from __future__ import annotations

import torch

# Names of sibling layers that one parent module calls on the same input, in call order.
FUSABLE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedProjection:
    """One packed matmul for a group of Linear layers (same input, same dtype, bias alike)."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat([w.detach() for w in weights]), 16)
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        bounds = [0]
        for weight in weights:
            bounds.append(bounds[-1] + weight.shape[0])
        self.columns = [(bounds[i], bounds[i + 1]) for i in range(len(weights))]
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._taken: set[int] = set()

    @staticmethod
    def can_fuse(layers: list[torch.nn.Linear]) -> bool:
        first = layers[0]
        return all(
            layer.in_features == first.in_features and layer.weight.dtype == first.weight.dtype
            and layer.weight.device == first.weight.device and (layer.bias is None) == (first.bias is None)
            for layer in layers
        )

    def output(self, member: int, x: torch.Tensor) -> torch.Tensor:
        """Member `member`'s output for input `x`: its columns of the group's output."""
        if self._input is not x or member in self._taken:
            self._output = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            self._input, self._taken = x, set()
        output = self._output
        self._taken.add(member)
        if len(self._taken) == len(self.columns):
            self._input = self._output = None
        start, stop = self.columns[member]
        return output[..., start:stop]
