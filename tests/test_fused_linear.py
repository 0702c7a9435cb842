"""Sibling Linear layers as one packed matmul (engine/fused_linear.py): same bits, no stale output."""

from __future__ import annotations

import torch

from engine.fused_linear import FusedProjection


def packed_linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 16)
    return torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")


def layers(bias: bool) -> list[torch.nn.Linear]:
    torch.manual_seed(0)
    return [torch.nn.Linear(64, out, bias=bias).to(torch.bfloat16) for out in (64, 32, 32)]


def test_each_member_gets_bitwise_its_own_layer_output_with_and_without_bias():
    x = torch.randn(1, 7, 64, dtype=torch.bfloat16)
    for bias in (False, True):
        members = layers(bias)
        group = FusedProjection([m.weight for m in members], [m.bias for m in members])
        with torch.inference_mode():
            for index, member in enumerate(members):
                assert torch.equal(group.output(index, x), packed_linear(x, member))


def test_a_new_input_is_computed_afresh_and_nothing_is_kept_after_the_last_member():
    members = layers(False)
    group = FusedProjection([m.weight for m in members], [m.bias for m in members])
    first, second = torch.randn(2, 1, 3, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        group.output(0, first)
        assert torch.equal(group.output(0, second), packed_linear(second, members[0]))  # not first's
        group.output(1, second)
        assert group._input is second
        group.output(2, second)
        assert group._input is None and group._output is None  # dropped once all took their part
        assert torch.equal(group.output(1, first), packed_linear(first, members[1]))


def test_layers_that_differ_are_not_fused():
    a, b = torch.nn.Linear(64, 8), torch.nn.Linear(64, 8, bias=False)
    assert not FusedProjection.can_fuse([a, b])
    assert not FusedProjection.can_fuse([a, torch.nn.Linear(32, 8)])
    assert FusedProjection.can_fuse([a, torch.nn.Linear(64, 16)])
