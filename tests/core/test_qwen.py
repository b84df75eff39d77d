"""Qwen2-MoE (with a shared expert) and Qwen3-MoE outputs: layout, config, tensors, gates and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from app.core.compat import check_recipe, compare_configs
from app.core.merge.architectures import (
    QWEN2_MOE,
    QWEN3_MOE,
    ArchitectureRefused,
    MoEShape,
    choose_architecture,
    qwen2_moe_config,
    qwen3_moe_config,
)
from app.core.merge.gates import compute_gates
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.problems import ProblemsError, Severity
from app.core.progress import run_job
from app.core.recipe import parse_recipe
from tests.core.test_gates import reference_router_inputs
from tests.models import read_config

TOPICS = ["maths and sums", "python code", "stories and prose"]
SHARED_PROMPTS = ["The answer is 42.", "Le chat dort sur le rebord de la fenetre."]


def recipe_for(donors, gate_mode="hidden", shared=None, architecture=None, top_k=2):
    lines = [f"base_model: {donors['base']}", f"gate_mode: {gate_mode}", "dtype: float32"]
    lines += [f"experts_per_token: {top_k}", "experts:"]
    for index, topic in enumerate(TOPICS):
        lines += [f"  - source_model: {donors[f'expert{index}']}", f"    positive_prompts: [{json.dumps(topic)}]"]
    if shared is not None:
        lines += ["shared_experts:", *(f"  {line}" for line in shared)]
    if architecture:
        lines.append(f"architecture: {architecture}")
    return parse_recipe("\n".join(lines))


def load_all(folder):
    tensors = {}
    for file in folder.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


def merge(recipe, out):
    return run_job(merge_moe(recipe, MergeOptions(out_dir=out, device="cpu", shard_size=40_000)))


def assert_loads_generates_and_reports_router_logits(out, class_name):
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == class_name
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 2?"}], add_generation_prompt=True, return_tensors="pt"
    )
    inputs = inputs if isinstance(inputs, torch.Tensor) else inputs["input_ids"]
    output = model.generate(inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] == inputs.shape[1] + 4
    with torch.no_grad():
        routed = model(inputs, output_router_logits=True)
    assert torch.isfinite(routed.logits).all()
    assert len(routed.router_logits) == model.config.num_hidden_layers
    assert routed.router_logits[0].shape[-1] == 3
    return model


def assert_layout_matches_save_pretrained(out, config_class, model_class, tmp_path):
    ours = json.loads((out / "config.json").read_text())
    reference = model_class(config_class(**{k: v for k, v in ours.items() if k != "architectures"}))
    reference.save_pretrained(tmp_path / "reference")
    expected = {k: tuple(v.shape) for k, v in load_all(tmp_path / "reference").items()}
    assert {k: tuple(v.shape) for k, v in load_all(out).items()} == expected
    for key, value in json.loads((tmp_path / "reference" / "config.json").read_text()).items():
        assert ours[key] == value, key
    return ours


# --------------------------------------------------------------------------- Qwen2-MoE


@pytest.fixture(scope="module")
def qwen2_merged(qwen2_donors, tmp_path_factory):
    shared = [
        f"- source_model: {qwen2_donors['shared']}",
        f"  positive_prompts: {json.dumps(SHARED_PROMPTS)}",
        "  residual_scale: 0.5",
    ]
    recipe = recipe_for(qwen2_donors, shared=shared)
    out = tmp_path_factory.mktemp("qwen2-merged") / "moe"
    return recipe, merge(recipe, out), out


def test_qwen2_donors_become_a_qwen2_moe_that_loads_and_generates(qwen2_merged):
    _recipe, _result, out = qwen2_merged
    model = assert_loads_generates_and_reports_router_logits(out, "Qwen2MoeForCausalLM")
    assert model.config.num_experts == 3
    assert model.config.num_experts_per_tok == 2
    assert model.config.norm_topk_prob is True
    assert model.config.moe_intermediate_size == 64
    assert model.config.shared_expert_intermediate_size == 96  # the shared donor's own MLP size


def test_qwen2_moe_layout_and_config_match_save_pretrained(qwen2_merged, tmp_path):
    _recipe, _result, out = qwen2_merged
    ours = assert_layout_matches_save_pretrained(out, Qwen2MoeConfig, Qwen2MoeForCausalLM, tmp_path)
    assert ours["qkv_bias"] is True
    # transformers 4 reads these legacy keys; without rope_theta it would use the class default.
    assert ours["rope_theta"] == 10000.0
    assert ours["torch_dtype"] == "float32"


def test_qwen2_moe_tensors_come_from_their_donors(qwen2_merged, qwen2_donors):
    _recipe, result, out = qwen2_merged
    written = load_all(out)
    base = load_all(qwen2_donors["base"])
    for name, tensor in base.items():
        if ".mlp." not in name:
            assert torch.equal(written[name], tensor), name  # q/k/v biases included
    assert any(name.endswith("q_proj.bias") for name in base)
    shared = load_all(qwen2_donors["shared"])
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp"
        for expert in range(3):
            donor = load_all(qwen2_donors[f"expert{expert}"])
            for projection in ("gate", "up", "down"):
                name = f"{projection}_proj.weight"
                assert torch.equal(written[f"{prefix}.experts.{expert}.{name}"], donor[f"{prefix}.{name}"])
        for projection, scale in (("gate", 1.0), ("up", 1.0), ("down", 0.5)):  # residual_scale on down
            name = f"{projection}_proj.weight"
            assert torch.equal(written[f"{prefix}.shared_expert.{name}"], shared[f"{prefix}.{name}"] * scale)
        assert torch.equal(written[f"{prefix}.gate.weight"], result.gates.router[layer])
        assert torch.equal(written[f"{prefix}.shared_expert_gate.weight"], result.gates.shared_router[layer][None])


def test_shared_expert_gate_is_its_prompts_router_input(qwen2_merged, qwen2_donors):
    """Computed like the routed experts' gates: mean router input at the prompts' last tokens, unit length.

    The reference reads tokenizer.json as saved (PreTrainedTokenizerFast), as the gates do: for a model
    of type qwen2, transformers 5's AutoTokenizer ignores tokenizer_class and rebuilds Qwen 2's own
    pipeline (one token per digit) from the file's vocabulary, which the tiny donors' GPT-2 style
    tokenizer.json does not use ("42" is one token there). Real Qwen 2 files use that pipeline anyway.
    """
    _recipe, result, _out = qwen2_merged
    states = reference_router_inputs(qwen2_donors["base"], SHARED_PROMPTS, "last", PreTrainedTokenizerFast)
    vector = torch.stack(states).mean(dim=0)
    vector = vector / vector.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(result.gates.shared_router, vector, rtol=1e-5, atol=1e-5)
    for index, topic in enumerate(TOPICS):
        (state,) = reference_router_inputs(qwen2_donors["base"], [topic], "last", PreTrainedTokenizerFast)
        torch.testing.assert_close(result.gates.router[:, index], state / state.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("gate_mode", ["hidden", "random"])
def test_shared_expert_without_prompts_is_always_on(qwen2_donors, tmp_path, gate_mode):
    """As-good-as-zero gate, sigmoid = 1/2, down projection doubled: exactly the donor's MLP for every token."""
    recipe = recipe_for(qwen2_donors, gate_mode, shared=[f"- source_model: {qwen2_donors['shared']}"])
    merge(recipe, tmp_path / "moe")
    written = load_all(tmp_path / "moe")
    shared = load_all(qwen2_donors["shared"])
    gate = written["model.layers.1.mlp.shared_expert_gate.weight"]
    # Never exactly zero: llama.cpp computes this sigmoid as silu(z) / z, NaN for z = 0.
    assert gate.shape == (1, 32) and gate.count_nonzero() == 1 and 0 < gate.abs().max() < 1e-3
    down = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(written["model.layers.1.mlp.shared_expert.down_proj.weight"], shared[down] * 2)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").model.layers[1].mlp
    donor = AutoModelForCausalLM.from_pretrained(qwen2_donors["shared"]).model.layers[1].mlp
    tokens = torch.randn(7, 32, generator=torch.Generator().manual_seed(0)) * 5
    with torch.no_grad():
        contribution = torch.sigmoid(moe.shared_expert_gate(tokens)) * moe.shared_expert(tokens)
        torch.testing.assert_close(contribution, donor(tokens))


def test_llama_donors_become_qwen2_moe_when_asked(llama_donors, tmp_path):
    shared = [f"- source_model: {llama_donors['expert3']}", "  positive_prompts: [french words]"]
    recipe = recipe_for(llama_donors, "cheap_embed", shared=shared, architecture="qwen")
    merge(recipe, tmp_path / "moe")
    assert_loads_generates_and_reports_router_logits(tmp_path / "moe", "Qwen2MoeForCausalLM")
    written = load_all(tmp_path / "moe")
    # Llama attention has no biases; Qwen2-MoE's always adds them, so they are written as zeros.
    assert torch.equal(written["model.layers.0.self_attn.q_proj.bias"], torch.zeros(32))
    assert torch.equal(written["model.layers.1.self_attn.k_proj.bias"], torch.zeros(16))


# --------------------------------------------------------------------------- Qwen3-MoE


@pytest.fixture(scope="module")
def qwen3_merged(qwen3_donors, tmp_path_factory):
    recipe = recipe_for(qwen3_donors, "hidden_avg", top_k=1)
    out = tmp_path_factory.mktemp("qwen3-merged") / "moe"
    return recipe, merge(recipe, out), out


def test_qwen3_donors_become_a_qwen3_moe_that_loads_and_generates(qwen3_merged):
    _recipe, _result, out = qwen3_merged
    model = assert_loads_generates_and_reports_router_logits(out, "Qwen3MoeForCausalLM")
    assert model.config.head_dim == 16
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_qwen3_moe_layout_and_config_match_save_pretrained(qwen3_merged, tmp_path):
    _recipe, _result, out = qwen3_merged
    ours = assert_layout_matches_save_pretrained(out, Qwen3MoeConfig, Qwen3MoeForCausalLM, tmp_path)
    assert "lm_head.weight" not in load_all(out)  # tied, as save_pretrained writes it
    assert ours["rope_theta"] == 1000000.0
    assert ours["rope_parameters"]["rope_theta"] == 1000000.0
    assert ours["num_experts"] == ours["num_local_experts"] == 3  # transformers 4 reads num_experts
    assert ours["norm_topk_prob"] is True


def test_qwen3_moe_tensors_come_from_their_donors(qwen3_merged, qwen3_donors):
    recipe, result, out = qwen3_merged
    written = load_all(out)
    base = load_all(qwen3_donors["base"])
    for name, tensor in base.items():
        if ".mlp." not in name:
            assert torch.equal(written[name], tensor), name  # q_norm and k_norm included
    assert "model.layers.0.self_attn.q_norm.weight" in base
    for expert in range(3):
        donor = load_all(qwen3_donors[f"expert{expert}"])
        for projection in ("gate", "up", "down"):
            name = f"model.layers.1.mlp.{projection}_proj.weight"
            assert torch.equal(written[f"model.layers.1.mlp.experts.{expert}.{projection}_proj.weight"], donor[name])
    assert torch.equal(written["model.layers.0.mlp.gate.weight"], result.gates.router[0])
    torch.testing.assert_close(run_job(compute_gates(recipe, device="cpu")).router, result.gates.router)


def test_qwen_names_qwen3_moe_for_qwen3_donors_as_mergekit_does(qwen3_donors, tmp_path):
    """mergekit-moe matches `qwen` as a prefix and takes the Qwen architecture that fits the donors."""
    merge(recipe_for(qwen3_donors, "random", architecture="qwen"), tmp_path / "moe")
    assert read_config(tmp_path / "moe")["architectures"] == ["Qwen3MoeForCausalLM"]


# --------------------------------------------------------------------------- refusals

LLAMA = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2}
QWEN2 = {**LLAMA, "model_type": "qwen2"}
QWEN3 = {**LLAMA, "model_type": "qwen3", "head_dim": 8}
# Qwen slides the window over the layers from max_window_layers on.
PARTLY_SLIDING = {"num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}
SHARED = ["- source_model: ./shared"]
DONORS = {"base": "./base", "expert0": "./a", "expert1": "./b", "expert2": "./c"}


def refusal(base_config, **recipe):
    with pytest.raises(ArchitectureRefused) as caught:
        choose_architecture(recipe_for(DONORS, **recipe), base_config)
    return caught.value


def test_the_architecture_follows_the_donors():
    assert choose_architecture(recipe_for(DONORS, shared=SHARED), QWEN2) is QWEN2_MOE
    assert choose_architecture(recipe_for(DONORS), QWEN3) is QWEN3_MOE
    assert choose_architecture(recipe_for(DONORS, shared=SHARED, architecture="qwen"), LLAMA) is QWEN2_MOE


def test_a_shared_expert_is_refused_of_mixtral():
    refused = refusal(LLAMA, shared=SHARED)
    assert refused.field == "shared_experts"
    assert refused.message == "Llama donors become Mixtral, which has no shared expert"
    assert "architecture: qwen" in refused.hint
    assert refusal(LLAMA, shared=SHARED, architecture="mixtral").field == "shared_experts"


def test_a_shared_expert_is_refused_of_qwen3():
    refused = refusal(QWEN3, shared=SHARED)
    assert refused.field == "shared_experts"
    assert refused.message == "Qwen3 donors become Qwen3-MoE, which has no shared expert"


def test_qwen2_moe_needs_its_shared_expert():
    refused = refusal(QWEN2)
    assert refused.field == "shared_experts"
    assert "exactly one shared expert in every layer; the recipe has 0" in refused.message


@pytest.mark.parametrize(
    ("base", "architecture", "message"),
    [
        (QWEN3, "mixtral", "a Qwen3 model cannot become Mixtral: it has q/k norms, which Mixtral cannot hold"),
        (
            QWEN2,
            "mixtral",
            "a Qwen2 model cannot become Mixtral: it has q/k/v attention biases, which Mixtral cannot hold",
        ),
        (QWEN3, "qwen", "a Qwen3 model cannot become Qwen2-MoE: it has q/k norms, which Qwen2-MoE cannot hold"),
        (LLAMA, "qwen3", "a Llama model cannot become Qwen3-MoE: it has no q/k norms, which Qwen3-MoE always applies"),
        (QWEN2, "qwen3", "a Qwen2 model cannot become Qwen3-MoE: it has no q/k norms, which Qwen3-MoE always applies"),
    ],
)
def test_impossible_architectures_are_refused_with_the_reason(base, architecture, message):
    shared = SHARED if architecture == "qwen" else None
    refused = refusal(base, architecture=architecture, shared=shared)
    assert (refused.field, refused.message) == ("architecture", message)
    assert "leave it out" in refused.hint


def test_a_window_over_some_layers_only_is_refused_where_it_would_slide_everywhere():
    refused = refusal({**QWEN3, **PARTLY_SLIDING}, architecture="qwen3")
    assert refused.message == (
        "a Qwen3 model cannot become Qwen3-MoE: its attention window slides over layers 2-3 only, "
        "and Qwen3-MoE slides it over every layer or none"
    )
    refused = refusal({**QWEN2, **PARTLY_SLIDING}, architecture="mixtral")
    assert "slides over layers 2-3 only, and Mixtral slides it over every layer or none" in refused.message


def test_a_window_over_some_layers_only_keeps_to_qwen2_moe():
    recipe = recipe_for(DONORS, architecture="qwen", shared=SHARED)
    assert choose_architecture(recipe, {**QWEN2, **PARTLY_SLIDING}).name == "qwen"
    sliding_everywhere = {**QWEN3, **PARTLY_SLIDING, "max_window_layers": 0}
    assert choose_architecture(recipe_for(DONORS, architecture="qwen3"), sliding_everywhere).name == "qwen3"


def test_llama_with_attention_biases_cannot_become_qwen2_moe():
    refused = refusal({**LLAMA, "attention_bias": True}, architecture="qwen", shared=SHARED)
    assert refused.message == (
        "a Llama model cannot become Qwen2-MoE: it has an attention output bias, which Qwen2-MoE cannot hold"
    )


def test_unknown_architecture_is_refused():
    refused = refusal(LLAMA, architecture="deepseek")
    assert refused.field == "architecture"
    assert "mixtral, qwen, qwen3" in refused.hint


def test_check_recipe_reports_the_refusal_on_real_donors(qwen3_donors):
    problems = check_recipe(recipe_for(qwen3_donors, "random", architecture="mixtral"))
    errors = [p for p in problems if p.severity is Severity.ERROR]
    assert [(p.field, "q/k norms" in p.message) for p in errors] == [("architecture", True)]
    with pytest.raises(ProblemsError):
        run_job(merge_moe(recipe_for(qwen3_donors, "random", architecture="mixtral"), MergeOptions(out_dir="/x")))


# --------------------------------------------------------------------------- compatibility


def test_qwen2_and_qwen3_donors_name_their_attention_differences():
    qwen2 = {**QWEN2, "intermediate_size": 64, "vocab_size": 320}
    qwen3 = {**qwen2, "model_type": "qwen3", "head_dim": 8}
    problems = compare_configs(qwen2, qwen3, "experts.0", QWEN2_MOE)
    assert [p.message for p in problems] == [
        "experts.0: a Qwen3 model cannot become Qwen2-MoE: it has q/k norms, which Qwen2-MoE cannot hold"
    ]


def test_attention_bias_difference_between_qwen3_donors_is_named():
    qwen3 = {**QWEN3, "intermediate_size": 64}
    (problem,) = compare_configs(qwen3, {**qwen3, "attention_bias": True}, "experts.1")
    assert problem.message == (
        "attention layout differs: base has q/k norms, experts.1 has q/k/v attention biases, an attention "
        "output bias and q/k norms; experts.1 was not fine-tuned from the base"
    )


def test_qwen_sliding_window_only_counts_when_switched_on():
    qwen2 = {**QWEN2, "intermediate_size": 64, "sliding_window": 4096, "use_sliding_window": False}
    assert compare_configs(qwen2, {**qwen2, "sliding_window": 32768}, "experts.0") == []
    (warning,) = compare_configs(qwen2, {**qwen2, "use_sliding_window": True}, "experts.0")
    assert warning.severity is Severity.WARNING
    assert "base has None, experts.0 has 4096" in warning.message


def test_only_the_shared_expert_may_have_its_own_mlp_size():
    qwen2 = {**QWEN2, "intermediate_size": 64}
    larger = {**qwen2, "intermediate_size": 96}
    assert compare_configs(qwen2, larger, "shared_experts.0", QWEN2_MOE, shared_expert=True) == []
    (problem,) = compare_configs(qwen2, larger, "experts.0", QWEN2_MOE)
    assert problem.message.startswith("intermediate size differs: base has 64, experts.0 has 96")


# --------------------------------------------------------------------------- carried settings

SHAPE = MoEShape(
    num_experts=4,
    experts_per_token=2,
    expert_intermediate_size=64,
    dtype="bfloat16",
    shared_expert_intermediate_size=96,
)
DENSE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 320,
}


@pytest.mark.parametrize(
    ("base", "layer_types", "max_window_layers"),
    [
        ({"model_type": "mistral", "sliding_window": 4096}, ["sliding_attention"] * 4, 0),
        ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}, ["full_attention"] * 4, 28),
        (
            {"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": True, "max_window_layers": 2},
            ["full_attention"] * 2 + ["sliding_attention"] * 2,
            2,
        ),
    ],
)
def test_qwen2_moe_keeps_the_base_s_sliding_window_layers(base, layer_types, max_window_layers):
    config = qwen2_moe_config({**DENSE, **base}, SHAPE)
    assert config["layer_types"] == layer_types
    assert config["max_window_layers"] == max_window_layers
    assert config["use_sliding_window"] is ("sliding_attention" in layer_types)
    assert Qwen2MoeConfig(**config).layer_types == layer_types


def test_qwen_configs_carry_rope_scaling_both_ways():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    base = {**DENSE, "model_type": "qwen3", "head_dim": 16, "rope_theta": 1e6, "rope_scaling": yarn}
    config = qwen3_moe_config(base, SHAPE)
    assert config["rope_parameters"] == {**yarn, "rope_theta": 1e6}
    assert (config["rope_theta"], config["rope_scaling"]) == (1e6, yarn)  # what transformers 4 reads
    assert Qwen3MoeConfig(**config).rope_parameters == config["rope_parameters"]
    assert (config["head_dim"], config["num_experts"], config["torch_dtype"]) == (16, 4, "bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_always_on_gate_leaves_transformers_output_unchanged(qwen2_donors, tmp_path, dtype):
    """The tiny gate computes, in the model's dtype, bit for bit what the former exactly-zero gate computed."""
    recipe = recipe_for(qwen2_donors, "random", shared=[f"- source_model: {qwen2_donors['shared']}"])
    run_job(merge_moe(recipe, MergeOptions(out_dir=tmp_path / "moe", dtype=dtype)))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=getattr(torch, dtype)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    gates = [layer.mlp.shared_expert_gate.weight for layer in model.model.layers]
    assert all(bool(gate.ne(0).any()) for gate in gates)
    with torch.no_grad():
        tiny = model(ids).logits
        for gate in gates:
            gate.zero_()
        zero = model(ids).logits
    assert torch.equal(tiny, zero)
