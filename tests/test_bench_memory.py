"""``python -m trainers bench memory``: the calculation behind the README's memory table. Its
counts are checked against what they count: the full-size transformers' parameters against the
published sizes, the LoRA's against the adapter the trainer really attaches."""
from __future__ import annotations

import pytest
import torch

from core.families import FAMILIES as PACK_FAMILIES
from core.tiny_models import build_tiny_pipeline
from trainers.benchmarks import memory
from trainers.config import LORA_TARGETS
from trainers.trainables import LoraTrainable

BY_NAME = {f.name: f for f in memory.FAMILIES}


@pytest.mark.parametrize("name, billions", [("Flux.1 dev / schnell", 11.9), ("SD3.5 Large", 8.1),
                                            ("Z-Image", 6.2)])
def test_full_size_transformers_have_their_published_size(name, billions):
    model = memory.on_meta(BY_NAME[name].transformer)
    assert memory.parameters(model) / 1e9 == pytest.approx(billions, abs=0.06)
    assert next(model.parameters()).device.type == "meta"  # nothing allocated


@pytest.mark.parametrize("base, family", [("tiny-flux", "flux"), ("tiny-sd3", "sd3"), ("tiny-zimage", "zimage")])
def test_lora_count_is_the_adapter_the_trainer_attaches(base, family):
    transformer = build_tiny_pipeline(base).transformer
    expected = memory.lora_parameters(transformer, family, rank=4)
    lora = LoraTrainable(rank=4, target_modules=LORA_TARGETS)
    lora.attach(transformer, torch.float32, False, targets_for=PACK_FAMILIES[family].lora_targets)
    assert sum(p.numel() for p in lora.parameters()) == expected > 0


def test_the_budget_adds_its_terms_and_checkpointing_saves_activations():
    b = memory.budget(BY_NAME["Flux.1 dev / schnell"], rank=32)
    assert b["weights_bf16"] == 2 * b["params"]
    # the trainer's fp8 policy keeps Flux's modulation (3.2 B parameters, "norm" layers) in bf16
    assert 0.6 < b["weights_fp8"] / b["weights_bf16"] < 0.7
    assert b["lora_state"] == b["lora"] * 4 * (3 + memory.OBJECTIVES + 1)
    assert b["train_fp8"] == b["weights_fp8"] + b["vae"] + b["lora_state"] + b["activations_checkpointed"]
    assert b["activations_checkpointed"] < b["activations_full"] / 5
    # Flux.1-dev fits a 24 GB card only with fp8 weights; the bf16 weights alone nearly fill it
    assert b["train_fp8"] < 24e9 < b["train_bf16"]
    # twice the pixels, about twice the activations (linear in tokens: no stored attention scores)
    big = memory.budget(BY_NAME["Flux.1 dev / schnell"], rank=32, side=1448)
    assert big["activations_checkpointed"] / b["activations_checkpointed"] == pytest.approx(2, rel=0.15)
