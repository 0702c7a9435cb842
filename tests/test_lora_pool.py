"""The LoRA row pool (engine/lora.py, lora_plan.py, lora_weights.py) on a tiny random Llama in
fp32: outputs equal PEFT's, rows are placed, freed and reused, adapters PEFT would load
differently are refused, and scaling follows PEFT's rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from engine.config import SamplingParams
from engine.errors import InvalidRequestError
from engine.lora import LoraLayers
from engine import lora_plan
from engine.lora_plan import LONG_RUN, LoraStep, Placement, rank_class
from engine.lora_weights import read_adapter
from engine.request import GenerationRequest
from tests.tiny_models import LONG_TEXT, ids, save_tiny_adapter

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="session")
def mixed_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Rank 8 on q/v; 16 on every layer; max rank 12 through rank_pattern (other modules 8),
    with alpha_pattern; 64 on the MLP; rank 8 with rsLoRA."""
    root = tmp_path_factory.mktemp("mixed-adapters")
    return {
        "r8": save_tiny_adapter(tiny_model_dir, root / "r8", seed=11),
        "r16": save_tiny_adapter(tiny_model_dir, root / "r16", seed=12, targets=ALL_LINEAR, rank=16),
        "r12": save_tiny_adapter(tiny_model_dir, root / "r12", seed=13, targets=ALL_LINEAR, rank=8,
                                 rank_pattern={"o_proj": 12, "up_proj": 12}, alpha_pattern={"q_proj": 5}),
        "r64": save_tiny_adapter(tiny_model_dir, root / "r64", seed=14, targets=("gate_proj", "up_proj", "down_proj"),
                                 rank=64, lora_alpha=32),
        "rs": save_tiny_adapter(tiny_model_dir, root / "rs", seed=15, targets=ALL_LINEAR, use_rslora=True),
    }


@pytest.fixture(scope="session")
def peft_models(tiny_model_dir, mixed_adapters):
    """The base model and one PeftModel per adapter, loaded apart from the engine."""
    models = {None: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()}
    for name, folder in mixed_adapters.items():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        models[name] = PeftModel.from_pretrained(base, folder).eval()
    return models


def recording_runner(engine) -> list[tuple[LoraStep, list[tuple[str | None, list[int], torch.Tensor]]]]:
    """Wrap the runner: each step's plan and, per sampled row, (adapter, tokens so far, logits)."""
    runner, steps = engine.core.runner, []
    run, lora_step = runner.run, runner.lora_step
    plans = []
    runner.lora_step = lambda chunks, sequences: plans.append(lora_step(chunks, sequences)) or plans[-1]

    def recorded(chunks):
        out = run(chunks)
        stops = {id(c.row): c.start + c.length for c in chunks}
        rows = [(r.request.adapter, r.token_range(0, stops[id(r)]), logits) for r, logits in zip(out.rows, out.logits)]
        steps.append((plans[-1], rows))
        return out

    runner.run = recorded
    return steps


@pytest.mark.parametrize("lora_kernel", ["auto", "torch"])
async def test_a_packed_step_of_mixed_ranks_equals_peft(make_engine, mixed_adapters, peft_models, lora_kernel,
                                                         monkeypatch):
    """Base rows, five adapters (ranks 8, 16, 12 in class 16, 64, rsLoRA) decoding single
    tokens while a long prompt of one adapter is prefilled as a segment: every sampled logit
    equals PEFT's for the same tokens. On either path: the CPU kernel's tokens (its segment
    threshold lowered so that the prompt is one), or torch ops' gathered rank classes."""
    monkeypatch.setattr(lora_plan, "KERNEL_WORK", 16 * LONG_RUN)
    engine = make_engine(max_step_tokens=256, max_batch_size=16, lora_kernel=lora_kernel)
    if lora_kernel == "auto" and engine.lora.kernel is None:
        pytest.skip("the LoRA kernel does not build here")
    for name, folder in mixed_adapters.items():
        await engine.load_adapter(name, str(folder))
    steps = recording_runner(engine)
    short = ids(engine, "Hello there, fox")
    for i, adapter in enumerate([None, "r8", "r16", "r12", "r64", "rs", "r8", None]):
        engine.core.add(engine.new_row(GenerationRequest(short + [40 + i], GREEDY, adapter)))
    engine.core.step()
    long_prompt = ids(engine, LONG_TEXT)
    assert len(long_prompt) >= LONG_RUN
    engine.core.add(engine.new_row(GenerationRequest(long_prompt, GREEDY, "r16")))
    for _ in range(3):
        engine.core.step()
    mixed = steps[1][0]
    assert [s.stop - s.start for s in mixed.segments] == [len(long_prompt) + 1]  # and r16's decode token
    if lora_kernel == "torch":
        assert sorted(g.width for g in mixed.gathers) == [8, 16, 64] and mixed.kernel is None
    else:  # r8 twice, r12, r64 and rs decode through the kernel, each with its own rank
        assert not mixed.gathers and sorted(r for r in mixed.kernel.rank.tolist() if r) == [8, 8, 8, 12, 64]
    checked = 0
    with torch.inference_mode():
        for _, rows in steps:
            for adapter, tokens, logits in rows:
                expected = peft_models[adapter](input_ids=torch.tensor([tokens])).logits[0, -1]
                # fp32, summed in another order (scaling folded into B; 88 tokens of a strong adapter: 2e-4)
                torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)
                checked += 1
    assert checked == 8 * 4 + 3


def test_rank_classes_are_powers_of_two_from_eight():
    assert [rank_class(r) for r in (1, 8, 9, 12, 16, 17, 64, 65)] == [8, 8, 16, 16, 16, 32, 64, 128]


# q, o: 64 -> 64; k, v: 64 -> 32; gate, up: 64 -> 128; down: 128 -> 64; two layers, fp32
TINY_BYTES_PER_ROW = 2 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3) * 4


def tiny_layers(tiny_model_dir, rows: int, max_adapters: int = 8) -> tuple[LlamaForCausalLM, LoraLayers]:
    """The tiny model with its LoRA layers, a pool of `rows` rows."""
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, LoraLayers(model, rows * TINY_BYTES_PER_ROW, max_adapters)


def test_layers_wrap_every_linear_but_the_lm_head(tiny_model_dir):
    model, layers = tiny_layers(tiny_model_dir, rows=10)
    assert set(layers.linear_shapes) == {f"model.layers.{i}.{kind}.{name}" for i in (0, 1)
                                         for kind, names in (("self_attn", ALL_LINEAR[:4]), ("mlp", ALL_LINEAR[4:]))
                                         for name in names}
    assert type(model.lm_head) is torch.nn.Linear
    assert layers.bytes_per_row == TINY_BYTES_PER_ROW
    assert layers.capacity_rows == layers.free_rows == 10


def test_rows_are_placed_freed_and_reused(tiny_model_dir, adapter_dirs, mixed_adapters):
    model, layers = tiny_layers(tiny_model_dir, rows=40, max_adapters=3)
    read = {name: read_adapter(name, folder, layers.linear_shapes, torch.float32)
            for name, folder in {**mixed_adapters, "alpha": adapter_dirs["alpha"]}.items()}
    r8 = layers.place(read["r8"])
    r16 = layers.place(read["r16"])
    assert (r8.start, r8.rank, r8.rank_class) == (1, 8, 8)
    assert (r16.start, r16.rank, r16.rank_class) == (9, 16, 16)
    assert layers.place(read["r64"]) is None  # 16 rows free: no run of 64
    r12 = layers.place(read["r12"])
    assert (r12.start, r12.rank_class) == (25, 16)
    assert layers.place(read["alpha"]) is None  # three adapters: no slot
    assert layers.free_rows == 40 - 8 - 16 - 12
    layers.remove(r8)
    again = layers.place(read["alpha"])
    assert again.start == 1  # the freed rows, reused
    layer = layers.layers["model.layers.0.mlp.up_proj"]
    a, b = read["r12"].weights["model.layers.0.mlp.up_proj"]  # rank 12 (rank_pattern)
    assert torch.equal(layer.a_rows[25:37], a) and torch.equal(layer.b_rows[25:37], b)
    o_a, _ = read["r12"].weights["model.layers.0.mlp.gate_proj"]  # rank 8: 4 zero rows after it
    gate = layers.layers["model.layers.0.mlp.gate_proj"]
    assert torch.equal(gate.a_rows[25:33], o_a) and not gate.a_rows[33:37].any()
    untargeted = layers.layers["model.layers.0.mlp.up_proj"]  # alpha adapts q and v only
    assert not untargeted.a_rows[1:9].any() and not untargeted.b_rows[1:9].any()
    assert not layer.a_rows[0].any() and not layer.b_rows[0].any()
    for placement in (r16, r12, again):
        layers.remove(placement)
    assert layers.free_rows == 40
    assert layers.place(read["r64"]) is None  # 40 rows: never fits, whatever is removed
    with pytest.raises(KeyError):
        layers.remove(r16)


@pytest.mark.parametrize("name, options, message", [
    ("dora", {"use_dora": True}, "variants are not supported"),
    ("bias", {"lora_bias": True}, "lora_bias is not supported"),
    ("embed", {"targets": ("embed_tokens",)}, "not DoRA, LoRA bias, embeddings or lm_head; found .*embed_tokens"),
    ("head", {"targets": ("q_proj", "lm_head")}, "found base_model.model.lm_head|lm_head, which is not"),
    ("saved", {"modules_to_save": ["lm_head"]}, "modules_to_save is not supported"),
    ("tokens", {"trainable_token_indices": [1, 2]}, "trainable_token_indices is not supported"),
])
def test_read_adapter_refuses_what_is_not_plain_lora(tiny_model_dir, tmp_path, name, options, message):
    targets = options.pop("targets", ("q_proj", "v_proj"))
    folder = save_tiny_adapter(tiny_model_dir, tmp_path / name, seed=5, targets=targets, **options)
    _, layers = tiny_layers(tiny_model_dir, rows=8)
    with pytest.raises(InvalidRequestError, match=message) as refused:
        read_adapter(name, folder, layers.linear_shapes, torch.float32)
    assert repr(name) in str(refused.value)


def test_read_adapter_refuses_other_peft_types_empty_files_and_misfits(tiny_model_dir, adapter_dirs, tmp_path):
    _, layers = tiny_layers(tiny_model_dir, rows=8)
    shapes = layers.linear_shapes
    ia3 = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_dir),
                         IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(InvalidRequestError, match="'ia3' is not a LoRA adapter"):
        read_adapter("ia3", tmp_path / "ia3", shapes, torch.float32)
    empty = save_tiny_adapter(tiny_model_dir, tmp_path / "empty", seed=6)
    save_file({}, empty / "adapter_model.safetensors")
    with pytest.raises(InvalidRequestError, match="'empty' has no LoRA layers"):
        read_adapter("empty", empty, shapes, torch.float32)
    fewer = {name: shape for name, shape in shapes.items() if "layers.1." not in name}
    with pytest.raises(InvalidRequestError, match="targets model.layers.1.self_attn"):
        read_adapter("alpha", adapter_dirs["alpha"], fewer, torch.float32)
    wider = {name: (in_features * 2, out) for name, (in_features, out) in shapes.items()}
    with pytest.raises(InvalidRequestError, match="needs A"):
        read_adapter("alpha", adapter_dirs["alpha"], wider, torch.float32)
    with pytest.raises(InvalidRequestError, match="cannot load adapter 'ghost'"):
        read_adapter("ghost", tmp_path / "no-such-folder", shapes, torch.float32)


def test_weights_carry_peft_scaling_alpha_and_rank_patterns_and_rslora(tiny_model_dir, mixed_adapters):
    """(A, B^T * scaling) per module, scaling as PEFT's own LoRA layers compute it."""
    _, layers = tiny_layers(tiny_model_dir, rows=8)
    for name in ("r12", "rs", "r64"):
        adapter = read_adapter(name, mixed_adapters[name], layers.linear_shapes, torch.bfloat16)
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), mixed_adapters[name])
        expected = {}
        for module_name, module in peft.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.scaling:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                expected[module_name.removeprefix("base_model.model.")] = (a, b.T * module.scaling["default"])
        assert set(adapter.weights) == set(expected)
        for module_name, (a, b) in adapter.weights.items():
            assert a.dtype == b.dtype == torch.bfloat16
            torch.testing.assert_close(a, expected[module_name][0].to(torch.bfloat16))
            torch.testing.assert_close(b, expected[module_name][1].detach().to(torch.bfloat16))
        assert adapter.rank == {"r12": 12, "rs": 8, "r64": 64}[name]
        assert adapter.nbytes == sum(a.numel() * 2 + b.numel() * 2 for a, b in adapter.weights.values())
    scales = {"r12": {"q_proj": 5 / 8, "o_proj": 16 / 12, "v_proj": 16 / 8}, "rs": {"q_proj": 16 / 8 ** 0.5}}
    for name, by_kind in scales.items():  # the rules themselves, on the raw checkpoint
        adapter = read_adapter(name, mixed_adapters[name], layers.linear_shapes, torch.float32)
        raw = load_file(mixed_adapters[name] / "adapter_model.safetensors")
        for kind, scale in by_kind.items():
            b = raw[f"base_model.model.model.layers.0.self_attn.{kind}.lora_B.weight"]
            torch.testing.assert_close(adapter.weights[f"model.layers.0.self_attn.{kind}"][1], b.T * scale)


def test_identity_changes_with_weights_and_name(tiny_model_dir, adapter_dirs):
    _, layers = tiny_layers(tiny_model_dir, rows=8)
    alpha = read_adapter("alpha", adapter_dirs["alpha"], layers.linear_shapes, torch.float32)
    assert alpha.identity == read_adapter("alpha", adapter_dirs["alpha"], layers.linear_shapes, torch.float32).identity
    assert alpha.identity != read_adapter("alpha", adapter_dirs["beta"], layers.linear_shapes, torch.float32).identity
    assert alpha.identity != read_adapter("other", adapter_dirs["alpha"], layers.linear_shapes, torch.float32).identity
    assert alpha.identity.startswith(b"alpha#")


def test_the_plan_cuts_classes_into_pieces_and_views_rows_that_lie_end_to_end():
    cpu = torch.device("cpu")
    a, b, c = Placement(1, 8, 8), Placement(9, 8, 8), Placement(17, 12, 16)
    # decode tokens of a and b (one each), a 40-token run of c: a and b gathered, c a segment
    plan = LoraStep.build([(0, 1, a), (1, 2, b), (2, 42, c)], cpu)
    assert [(s.start, s.stop, s.first_row, s.rank) for s in plan.segments] == [(2, 42, 17, 12)]
    (gather,) = plan.gathers
    assert (gather.width, gather.pieces, gather.length, gather.rows, gather.first_row) == (8, 2, 1, None, 1)
    assert gather.gather is None and gather.scatter is None  # one token per piece: no padding
    assert gather.token_rows.view(2, 8).tolist() == [list(range(1, 9)), list(range(9, 17))]
    # 3 tokens of a, 1 of b: pieces of 2 tokens (a's cut in two), padded by repeating a token;
    # 1 of c (class 16, rank 12): its rows padded with row 0
    plan = LoraStep.build([(0, 3, a), (3, 4, b), (4, 5, c)], cpu)
    first, second = plan.gathers
    assert (first.pieces, first.length) == (3, 2)
    assert first.rows.tolist() == [*range(1, 9), *range(1, 9), *range(9, 17)]  # a twice: gathered
    assert first.gather.tolist() == [0, 1, 2, 2, 3, 3] and first.scatter.tolist() == [0, 1, 2, 4]
    assert (second.start, second.width) == (4, 16) and second.rows.tolist() == list(range(17, 29)) + [0] * 4
    assert not LoraStep.build([], cpu) and not LoraStep()  # empty: the base model only
