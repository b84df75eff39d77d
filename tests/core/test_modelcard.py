"""The merged model's card gets published: it names donors by Hub id or folder name, tags the real architecture
and takes its licence from the base model's own card."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from app.core.merge.modelcard import ModelCardFields, base_license, render_model_card
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
