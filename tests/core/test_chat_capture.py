"""Routing capture against an independent recomputation, for every MoE architecture."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from app.core.chat import LoadRequest, SamplingSettings, TokenGenerated, load_chat_model
from app.core.chat.capture import RoutingRule, find_routers, route_logits, routing_rule
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.progress import run_job
from app.core.recipe import parse_recipe
from tests.chat_models import make_tiny_moe

MERGED_RECIPE = """
base_model: {base}
gate_mode: hidden
dtype: float32
experts_per_token: 2
experts:
  - source_model: {expert0}
    positive_prompts: ["maths and sums"]
  - source_model: {expert1}
    positive_prompts: ["python code"]
  - source_model: {expert2}
    positive_prompts: ["stories and prose"]
frankenmoe:
  experts:
    - {{label: maths, color: "#e4572e"}}
    - {{label: code}}
    - {{}}
"""


@pytest.fixture(scope="module")
def merged_moe(llama_donors, tmp_path_factory):
    recipe = parse_recipe(MERGED_RECIPE.format(**{k: v for k, v in llama_donors.items()}))
    out = tmp_path_factory.mktemp("chat") / "merged"
    run_job(merge_moe(recipe, MergeOptions(out_dir=out)))
    return out


@pytest.fixture(scope="module")
def moe_folders(merged_moe, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    folders = {"merged mixtral": merged_moe}
    for architecture in ("mixtral", "qwen2_moe", "qwen3_moe"):
        folders[architecture] = make_tiny_moe(root / architecture, architecture, seed=7)
    return folders


def recompute(model, token_ids):
    """Top-k experts and weights per token and layer, from one full forward with output_router_logits.

    Top-k and the renormalisation come from the model's config, as transformers' own MoE blocks read
    them: Mixtral always renormalises, Qwen-MoE when norm_topk_prob says so.
    """
    config = model.config
    top_k = config.num_experts_per_tok
    renormalise = True if config.model_type == "mixtral" else config.norm_topk_prob
    with torch.no_grad():
        output = model(torch.tensor([token_ids]), output_router_logits=True)
    experts, weights, probs = [], [], []
    for logits in output.router_logits:
        distribution = torch.softmax(logits.float(), dim=-1)
        top_weights, top_experts = torch.topk(distribution, top_k, dim=-1)
        if renormalise:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        experts.append(top_experts.numpy())
        weights.append(top_weights.numpy())
        probs.append(distribution.numpy())
    # layers x tokens x k -> tokens x layers x k
    return np.stack(experts, axis=1), np.stack(weights, axis=1), np.stack(probs, axis=1)


@pytest.mark.parametrize("architecture", ["merged mixtral", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_trace_equals_an_independent_recomputation(moe_folders, architecture):
    chat = run_job(load_chat_model(LoadRequest(str(moe_folders[architecture]), device="cpu")))
    try:
        ids = chat.prompt_ids([{"role": "user", "content": "What is 12 plus 30? def add(a, b):"}])
        result = run_job(chat.generate(ids, SamplingSettings(seed=5, max_new_tokens=12), stop_token_ids=()))
        trace = result.trace
        assert [t.position for t in trace] == list(range(len(ids) + 12))
        assert [t.generated for t in trace] == [False] * len(ids) + [True] * 12
        assert [t.token_id for t in trace[: len(ids)]] == ids

        expected_experts, expected_weights, expected_probs = recompute(chat.model, [t.token_id for t in trace])
        assert expected_experts.shape[1] == len(chat.capture.layers)
        np.testing.assert_array_equal(np.array([t.experts for t in trace]), expected_experts)
        np.testing.assert_allclose(np.array([t.weights for t in trace]), expected_weights, atol=1e-5)
        np.testing.assert_allclose(np.array([t.probs for t in trace]), expected_probs, atol=1e-5)
        # The experts really differ between tokens: a capture stuck on one step would not pass.
        assert len({t.experts for t in trace}) > 3
    finally:
        chat.unload()


def test_routers_are_found_only_in_moe_layers(moe_folders, llama_donors):
    from transformers import AutoModelForCausalLM

    qwen2 = AutoModelForCausalLM.from_pretrained(moe_folders["qwen2_moe"])
    assert sorted(find_routers(qwen2)) == [0, 2]  # layer 1 is a dense MLP (mlp_only_layers)
    assert all(router.weight.shape == (4, 32) for router in find_routers(qwen2).values())
    dense = AutoModelForCausalLM.from_pretrained(llama_donors["base"])
    assert find_routers(dense) == {}


def test_capture_can_be_switched_off(moe_folders):
    chat = run_job(load_chat_model(LoadRequest(str(moe_folders["mixtral"]), device="cpu")))
    try:
        ids = chat.prompt_ids([{"role": "user", "content": "hello"}])
        settings = SamplingSettings(seed=1, max_new_tokens=5)
        plain = run_job(chat.generate(ids, settings, capture=False, stop_token_ids=()))
        traced = run_job(chat.generate(ids, settings, stop_token_ids=()))
        assert [t.token_id for t in plain.generated] == [t.token_id for t in traced.generated]
        assert all(t.experts == () for t in plain.trace)
        assert all(len(t.experts) == 2 for t in traced.trace)
    finally:
        chat.unload()


def test_stop_takes_effect_at_the_next_token(moe_folders):
    chat = run_job(load_chat_model(LoadRequest(str(moe_folders["merged mixtral"]), device="cpu")))
    try:
        stop = threading.Event()
        job = chat.generate(
            chat.prompt_ids([{"role": "user", "content": "Tell me a story"}]),
            SamplingSettings(seed=2, max_new_tokens=200),
            stop,
            stop_token_ids=(),
        )
        seen = 0
        while True:
            try:
                event = next(job)
            except StopIteration as finished:
                result = finished.value
                break
            if isinstance(event, TokenGenerated):
                seen += 1
                if seen == 3:
                    stop.set()
        assert result.stop_reason == "stopped"
        assert len(result.generated) == 3
        assert [t.position for t in result.generated] == [len(result.prompt) + i for i in range(3)]
        assert all(len(t.experts) == 2 for t in result.generated)  # the last token's routing too
    finally:
        chat.unload()


def test_legend_comes_from_the_merged_recipe(moe_folders):
    chat = run_job(load_chat_model(LoadRequest(str(moe_folders["merged mixtral"]), device="cpu")))
    try:
        assert chat.legend.labels == ("maths", "code", "expert 2")
        assert chat.legend.colors[0] == "#e4572e"
        assert len(set(chat.legend.colors)) == 3
    finally:
        chat.unload()


def test_only_qwen2_moe_has_a_shared_expert(moe_folders):
    for name, folder in moe_folders.items():
        chat = run_job(load_chat_model(LoadRequest(str(folder), device="cpu")))
        try:
            assert chat.has_shared_expert == (name == "qwen2_moe"), name
        finally:
            chat.unload()


def test_the_routing_rule_comes_from_the_config(moe_folders):
    from transformers import AutoConfig

    rules = {name: routing_rule(AutoConfig.from_pretrained(folder), 4) for name, folder in moe_folders.items()}
    assert rules["mixtral"] == RoutingRule(num_experts=4, top_k=2, renormalise=True)
    assert rules["qwen2_moe"] == RoutingRule(num_experts=4, top_k=2, renormalise=False)
    assert rules["qwen3_moe"] == RoutingRule(num_experts=4, top_k=3, renormalise=True)


@pytest.mark.parametrize("renormalise", [True, False])
def test_top_k_weights_are_renormalised_only_when_the_rule_says_so(renormalise):
    logits = np.log(np.array([[0.1, 0.4, 0.2, 0.3]], dtype=np.float32))
    probs, weights, experts = route_logits(logits, RoutingRule(num_experts=4, top_k=2, renormalise=renormalise))
    np.testing.assert_allclose(probs, [[0.1, 0.4, 0.2, 0.3]], rtol=1e-6)
    assert experts.tolist() == [[1, 3]]
    expected = [[0.4 / 0.7, 0.3 / 0.7]] if renormalise else [[0.4, 0.3]]
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
