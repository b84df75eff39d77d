"""The Prompts page's output architecture and shared expert choices."""

from __future__ import annotations

from app.gui import recipe_edits


def test_architecture_choices_and_a_shared_expert(window) -> None:
    document, page = window.document, window.prompts_page
    document.new()
    recipe = recipe_edits.set_base(document.recipe, "org/base-model")
    recipe = recipe_edits.add_expert(recipe, "org/maths-model", "maths")
    document.edit(recipe_edits.add_expert(recipe, "org/code-model", "code"), "Add models")

    names = [page.architecture.itemData(i) for i in range(page.architecture.count())]
    assert names == ["", "mixtral", "qwen", "qwen3"]
    assert page.architecture.itemText(2) == "Qwen2-MoE (qwen)"
    page.architecture.setCurrentIndex(names.index("qwen"))
    assert document.recipe.architecture == "qwen"
    assert "shared expert" in page.architecture_help.text()

    references = [page.shared_expert.itemData(i) for i in range(page.shared_expert.count())]
    assert references == ["", "org/base-model", "org/maths-model", "org/code-model"]
    page.shared_expert.setCurrentIndex(1)
    assert [str(e.source_model) for e in document.recipe.shared_experts] == ["org/base-model"]
    assert "The base model" in page.shared_expert.currentText()

    page.architecture.setCurrentIndex(names.index("mixtral"))  # Mixtral has no shared expert: said, not hidden
    assert "has no shared expert" in page.settings_problems.text()
    assert page.shared_expert.isEnabled()
    page.shared_expert.setCurrentIndex(0)
    assert document.recipe.shared_experts == ()
    assert not page.shared_expert.isEnabled() and "has no shared expert" not in page.settings_problems.text()

    document.undo_stack.undo()
    assert [str(e.source_model) for e in document.recipe.shared_experts] == ["org/base-model"]
