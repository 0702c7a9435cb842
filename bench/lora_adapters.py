"""The LoRA adapters bench.lora_serving serves: made once by PEFT on the real model, random weights.

Adapter i is named `lora-NNN` (i from 0, three digits), has rank RANKS[i % 4] (8, 16, 32, 64 in
turn) and targets every Linear layer of the decoder (PEFT's "all-linear": q, k, v, o, gate, up,
down; not lm_head). Its weights are random (seeded by i) and scaled so that each layer's update
`scaling * B @ A` has RELATIVE_NORM times the Frobenius norm of the layer's own weight: small
enough that the model still writes text, large enough that every adapter changes it. They are
saved in bf16 as ordinary PEFT folders, all under one store folder (what the new engine's
`adapter_stores` reads; the older systems load the folders by path), and reused by later runs:
only missing adapters are made.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, PreTrainedModel

from bench.lora_workload import adapter_name

log = logging.getLogger("bench.lora_adapters")

RANKS = (8, 16, 32, 64)
TARGETS = "all-linear"
RELATIVE_NORM = 0.05  # 0.1 made some adapters loop, 0.2 wrote word salad (SmolLM2-135M)
LORA_ALPHA = 16
VERSION = 1  # bump when the recipe above changes: a new store folder is made


def adapter_rank(index: int) -> int:
    """Adapter `index`'s LoRA rank: 8, 16, 32, 64 in turn."""
    return RANKS[index % len(RANKS)]


def store_folder(root: Path, model_name: str) -> Path:
    """The store folder for `model_name` under `root`, named by the recipe (so a new recipe gets a new one)."""
    ranks = "-".join(str(r) for r in RANKS)
    return root / f"{model_name}-{TARGETS}-r{ranks}-norm{RELATIVE_NORM:g}-v{VERSION}"


def ensure_adapters(checkpoint: str, store: Path, count: int) -> list[str]:
    """Adapters 0..count-1 in `store`, made from the model at `checkpoint` where missing; their names.

    Each adapter is written to a temporary folder beside its final one and renamed into place,
    so an interrupted run leaves no half-written adapter behind."""
    names = [adapter_name(i) for i in range(count)]
    missing = [i for i, name in enumerate(names) if not (store / name / "adapter_config.json").exists()]
    if missing:
        log.info("making %d LoRA adapters in %s (once)", len(missing), store)
        base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
        for index in missing:
            base = make_adapter(base, index, store / names[index], checkpoint)
    return names


def make_adapter(base: PreTrainedModel, index: int, target: Path, checkpoint: str) -> PreTrainedModel:
    """Write adapter `index` to `target`; returns the base model with PEFT's layers removed again."""
    config = LoraConfig(r=adapter_rank(index), lora_alpha=LORA_ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                        task_type="CAUSAL_LM", base_model_name_or_path=checkpoint)
    model = get_peft_model(base, config, autocast_adapter_dtype=False)
    randomize(model, seed=index)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
    try:
        model.save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model.unload()


@torch.no_grad()
def randomize(model: PeftModel, seed: int, adapter: str = "default") -> None:
    """Random A and B for every LoRA layer, scaled so `scaling * B @ A` has RELATIVE_NORM times the
    Frobenius norm of the layer's base weight."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        new_a = torch.randn(a.shape, generator=generator) / a.shape[1] ** 0.5
        new_b = torch.randn(b.shape, generator=generator)
        update = module.scaling[adapter] * new_b @ new_a
        new_b *= RELATIVE_NORM * module.get_base_layer().weight.float().norm() / update.norm()
        a.copy_(new_a)
        b.copy_(new_b)
