"""8-bit and 4-bit loads for router training leave the gates unquantised (and only the gates and the head)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.quantizers.quantizers_utils import should_convert_module

from app.core.chat import loading
from app.core.chat.loading import LoadMode, LoadRequest, plan_load
from app.core.training.trainer import GATE_MODULES
from tests.chat_models import make_tiny_moe


def test_the_gate_patterns_keep_every_gate_and_nothing_else_out_of_quantisation(tmp_path):
    """transformers' own matching of skip patterns, on every nn.Linear of a Qwen2-MoE with a dense layer."""
    model = AutoModelForCausalLM.from_pretrained(make_tiny_moe(tmp_path / "q", "qwen2_moe", seed=1))
    patterns = ["lm_head", *GATE_MODULES]
    kept, converted = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or name.endswith(".gate"):
            (converted if should_convert_module(name, patterns) else kept).add(name)
    gates = {n for n in kept if n.endswith((".mlp.gate", ".shared_expert_gate"))}
    assert kept == gates | {"lm_head"}
    assert {"model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate"} <= gates
    assert "model.layers.1.mlp.gate_proj" in converted  # the dense layer's MLP: no router, quantised


@pytest.mark.parametrize("mode", [LoadMode.INT8, LoadMode.INT4])
def test_the_skip_list_reaches_bitsandbytes(tmp_path, monkeypatch, mode):
    folder = make_tiny_moe(tmp_path / "m", "mixtral", seed=1)
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**11, 10**11))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda folder, **kwargs: seen.update(kwargs))
    plan = plan_load(LoadRequest(model=str(folder), mode=mode, keep_unquantised=GATE_MODULES))
    loading._from_pretrained(plan)
    assert seen["quantization_config"].llm_int8_skip_modules == ["lm_head", *GATE_MODULES]
