from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from app.core.merge.calibration import LabelledTokens, fit_layer, label_tokens
from app.core.merge.gates import GateComputer, compute_gates
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.progress import run_job
from app.core.recipe import parse_recipe
from app.core.routing_eval import evaluate_model_routing


def clusters(seed=0, per_expert=30, hidden=16, experts=3, spread=0.3):
    """Token states in well separated clusters around a shared offset (as real hidden states have)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(experts, hidden, generator=generator) * 2
    offset = torch.randn(hidden, generator=generator) * 5
    states = [
        offset + centres[e] + spread * torch.randn(per_expert, hidden, generator=generator) for e in range(experts)
    ]
    return centres, label_tokens(states, list(range(experts)), [-1] * experts)


def test_fit_is_deterministic():
    centres, tokens = clusters()
    first = fit_layer(tokens, centres)
    second = fit_layer(tokens, centres)
    assert torch.equal(first.weight, second.weight)


def test_separable_inputs_reach_full_training_accuracy_from_a_poor_start():
    centres, tokens = clusters()
    # Start from gates that point the wrong way round: the fit must still separate the clusters.
    fit = fit_layer(tokens, centres.roll(1, dims=0))
    assert fit.train_accuracy == 1.0
    predicted = (tokens.states @ fit.weight.T).argmax(dim=-1)
    assert torch.equal(predicted, tokens.positive)


def test_softmax_is_confident_but_not_one_hot():
    centres, tokens = clusters()
    fit = fit_layer(tokens, centres, target_confidence=0.8)
    assert fit.confidence == pytest.approx(0.8, abs=0.01)
    probabilities = torch.softmax(tokens.states @ fit.weight.T, dim=-1)
    assert probabilities.max() < 1.0 - 1e-6


def test_negative_prompts_move_the_boundary_the_right_way():
    """Tokens between experts 0 and 1, marked "not expert 0", go less to expert 0 after the fit."""
    centres, tokens = clusters(per_expert=20)
    between = (centres[0] + centres[1]) / 2 + tokens.states[:20].mean(dim=0) - centres[0]
    generator = torch.Generator().manual_seed(5)
    ambiguous = between + 0.3 * torch.randn(15, centres.shape[1], generator=generator)
    with_negatives = LabelledTokens(
        states=torch.cat([tokens.states, ambiguous]),
        positive=torch.cat([tokens.positive, torch.full((15,), -1)]),
        negative=torch.cat([tokens.negative, torch.zeros(15, dtype=torch.long)]),
    )
    plain = fit_layer(tokens, centres, target_confidence=0.8)
    pushed = fit_layer(with_negatives, centres, target_confidence=0.8)

    def share_to_expert_0(weight):
        return float(torch.softmax(ambiguous @ weight.T, dim=-1)[:, 0].mean())

    assert share_to_expert_0(pushed.weight) < share_to_expert_0(plain.weight) - 0.1
    assert pushed.train_accuracy == 1.0


PROMPTS = {
    0: ["What is 12 plus 30?", "Compute 7 times 8 and subtract 6", "45 * 3 = 135"],
    1: ["def add(a, b):\n    return a + b", "for i in range(10): print(i)", "import os"],
    2: ["The old lighthouse keeper watched the storm.", "She opened the letter slowly.", "Once upon a time"],
}


def calibrated_recipe(donors, negatives=False):
    lines = [f"base_model: {donors['base']}", "gate_mode: calibrated", "dtype: float32", "experts:"]
    for index, prompts in PROMPTS.items():
        lines += [f"  - source_model: {donors[f'expert{index}']}", f"    positive_prompts: {json.dumps(prompts)}"]
        if negatives and index == 0:
            lines.append(f"    negative_prompts: {json.dumps(PROMPTS[1][:1])}")
    return parse_recipe("\n".join(lines))


def test_calibrated_gates_route_their_own_prompts_home(llama_donors):
    recipe = calibrated_recipe(llama_donors)
    computer = GateComputer(recipe.base_model, device="cpu", keep_loaded=True)
    gates = run_job(computer.compute(recipe))
    assert gates.mode == "calibrated"
    assert gates.fit_seconds is not None and gates.fit_seconds > 0
    assert len(gates.train_accuracy) == 2
    assert torch.equal(gates.router, run_job(compute_gates(recipe, device="cpu")).router)  # deterministic
    preview = run_job(computer.route(recipe, gates, [PROMPTS[i] for i in range(3)]))
    hidden = recipe.model_copy(update={"gate_mode": "hidden"})
    hidden_preview = run_job(computer.route(hidden, run_job(computer.compute(hidden)), [PROMPTS[i] for i in range(3)]))
    # Layer 0 sees the same inputs in the base and in the MoE: the preview scores the fit's own tokens.
    assert preview.quality.layer_token_share[0] == pytest.approx(gates.train_accuracy[0])
    assert preview.quality.layer_token_share[0] >= hidden_preview.quality.layer_token_share[0]
    computer.close()


def test_progressive_fit_sees_what_the_merged_model_sees(llama_donors, tmp_path):
    """Each layer is fitted on the MoE's own router inputs, so its training accuracy is the merged model's."""
    recipe = calibrated_recipe(llama_donors)
    gates = run_job(compute_gates(recipe, device="cpu"))
    out = tmp_path / "moe"
    run_job(merge_moe(recipe, MergeOptions(out_dir=out), gates=gates))
    merged = run_job(evaluate_model_routing(out, [PROMPTS[i] for i in range(3)], device="cpu"))
    assert merged.quality.layer_token_share == pytest.approx(gates.train_accuracy)


def test_written_routers_reproduce_the_preview_in_the_merged_model(llama_donors, tmp_path):
    """Layer 0's router input is the same in the base and the MoE, so the preview must match transformers."""
    recipe = calibrated_recipe(llama_donors, negatives=True)
    computer = GateComputer(recipe.base_model, device="cpu", keep_loaded=True)
    gates = run_job(computer.compute(recipe))
    held_out = [["What is 9 times 9?"], ["def mul(a, b): return a * b"], ["The cat slept by the fire."]]
    preview = run_job(computer.route(recipe, gates, held_out))
    computer.close()
    out = tmp_path / "moe"
    run_job(merge_moe(recipe, MergeOptions(out_dir=out), gates=gates))
    merged = run_job(evaluate_model_routing(out, held_out, device="cpu"))
    assert merged.labels == ("expert 0", "expert 1", "expert 2")
    for ours, theirs in zip(preview.routings, merged.routings, strict=True):
        assert ours.text == theirs.text
        np.testing.assert_allclose(ours.weights[0], theirs.weights[0], rtol=1e-4, atol=1e-6)
    assert merged.quality.prompts == 3


def test_default_confidence_follows_accuracy_within_bounds():
    centres, tokens = clusters()
    separable = fit_layer(tokens, centres)
    assert separable.train_accuracy == 1.0
    assert separable.confidence == pytest.approx(0.95, abs=0.01)  # right every time, yet never one-hot
    _, overlapping = clusters(spread=6.0)
    blurred = fit_layer(overlapping, centres)
    assert blurred.train_accuracy < 0.95
    assert blurred.confidence == pytest.approx(max(blurred.train_accuracy, 2 / 3), abs=0.02)


def test_calibrated_fit_when_the_prompts_do_not_fit_in_one_batch(llama_donors):
    """With too little memory for one MoE pass, every layer is fitted on the base model's own states."""
    recipe = calibrated_recipe(llama_donors)
    recipe = recipe.model_copy(
        update={
            "experts": tuple(e.model_copy(update={"positive_prompts": e.positive_prompts[:1]}) for e in recipe.experts)
        }
    )
    one_pass = run_job(compute_gates(recipe, device="cpu"))
    computer = GateComputer(recipe.base_model, device="cpu", memory_budget=1)  # one prompt per batch
    try:
        prompts = computer.tokenizer.encode([e.positive_prompts[0] for e in recipe.experts])
        assert len(computer.probe().plan_batches([len(ids) for ids in prompts], "tokens")) == 3
        split = run_job(computer.compute(recipe))
    finally:
        computer.close()
    assert split.mode == "calibrated" and split.router.shape == one_pass.router.shape
    assert len(split.train_accuracy) == 2
    assert split.train_accuracy[0] == pytest.approx(one_pass.train_accuracy[0])
    # Layer 0's inputs are the base model's either way; layer 1's differ (base MLP, not the MoE's).
    torch.testing.assert_close(split.router[0], one_pass.router[0], rtol=1e-3, atol=1e-4)
    assert not torch.allclose(split.router[1], one_pass.router[1], rtol=1e-3, atol=1e-4)
