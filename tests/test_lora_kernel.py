"""The CPU LoRA kernel (engine/csrc/lora_kernel.cpp, engine/lora_kernel.py): its ops against a
float64 reference on random row pools (mixed ranks, base tokens, sibling members, strided
outputs), the engine's two paths against each other and PEFT on a tiny random Llama (fp32, and
bf16 with fused siblings), the plan's kernel tables, and the setting that picks the path."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from engine.config import EngineConfig, SamplingParams
from engine.lora import KernelFusedProjection, LoraLayers
from engine.lora_kernel import LoraKernel, build, kernel_for, load_kernel
from engine.lora_plan import KERNEL_WORK, LoraStep, Placement
from engine.lora_weights import read_adapter
from engine.request import GenerationRequest
from tests.tiny_models import ids, save_tiny_adapter

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (atol, rtol) of the kernel against a float64 reference: float32 sums, and the output's rounding
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1e-6, 2**-8), torch.float16: (1e-6, 2**-10)}


@pytest.fixture(scope="module")
def kernel() -> LoraKernel:
    ops = load_kernel()
    if ops is None:
        pytest.skip("the LoRA kernel does not build here (no C++ compiler or ninja)")
    return ops


# ----- the ops ------------------------------------------------------------------------------


def reference(out, x, a_rows, b_rows, columns, first, rank, start) -> torch.Tensor:
    """out + every token's LoRA, in float64, out [tokens, columns], x [tokens, in]."""
    result = out.double()
    for t, (f, r) in enumerate(zip(first.tolist(), rank.tolist())):
        for m, b in enumerate(b_rows):
            h = a_rows[f : f + r, m].double() @ x[start + t].double()
            result[start + t, columns[m] : columns[m] + b.shape[1]] += h @ b[f : f + r].double()
    return result


def random_pool(dtype: torch.dtype, seed: int = 0):
    """Three members (in 70: whole vector chunks and a tail), outs 96 / 40 / 33, a pool of
    adapters of ranks 8, 16, 32, 64, 12 and 3; 19 tokens from `start` 2: runs of one adapter
    longer and shorter than a block (4), base tokens (rank 0) among them."""
    generator = torch.Generator().manual_seed(seed)
    ranks = [8, 16, 32, 64, 12, 3]
    starts = [1]
    for r in ranks:
        starts.append(starts[-1] + r)
    rows, members, width = starts[-1], 3, 70
    a_rows = torch.randn(rows, members, width, generator=generator).to(dtype)
    b_rows = [torch.randn(rows, n, generator=generator).to(dtype) for n in (96, 40, 33)]
    a_rows[0] = 0
    for b in b_rows:
        b[0] = 0
    adapter_of_token = [0, 0, 0, 0, 0, 0, None, 1, 1, 2, None, None, 3, 3, 3, 4, 5, 5, 0]
    first = torch.tensor([0 if a is None else starts[a] for a in adapter_of_token], dtype=torch.int32)
    rank = torch.tensor([0 if a is None else ranks[a] for a in adapter_of_token], dtype=torch.int32)
    x = torch.randn(1, 2 + len(first) + 3, width, generator=generator).to(dtype)  # tokens outside the range too
    wide = torch.randn(x.shape[1], 8 + 96 + 40 + 33 + 5, generator=generator).to(dtype)
    return a_rows, b_rows, first, rank, x, wide


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_lora_matches_a_float64_reference(kernel, dtype):
    """Members writing their own columns of a strided output (a column slice), x as [1, T, in];
    tokens outside [start, start + n), rank-0 tokens and columns outside stay bit for bit."""
    a_rows, b_rows, first, rank, x, wide = random_pool(dtype)
    out = wide[:, 8:-5]  # [T, 169], row stride 182
    columns = [0, 96, 136]
    expected = reference(out, x[0], a_rows, b_rows, columns, first, rank, 2)
    before = wide.clone()
    kernel.add_lora_(out, x, a_rows, b_rows, columns, first, rank, 2)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    untouched = torch.ones(wide.shape, dtype=torch.bool)
    untouched[2 : 2 + len(first)][rank > 0, 8:-5] = False
    assert torch.equal(wide[untouched], before[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_member_at_a_time_equals_the_group(kernel, dtype):
    """What a LoraLinear does alone (its A rows as a [P + 1, 1, in] view, its own output) is
    what the fused group's one call does for it."""
    a_rows, b_rows, first, rank, x, wide = random_pool(dtype, seed=1)
    group = wide[:, :169].clone()
    kernel.add_lora_(group, x, a_rows, b_rows, [0, 96, 136], first, rank, 2)
    for m, (b, column) in enumerate(zip(b_rows, [0, 96, 136])):
        own = wide[:, column : column + b.shape[1]].clone()
        kernel.add_lora_(own, x, a_rows[:, m : m + 1], [b], [0], first, rank, 2)
        assert torch.equal(own, group[:, column : column + b.shape[1]])


def test_shrink_then_expand_is_add_lora_and_zero_past_each_rank(kernel):
    a_rows, b_rows, first, rank, x, wide = random_pool(torch.bfloat16, seed=2)
    h = kernel.shrink(x, a_rows, first, rank, 2, 64)
    assert h.shape == (3, len(first), 64) and h.dtype == torch.float32
    for t, r in enumerate(rank.tolist()):
        assert not h[:, t, r:].any()
        expected = torch.einsum("rmk,k->mr", a_rows[first[t] : first[t] + r].double(), x[0, 2 + t].double())
        torch.testing.assert_close(h[:, t, :r].double(), expected, atol=1e-4, rtol=1e-5)
    out, fused = wide[:, :169].clone(), wide[:, :169].clone()
    kernel.expand_(out, h, b_rows, [0, 96, 136], first, rank, 2)
    kernel.add_lora_(fused, x, a_rows, b_rows, [0, 96, 136], first, rank, 2)
    assert torch.equal(out, fused)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_value_survives_a_zero_lora(kernel, dtype):
    """All 65,536 bit patterns as the output, plus a LoRA of zeros (row 0): each value is
    widened and rounded back unchanged (-0 becomes +0 as with `add_`, NaNs stay NaN)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    out = bits.view(dtype).reshape(2048, 32).clone()
    x = torch.randn(2048, 64).to(dtype)
    a_rows, b_rows = torch.zeros(2, 1, 64, dtype=dtype), [torch.zeros(2, 32, dtype=dtype)]
    kernel.add_lora_(out, x, a_rows, b_rows, [0], torch.zeros(2048, dtype=torch.int32),
                     torch.ones(2048, dtype=torch.int32), 0)
    before, after = bits.view(dtype).reshape(2048, 32), out
    nan = before.isnan()
    assert torch.equal(after.isnan(), nan)
    same = ~nan & (before != 0)
    assert torch.equal(after.view(torch.int16)[same], before.view(torch.int16)[same])
    assert not after[before == 0].view(torch.int16).any()  # +0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_outputs_round_to_nearest_even_as_torch_does(kernel, dtype):
    """Products that float32 holds exactly (x * a * b; for float16 b a power of two), so the
    only rounding is the output's: equal, bit for bit, to torch's own conversion, through
    subnormals, ties and overflow to infinity."""
    generator = torch.Generator().manual_seed(7)
    tokens, columns = 64, 96  # three vector chunks of 32 per row, no tail
    x, a_rows = torch.zeros(tokens, 64, dtype=dtype), torch.zeros(2, 1, 64, dtype=dtype)
    x[:, 0] = (torch.randn(tokens, generator=generator) * 2.0 ** torch.randint(-12, 12, (tokens,), generator=generator)).to(dtype)
    a_rows[1, 0, 0] = 1.5
    if dtype == torch.bfloat16:
        b = torch.randn(columns, generator=generator) * 2.0 ** torch.randint(-120, 120, (columns,), generator=generator)
    else:
        b = torch.sign(torch.randn(columns, generator=generator)) * 2.0 ** torch.randint(-30, 12, (columns,), generator=generator)
    b_rows = [torch.zeros(2, columns, dtype=dtype)]
    b_rows[0][1] = b.to(dtype)
    out = torch.zeros(tokens, columns, dtype=dtype)
    kernel.add_lora_(out, x, a_rows, b_rows, [0], torch.ones(tokens, dtype=torch.int32),
                     torch.ones(tokens, dtype=torch.int32), 0)
    h = x[:, :1].float() * a_rows[1, 0, 0].float()
    expected = (h * b_rows[0][1].float()).to(dtype)
    assert expected.isinf().any() and (expected.abs() < torch.finfo(dtype).tiny).any()  # the cases are there
    nonzero = expected != 0  # zeros may differ in sign: a sum of products starts at +0
    assert torch.equal(out.view(torch.int16)[nonzero], expected.view(torch.int16)[nonzero])
    assert (out[~nonzero] == 0).all()


def test_calls_with_no_lora_tokens_change_nothing(kernel):
    a_rows, b_rows, first, rank, x, wide = random_pool(torch.float32)
    out = wide[:, :169].clone()
    kernel.add_lora_(out, x, a_rows, b_rows, [0, 96, 136], first[:0], rank[:0], 0)
    kernel.add_lora_(out, x, a_rows, b_rows, [0, 96, 136], first, torch.zeros_like(rank), 2)
    assert torch.equal(out, wide[:, :169])
    assert kernel.shrink(x, a_rows, first[:0], rank[:0], 0, 8).shape == (3, 0, 8)


@pytest.mark.parametrize("change, message", [
    ({"first": torch.tensor([100], dtype=torch.int32), "rank": torch.tensor([64], dtype=torch.int32)}, "outside the pool"),
    ({"first": torch.tensor([1]), "rank": torch.tensor([8])}, "must be int32"),
    ({"start": 24}, "outside x"),
    ({"columns": [0, 96, 140]}, "outside out"),
    ({"x": torch.zeros(1, 24, 70, dtype=torch.float64)}, "share a dtype"),
    ({"b_rows": "two"}, "members"),
])
def test_bad_calls_are_refused_with_a_reason(kernel, change, message):
    a_rows, b_rows, first, rank, x, wide = random_pool(torch.float32)
    args = {"out": wide[:, :169], "x": x, "a_rows": a_rows, "b_rows": b_rows, "columns": [0, 96, 136],
            "first": first[:1], "rank": rank[:1], "start": 2, **change}
    if args["b_rows"] == "two":
        args["b_rows"], args["columns"] = b_rows[:2], [0, 96]
    with pytest.raises(RuntimeError, match=message):
        kernel.add_lora_(*args.values())


# ----- the plan ---------------------------------------------------------------------------


def test_the_kernel_plan_lists_each_tokens_rows_and_keeps_heavy_spans_as_segments():
    cpu = torch.device("cpu")
    a, b, c = Placement(1, 8, 8), Placement(9, 12, 16), Placement(21, 64, 64)
    long = -(-KERNEL_WORK // 64)  # tokens of c from which c's span is a segment
    plan = LoraStep.build([(2, 3, a), (3, 5, b), (5, 5 + long, c), (5 + long, 6 + long, a)], cpu, kernel=True)
    assert [(s.start, s.stop, s.first_row, s.rank) for s in plan.segments] == [(5, 5 + long, 21, 64)]
    assert not plan.gathers and plan.kernel.start == 2
    assert plan.kernel.first.dtype == plan.kernel.rank.dtype == torch.int32
    assert plan.kernel.first.tolist() == [1, 9, 9] + [0] * long + [1]
    assert plan.kernel.rank.tolist() == [8, 12, 12] + [0] * long + [8]  # the segment's tokens: none here
    shorter = LoraStep.build([(0, long - 1, c)], cpu, kernel=True)
    assert not shorter.segments and shorter.kernel.rank.tolist() == [64] * (long - 1)
    assert LoraStep.build([(0, 1, a)], cpu).kernel is None  # the torch path's plan


# ----- the engine: both paths, PEFT -------------------------------------------------------


@pytest.fixture(scope="module")
def ranked_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Ranks 8, 16, 32, 64 and 12, each on some layers only."""
    root = tmp_path_factory.mktemp("kernel-adapters")
    specs = {"r8": (8, ("q_proj", "v_proj")), "r16": (16, ALL_LINEAR), "r32": (32, ("o_proj", "down_proj")),
             "r64": (64, ("gate_proj", "up_proj", "k_proj")), "r12": (12, ("q_proj", "k_proj", "v_proj", "up_proj"))}
    return {name: save_tiny_adapter(tiny_model_dir, root / name, seed=20 + i, targets=targets, rank=rank)
            for i, (name, (rank, targets)) in enumerate(specs.items())}


def sampled_logits(engine, plans: list[LoraStep]) -> list[tuple[str | None, list[int], torch.Tensor]]:
    """Per sampled row of every step from now on: (adapter, tokens so far, logits); each
    step's LoRA plan goes to `plans`."""
    runner, seen = engine.core.runner, []
    run, lora_step = runner.run, runner.lora_step
    runner.lora_step = lambda chunks, sequences: plans.append(lora_step(chunks, sequences)) or plans[-1]

    def recorded(chunks):
        out = run(chunks)
        stops = {id(c.row): c.start + c.length for c in chunks}
        seen.extend((r.request.adapter, r.token_range(0, stops[id(r)]), logits) for r, logits in zip(out.rows, out.logits))
        return out

    runner.run = recorded
    return seen


async def decode(engine, adapters: dict[str, Path], rows: list[str | None], plans: list[LoraStep]) -> list:
    for name, folder in adapters.items():
        await engine.load_adapter(name, str(folder))
    seen = sampled_logits(engine, plans)
    prompt = ids(engine, "The quick brown fox")
    for i, adapter in enumerate(rows):
        engine.core.add(engine.new_row(GenerationRequest(prompt + [50 + i], GREEDY, adapter)))
    for _ in range(GREEDY.max_tokens):
        engine.core.step()
    return seen


ROWS = [None, "r8", "r8", "r8", "r8", "r8", "r16", "r32", None, "r64", "r12", "r12", "r16"]


async def test_kernel_and_torch_paths_give_peft_logits_in_fp32(kernel, make_engine, ranked_adapters, tiny_model_dir):
    """Thirteen rows (base rows among them, six of one adapter: more than a block) prefill
    and decode: the kernel's logits equal the torch path's and PEFT's for the same tokens.
    The default setting runs the kernel; "torch" runs torch ops (gathered rank classes) only."""
    with_kernel = make_engine(max_batch_size=16)
    with_torch = make_engine(max_batch_size=16, lora_kernel="torch")
    assert with_kernel.lora.kernel is kernel and with_torch.lora.kernel is None
    assert not any(layer.kernel or layer.group_kernel for layer in with_torch.lora.layers.values())
    kernel_plans, torch_plans = [], []
    kernel_rows = await decode(with_kernel, ranked_adapters, ROWS, kernel_plans)
    torch_rows = await decode(with_torch, ranked_adapters, ROWS, torch_plans)
    assert len(kernel_rows) == len(torch_rows) == len(ROWS) * GREEDY.max_tokens
    assert all(p.kernel is not None and not p.gathers and not p.segments for p in kernel_plans)
    assert all(p.kernel is None and p.gathers for p in torch_plans) and len(torch_plans) == len(kernel_plans)
    peft = {None: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()}
    for name, folder in ranked_adapters.items():
        peft[name] = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), folder).eval()
    with torch.inference_mode():
        for (adapter, tokens, logits), (other, other_tokens, other_logits) in zip(kernel_rows, torch_rows):
            assert (adapter, tokens) == (other, other_tokens)
            # fp32 sums in another order through two layers of strong adapters: up to 6e-5 of logits near 4
            torch.testing.assert_close(logits, other_logits, rtol=1e-5, atol=1e-4)
            expected = peft[adapter](input_ids=torch.tensor([tokens])).logits[0, -1]
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)


def lora_logits(model_dir: Path, adapters: dict[str, Path], dtype: torch.dtype, prepack: bool,
                rows: list[str | None], input_ids: torch.Tensor) -> tuple[LoraLayers, dict[str, torch.Tensor]]:
    """The tiny model's logits for `input_ids`, token t on adapter rows[t], on each path
    ("kernel", "torch") and without adapters ("base"), in float32."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    layers = LoraLayers(model, 2**22, 8, prepack=prepack)
    placed = {name: layers.place(read_adapter(name, folder, layers.linear_shapes, dtype))
              for name, folder in adapters.items()}
    runs = [(t, t + 1, placed[name]) for t, name in enumerate(rows) if name is not None]
    plans = {"kernel": LoraStep.build(runs, torch.device("cpu"), kernel=True),
             "torch": LoraStep.build(runs, torch.device("cpu")), "base": LoraStep()}
    logits = {}
    with torch.inference_mode():
        for path, plan in plans.items():
            layers.context.step = plan
            logits[path] = model(input_ids=input_ids).logits[0].float()
    layers.context.step = LoraStep()
    return layers, logits


def test_bf16_fused_siblings_equal_single_calls_and_are_as_close_to_fp32_as_torch_ops(kernel, tiny_model_dir,
                                                                                      ranked_adapters):
    """bf16 with packed weights: q/k/v and gate/up each get their LoRA from one kernel call
    (KernelFusedProjection), bit for bit what one call per member gives without packing. Its
    logits are as close to the fp32 model's as the torch path's in bf16 (the kernel keeps each
    token's shrink in float32 and rounds once; torch rounds the shrink and the expand)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("packed weights need oneDNN")
    rows = [None, "r8", "r8", "r8", "r8", "r8", "r16", "r32", None, "r64", "r12", "r12"]
    input_ids = torch.randint(5, 300, (1, len(rows)), generator=torch.Generator().manual_seed(3))
    packed_layers, packed = lora_logits(tiny_model_dir, ranked_adapters, torch.bfloat16, True, rows, input_ids)
    q_proj = packed_layers.layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(q_proj.fused[0], KernelFusedProjection) and q_proj.group_kernel
    plain_layers, plain = lora_logits(tiny_model_dir, ranked_adapters, torch.bfloat16, False, rows, input_ids)
    assert not any(layer.group_kernel for layer in plain_layers.layers.values())
    assert torch.equal(packed["kernel"], plain["kernel"])
    _, fp32 = lora_logits(tiny_model_dir, ranked_adapters, torch.float32, False, rows, input_ids)
    torch.testing.assert_close(fp32["kernel"], fp32["torch"], rtol=1e-5, atol=1e-5)
    kernel_error = (packed["kernel"] - fp32["kernel"]).abs()
    torch_error = (packed["torch"] - fp32["kernel"]).abs()
    assert kernel_error.mean() <= 1.1 * torch_error.mean()
    scale = fp32["kernel"].abs().max()
    assert kernel_error.max() < 0.05 * scale
    assert (fp32["kernel"] - fp32["base"]).abs().max() > 0.5 * scale  # the adapters matter at these tolerances


# ----- the setting ------------------------------------------------------------------------


def test_the_setting_is_validated_and_picks_the_path(kernel):
    assert EngineConfig().lora_kernel == "auto"
    with pytest.raises(ValidationError, match="lora_kernel"):
        EngineConfig(lora_kernel="triton")
    cpu = torch.device("cpu")
    assert kernel_for("auto", cpu, torch.bfloat16) is kernel and kernel_for("auto", cpu, torch.float32) is kernel
    assert kernel_for("torch", cpu, torch.bfloat16) is None
    assert kernel_for("auto", torch.device("cuda"), torch.bfloat16) is None  # the GPU keeps torch ops
    assert kernel_for("auto", cpu, torch.float64) is None
    with pytest.raises(ValueError, match="'auto' or 'torch'"):
        kernel_for("fast", cpu, torch.float32)


def test_a_failed_build_falls_back_with_one_warning(tmp_path, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++;\n")
    with caplog.at_level(logging.WARNING, logger="engine.lora_kernel"):
        assert build("lora_serve_broken_test", (broken,), build_directory=tmp_path) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "using the torch path" in warnings[0].getMessage()
