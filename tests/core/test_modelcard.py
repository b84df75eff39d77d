"""The merged model's card gets published: it names donors by Hub id or folder name, tags the real architecture
and takes its licence from the base model's own card."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from app.core.eval.card import add_to_model_card
from app.core.merge.modelcard import (
    ModelCardFields,
    base_license,
    card_sections,
    card_title_and_description,
    choose_license,
    render_model_card,
)
from app.core.merge.pipeline import RECIPE_FILENAME, MergeOptions, merge_moe
from app.core.progress import run_job
from app.core.recipe import load_recipe, parse_recipe
from tests.core.test_merge import merge, recipe_for


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_the_card_names_hub_donors_by_id_and_local_ones_by_folder_name_only(tmp_path: Path) -> None:
    cached = tmp_path / "cache" / "hub" / "models--meta-math--MetaMath-Mistral-7B" / "snapshots" / "0123abcd"
    recipe = parse_recipe(
        "\n".join(
            [
                "base_model: mistralai/Mistral-7B-Instruct-v0.2@main",
                "experts:",
                f"  - source_model: {cached}",
                "  - source_model: /root/private/projects/my-coder/",
                "  - source_model: ./models/prose-writer",
            ]
        )
    )
    card = render_model_card(recipe, ModelCardFields(), tmp_path, "moe", "mixtral")
    assert str(tmp_path) not in card and "/root/" not in card and "./models" not in card
    front = front_matter(card)
    assert front["base_model"] == ["mistralai/Mistral-7B-Instruct-v0.2", "meta-math/MetaMath-Mistral-7B"]
    assert front["base_model_relation"] == "merge"
    assert "`meta-math/MetaMath-Mistral-7B`" in card
    assert "`my-coder`" in card and "`prose-writer`" in card
    assert "`mistralai/Mistral-7B-Instruct-v0.2@main`" in card  # the revision the user asked for stays
    recipe_in_card = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert [e["source_model"] for e in recipe_in_card["experts"]] == [
        "meta-math/MetaMath-Mistral-7B",
        "my-coder",
        "prose-writer",
    ]


def test_a_qwen2_moe_card_is_tagged_with_its_own_architecture_and_the_saved_recipe_is_the_users(
    qwen2_donors: dict[str, Path], tmp_path: Path
) -> None:
    lines = [f"base_model: {qwen2_donors['base']}", "gate_mode: random", "dtype: float32", "experts:"]
    lines += [f"  - source_model: {qwen2_donors[f'expert{index}']}" for index in range(3)]
    lines += ["shared_experts:", f"  - source_model: {qwen2_donors['shared']}"]
    recipe = parse_recipe("\n".join(lines))
    out = tmp_path / "moe"
    run_job(merge_moe(recipe, MergeOptions(out_dir=out, device="cpu")))
    card = (out / "README.md").read_text(encoding="utf-8")
    tags = front_matter(card)["tags"]
    assert "qwen2_moe" in tags and "mixtral" not in tags
    assert str(qwen2_donors["base"].parent) not in card
    assert f"`{qwen2_donors['expert1'].name}`" in card
    # The recipe beside the model is what the user wrote, so that the merge can be run again from it.
    assert load_recipe(out / RECIPE_FILENAME) == recipe
    assert str(qwen2_donors["expert1"]) in (out / RECIPE_FILENAME).read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("readme", "expected"),
    [
        ("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# Base\n", "apache-2.0"),
        ("---\r\nlicense: llama3\r\n---\r\n", "llama3"),  # Windows line endings
        ("---\nlanguage: en\n---\n", None),  # front matter without a licence
        ("# Base\n\nlicense: mit\n", None),  # no front matter: prose does not count
        ("---\nlicense: [unclosed\n---\n", None),  # broken YAML
        (None, None),  # no card at all
    ],
)
def test_base_license_reads_only_the_card_s_front_matter(tmp_path, readme, expected):
    if readme is not None:
        (tmp_path / "README.md").write_bytes(readme.encode())
    assert base_license(tmp_path) == expected


def test_the_merged_card_carries_the_base_model_s_licence(llama_donors, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llama_donors["base"], base)
    (base / "README.md").write_text("---\nlicense: llama3\n---\n# The base\n")
    donors = {**llama_donors, "base": base}
    merge(recipe_for(donors), tmp_path / "moe")
    assert (tmp_path / "moe" / "README.md").read_text().startswith("---\nlicense: llama3\n")
    # A licence the user gives wins over the base model's; without either it is "other".
    recipe = recipe_for(donors)
    chosen = render_model_card(recipe, ModelCardFields(license="mit"), base, "moe", "mixtral")
    assert chosen.startswith("---\nlicense: mit\n")
    default_card = render_model_card(recipe, ModelCardFields(), llama_donors["base"], "moe", "mixtral")
    assert default_card.startswith("---\nlicense: other\n")


@pytest.mark.parametrize(
    ("licenses", "expected", "conflict", "unknown"),
    [
        ({"a": "mit", "b": "apache-2.0"}, "apache-2.0", True, ()),  # both permissive: either, chosen stably
        ({"a": "gpl-3.0", "b": "cc-by-sa-4.0"}, "other", True, ()),  # two share-alike terms do not combine
        ({"a": "apache-2.0", "b": "llama3"}, "llama3", True, ()),
        ({"a": "llama3", "b": "gemma"}, "other", True, ()),  # two custom terms cannot be ordered
        ({"a": "llama3", "b": "cc-by-nc-4.0"}, "cc-by-nc-4.0", True, ()),
        ({"a": "apache-2.0", "b": "Apache-2.0"}, "apache-2.0", False, ()),
        ({"a": "apache-2.0", "b": None}, "apache-2.0", False, ("b",)),
    ],
)
def test_the_licence_is_the_donors_most_restrictive_and_an_unknown_one_is_reported(
    licenses, expected, conflict, unknown
):
    decision = choose_license(licenses)
    assert decision.license == expected and decision.unknown == unknown
    assert bool(decision.warnings) == conflict
    if conflict:
        assert all(f"{name}: {value.lower()}" in decision.warnings[0] for name, value in licenses.items())


def test_a_qwen3_moe_card_validates_with_huggingface_hub(qwen3_donors, tmp_path):
    lines = [f"base_model: {qwen3_donors['base']}", "gate_mode: random", "dtype: float32", "experts:"]
    lines += [f"  - source_model: {qwen3_donors[f'expert{index}']}" for index in range(3)]
    out = tmp_path / "moe"
    run_job(merge_moe(parse_recipe("\n".join(lines)), MergeOptions(out_dir=out, device="cpu")))
    card = ModelCard.load(out / "README.md")
    assert {"moe", "frankenmoe", "qwen3_moe"} <= set(card.data.tags) and "mixtral" not in card.data.tags
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "frankenmoe export-gguf moe" in card.text  # how to run it in llama.cpp: convert first


def test_a_new_rendering_keeps_the_title_router_training_and_evaluation_sections(llama_donors, tmp_path):
    out = tmp_path / "moe"
    recipe = recipe_for(llama_donors)
    merge(recipe, out, card=ModelCardFields(name="Tiny MoE", description="Knows sums.\n\nAnd code."))
    report = {"models": ["moe"], "datasets": ["wiki"], "results": [{"model": "moe", "dataset": "wiki", "ppl": 12.5}]}
    add_to_model_card(out, report)
    readme = out / "README.md"
    readme.write_text(readme.read_text() + "\n## Router training\n\n200 steps; validation loss 3.1 -> 2.7.\n")
    existing = readme.read_text()
    card = render_model_card(
        recipe,
        card_title_and_description(existing),
        llama_donors["base"],
        "moe",
        "mixtral",
        license_id="apache-2.0",
        repo_id="alice/tiny-moe",
        preview_image="routing-preview.png",
        kept_sections=card_sections(existing),
    )
    assert card.count("## Router training") == 1 and "validation loss 3.1 -> 2.7" in card
    assert card.count("## Evaluation") == 1 and "**12.500**" in card
    assert "# Tiny MoE\n\nKnows sums.\n\nAnd code.\n" in card
    assert "![Routing preview](routing-preview.png)" in card and 'from_pretrained("alice/tiny-moe"' in card
    assert ModelCard(card).data.license == "apache-2.0"


def test_a_lora_expert_counts_its_model_and_its_adapter_as_donors(tmp_path: Path) -> None:
    from app.core.merge.modelcard import donor_licenses

    adapter = tmp_path / "maths-lora"
    adapter.mkdir()
    (adapter / "README.md").write_text("---\nlicense: cc-by-nc-4.0\nlibrary_name: peft\n---\n# maths\n")
    recipe = parse_recipe(
        f"""
base_model: org/base
experts:
  - source_model: org/chat+org/chat-lora@v2
    positive_prompts: ["chat"]
  - source_model: org/base+{adapter}
    positive_prompts: ["maths"]
"""
    )
    card = render_model_card(recipe, ModelCardFields(), tmp_path, "moe", "mixtral")
    # Hub adapters are donors the Hub links to; a local adapter is named by its folder in the text only.
    assert front_matter(card)["base_model"] == ["org/base", "org/chat", "org/chat-lora"]
    assert str(tmp_path) not in card and "maths-lora" in card
    # The local adapter's own card states a licence, which the merge's licence choice must see.
    assert donor_licenses(recipe)["maths-lora"] == "cc-by-nc-4.0"
