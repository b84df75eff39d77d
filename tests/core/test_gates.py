from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.core.merge.gates import GateComputer, compute_gates, describe_degenerate_layers, layer_diagnostics
from app.core.progress import Cancelled, run_job
from app.core.recipe import dump_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[2]
PROMPTS = {
    0: (["What is 12 plus 30?", "Compute 7 times 8 and subtract 6"], ["def add(a, b): return a + b"]),
    1: (["def add(a, b):\n    return a + b", "for i in range(10): print(i)"], []),
    2: (["The old lighthouse keeper watched the storm.", "She opened the letter slowly."], ["12 plus 30"]),
}


def make_recipe(donors, gate_mode="hidden", prompts=PROMPTS, **extra):
    lines = [f"base_model: {donors['base']}", f"gate_mode: {gate_mode}", "experts:"]
    for index, (positive, negative) in prompts.items():
        lines.append(f"  - source_model: {donors[f'expert{index}']}")
        lines.append(f"    positive_prompts: {json.dumps(positive)}")
        if negative:
            lines.append(f"    negative_prompts: {json.dumps(negative)}")
    for key, value in extra.items():
        lines.append(f"{key}: {value}")
    return parse_recipe("\n".join(lines))


def reference_router_inputs(base_folder, prompts, reduce, tokenizer_class=AutoTokenizer):
    """Independent recomputation: the full model, one unpadded prompt at a time, hooks on each post-attention norm."""
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    tokenizer = tokenizer_class.from_pretrained(base_folder)
    captured = {}
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(
            lambda _m, _i, output, index=index: captured.__setitem__(index, output[0])
        )
        for index, layer in enumerate(model.model.layers)
    ]
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(tokenizer.bos_token + prompt, add_special_tokens=False, return_tensors="pt").input_ids
            model(ids)
            per_layer = [captured[i][-1] if reduce == "last" else captured[i].mean(dim=0) for i in sorted(captured)]
            results.append(torch.stack(per_layer))
    for hook in hooks:
        hook.remove()
    return results


@pytest.mark.parametrize(("mode", "reduce"), [("hidden", "last"), ("hidden_avg", "mean")])
def test_hidden_gates_equal_an_independent_recomputation(llama_donors, mode, reduce):
    recipe = make_recipe(llama_donors, mode)
    result = run_job(compute_gates(recipe, device="cpu"))
    assert result.router.shape == (2, 3, 32)
    for expert, (positive, negative) in PROMPTS.items():
        vector = torch.stack(reference_router_inputs(llama_donors["base"], positive, reduce)).mean(dim=0)
        if negative:
            vector = vector - torch.stack(reference_router_inputs(llama_donors["base"], negative, reduce)).mean(dim=0)
        vector = vector / vector.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(result.router[:, expert], vector, rtol=1e-5, atol=1e-5)
    assert torch.allclose(result.router.norm(dim=-1), torch.ones(2, 3))


def test_padding_never_leaks_into_gates(llama_donors):
    """One batch with padding and one prompt per batch (no padding) give the same gates."""
    recipe = make_recipe(llama_donors, "hidden_avg")
    batched = GateComputer(recipe.base_model, device="cpu", memory_budget=2**40)
    single = GateComputer(recipe.base_model, device="cpu", memory_budget=1)
    assert len(batched.probe().plan_batches([5, 9, 3], "mean")) == 1
    assert len(single.probe().plan_batches([5, 9, 3], "mean")) == 3
    torch.testing.assert_close(
        run_job(batched.compute(recipe)).router, run_job(single.compute(recipe)).router, rtol=1e-5, atol=1e-6
    )


def mergekit_cheap_embed(base_folder, prompts):
    """mergekit-moe's cheap_embed, written out from its definition: padded one-hot products, masked sums."""
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    from safetensors.torch import load_file

    embed = load_file(base_folder / "model.safetensors")["model.embed_tokens.weight"]
    batch = tokenizer(
        [tokenizer.bos_token + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False
    )
    onehot = torch.nn.functional.one_hot(batch["input_ids"], num_classes=embed.shape[0]).float()
    summed = ((onehot @ embed.float()) * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0)
    return summed / summed.norm().clamp(min=1e-8)


def test_cheap_embed_matches_mergekit_definition(llama_donors):
    recipe = make_recipe(llama_donors, "cheap_embed")
    result = run_job(compute_gates(recipe, device="cpu"))
    for expert, (positive, negative) in PROMPTS.items():
        vector = mergekit_cheap_embed(llama_donors["base"], positive)
        if negative:
            vector = vector - mergekit_cheap_embed(llama_donors["base"], negative)
        vector = vector / vector.norm()
        for layer in range(2):
            torch.testing.assert_close(result.router[layer, expert], vector, rtol=1e-5, atol=1e-6)


def test_random_modes_are_seeded_and_shaped(llama_donors):
    recipe = make_recipe(llama_donors, "random")
    first = run_job(compute_gates(recipe, device="cpu")).router
    assert torch.equal(first, run_job(compute_gates(recipe, device="cpu")).router)
    reseeded = recipe.model_copy(update={"studio": recipe.studio.model_copy(update={"seed": 7})})
    assert not torch.equal(first, run_job(compute_gates(reseeded, device="cpu")).router)
    uniform = run_job(compute_gates(recipe.model_copy(update={"gate_mode": "uniform_random"}), device="cpu")).router
    assert uniform.shape == (2, 3, 32)
    bound = (1 / 32) ** 0.5
    assert uniform.abs().max() <= bound
    assert uniform.std() > bound / 3


def test_diagnostics_flag_experts_the_router_cannot_tell_apart(llama_donors):
    same = (["What is 12 plus 30?"], [])
    recipe = make_recipe(llama_donors, "hidden", prompts={0: same, 1: same, 2: PROMPTS[2]})
    result = run_job(compute_gates(recipe, device="cpu"))
    for diag in result.diagnostics:
        assert diag.degenerate_pairs == ((0, 1),)
        assert diag.similarity[0][1] == pytest.approx(1.0, abs=1e-5)
        assert diag.condition_number > 1e3
    warnings = result.degenerate_warnings(["maths", "code", "prose"])
    assert warnings == ["maths and code look the same to the router in layers 0-1: give them more distinct prompts"]

    distinct = run_job(compute_gates(make_recipe(llama_donors, "hidden"), device="cpu"))
    assert not any(d.is_degenerate for d in distinct.diagnostics)
    assert all(d.condition_number < 100 for d in distinct.diagnostics)


def test_diagnostics_numbers_on_a_hand_made_router():
    router = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [1.0, 0.01]]])
    first, second = layer_diagnostics(router)
    assert first.similarity == ((1.0, 0.0), (0.0, 1.0))
    assert first.condition_number == pytest.approx(2.0)
    assert not first.is_degenerate
    assert second.degenerate_pairs == ((0, 1),)
    labels = ["a", "b"]
    assert describe_degenerate_layers([first, second], labels) == [
        "a and b look the same to the router in layer 1: give them more distinct prompts"
    ]


def test_cancel_stops_gate_computation_and_joins_its_thread(llama_donors):
    recipe = make_recipe(llama_donors, "hidden")
    cancel = threading.Event()
    job = compute_gates(recipe, device="cpu", cancel=cancel)
    next(job)
    cancel.set()
    with pytest.raises(Cancelled):
        run_job(job)
    assert not [t for t in threading.enumerate() if t.name == "frankenmoe-probe"]


def test_route_preview_scores_test_prompts(llama_donors):
    recipe = make_recipe(llama_donors, "hidden")
    computer = GateComputer(recipe.base_model, device="cpu", keep_loaded=True)
    gates = run_job(computer.compute(recipe))
    # The positive prompts themselves, as "test" prompts: their last tokens built the gates.
    tests = [PROMPTS[i][0] for i in range(3)]
    preview = run_job(computer.route(recipe, gates, tests))
    assert len(preview.routings) == 6
    for routing, tokens in zip(preview.routings, preview.tokens, strict=True):
        assert routing.weights.shape == (2, len(tokens), 3)
        np.testing.assert_allclose(routing.weights.sum(axis=-1), 1.0, rtol=1e-5)
    quality = preview.quality
    assert quality.prompts == 6
    assert quality.tokens == sum(len(t) for t in preview.tokens)
    assert sum(quality.usage) == pytest.approx(1.0)
    # Each token's weights are the router softmax over the independently recomputed router input.
    texts = [text for group in tests for text in group]
    for routing, state in zip(
        preview.routings, reference_router_inputs(llama_donors["base"], texts, "last"), strict=True
    ):
        expected = torch.softmax(torch.einsum("lh,leh->le", state, gates.router), dim=-1)
        np.testing.assert_allclose(routing.weights[:, -1], expected.numpy(), rtol=1e-4, atol=1e-6)
    computer.close()


def test_gates_in_a_chosen_dtype(llama_donors):
    recipe = make_recipe(llama_donors, "hidden")
    full = run_job(compute_gates(recipe, device="cpu")).router
    half = run_job(compute_gates(recipe, device="cpu", dtype="bfloat16")).router
    assert not torch.equal(full, half)  # it really ran in bfloat16
    cosine = torch.nn.functional.cosine_similarity(full, half, dim=-1)
    assert cosine.min() > 0.99


@pytest.mark.parametrize("mode", ["cheap_embed", "hidden", "calibrated"])
def test_gates_of_a_llama_base_do_not_import_transformers(llama_donors, mode, tmp_path):
    """transformers' imports take longer than a 250M-parameter gate computation: the gates must not need them."""
    recipe_file = tmp_path / "recipe.yml"
    recipe_file.write_text(dump_recipe(make_recipe(llama_donors, mode)))
    script = (
        "import sys; from pathlib import Path\n"
        "from app.core.merge.gates import compute_gates\n"
        "from app.core.progress import run_job\n"
        "from app.core.recipe import parse_recipe\n"
        f"result = run_job(compute_gates(parse_recipe(Path({str(recipe_file)!r}).read_text()), device='cpu'))\n"
        "assert result.router.shape[1] == 3, result.router.shape\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'transformers'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
