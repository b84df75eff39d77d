"""The merged model's card takes its licence from the base model's own card."""

from __future__ import annotations

import shutil

import pytest

from app.core.merge.modelcard import ModelCardFields, base_license, render_model_card
from tests.core.test_merge import merge, recipe_for


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
    chosen = render_model_card(recipe, ModelCardFields(license="mit"), base, "moe")
    assert chosen.startswith("---\nlicense: mit\n")
    assert render_model_card(recipe, ModelCardFields(), llama_donors["base"], "moe").startswith("---\nlicense: other\n")
