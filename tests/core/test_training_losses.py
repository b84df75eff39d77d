"""The auxiliary losses against transformers' own load_balancing_loss_func and an independent z-loss."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as mixtral_loss
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func as qwen2_moe_loss

from app.core.training.losses import load_balancing_loss, router_z_loss
from tests.chat_models import make_tiny_moe


@pytest.mark.parametrize(("experts", "top_k", "layers"), [(4, 2, 3), (8, 1, 2), (5, 3, 1)])
@pytest.mark.parametrize("reference", [mixtral_loss, qwen2_moe_loss])
def test_balance_loss_equals_transformers_on_the_same_logits(experts, top_k, layers, reference):
    generator = torch.Generator().manual_seed(experts * 10 + top_k)
    logits = tuple(torch.randn(37, experts, generator=generator) * 2 for _ in range(layers))
    ours, _load = load_balancing_loss(logits, experts, top_k)
    theirs = reference(logits, experts, top_k)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("architecture", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_balance_loss_equals_the_aux_loss_the_model_computes(tmp_path, architecture):
    """The model's own router logits and aux_loss (output_router_logits=True): our loss on its logits is its loss."""
    folder = make_tiny_moe(tmp_path / architecture, architecture, seed=7)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(4, 300, (3, 19), generator=torch.Generator().manual_seed(1))
    output = model(input_ids=ids, output_router_logits=True)
    experts = int(model.config.num_local_experts if architecture == "mixtral" else model.config.num_experts)
    ours, load = load_balancing_loss(output.router_logits, experts, int(model.config.num_experts_per_tok))
    torch.testing.assert_close(ours, output.aux_loss, rtol=1e-6, atol=1e-7)
    assert load.shape == (experts,)


def test_expert_load_is_each_experts_share_of_the_top_k_choices():
    logits = (torch.tensor([[3.0, 2.0, 0.0, -1.0], [0.0, 1.0, 3.0, 2.0], [5.0, 0.0, 4.0, 0.0]]),)
    _loss, load = load_balancing_loss(logits, 4, 2)
    # top-2 choices: {0,1}, {2,3}, {0,2} -> expert 0 twice, 1 once, 2 twice, 3 once, of 6 choices
    torch.testing.assert_close(load, torch.tensor([2, 1, 2, 1]) / 6)


def test_balance_loss_gives_the_router_a_gradient_towards_balance():
    weight = torch.zeros(4, 8, requires_grad=True)
    hidden = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weight[0] = 1.0  # expert 0 favoured by every token with a positive sum
    loss, _ = load_balancing_loss((hidden @ weight.T,), 4, 1)
    loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_z_loss_is_the_mean_squared_logsumexp_averaged_over_layers():
    layers = [[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], [[10.0, -10.0, 0.0]]]
    expected = sum(
        sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in layer) / len(layer) for layer in layers
    ) / len(layers)
    ours = router_z_loss([torch.tensor(layer) for layer in layers])
    assert ours.item() == pytest.approx(expected, rel=1e-6)
