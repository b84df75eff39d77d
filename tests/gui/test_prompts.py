"""The Prompts page's output architecture and shared expert choices, and the experts' scales."""

from __future__ import annotations

from app.gui import recipe_edits
from app.gui.main_window import Step
from tests.gui.conftest import screenshot


def open_two_experts(document) -> None:
    """A new recipe on a Hub base with a maths and a code expert."""
    document.new()
    recipe = recipe_edits.set_base(document.recipe, "org/base-model")
    recipe = recipe_edits.add_expert(recipe, "org/maths-model", "maths")
    document.edit(recipe_edits.add_expert(recipe, "org/code-model", "code"), "Add models")


def test_architecture_choices_and_a_shared_expert(window) -> None:
    document, page = window.document, window.prompts_page
    open_two_experts(document)

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


def test_scales_and_the_shared_expert_s_prompts_are_edited_on_the_page(window) -> None:
    document, page = window.document, window.prompts_page
    open_two_experts(document)
    assert page.experts.count() == 2 and page.noise_scale.text() == "none"

    page.experts.setCurrentRow(1)
    page.residual_scale.setValue(0.5)
    page.residual_scale.setValue(0.6)
    page.noise_scale.setValue(0.01)
    code = document.recipe.experts[1]
    assert (code.residual_scale, code.noise_scale) == (0.6, 0.01)
    assert document.recipe.experts[0].residual_scale is None
    document.undo_stack.undo()  # the noise
    document.undo_stack.undo()  # both residual steps, as one edit
    assert (document.recipe.experts[1].residual_scale, document.recipe.experts[1].noise_scale) == (None, None)
    document.undo_stack.redo()
    page.residual_scale.setValue(0.0)  # "none" again
    assert document.recipe.experts[1].residual_scale is None

    page.architecture.setCurrentIndex(page.architecture.findData("qwen"))
    page.shared_expert.setCurrentIndex(page.shared_expert.findData("org/base-model"))
    assert page.experts.count() == 3 and page.experts.item(2).text() == "Shared expert"
    page.experts.setCurrentRow(2)
    assert page.shared_selected and page.current_expert == -1
    assert not page.tabs.isTabEnabled(2) and page.shared_row_help.isVisibleTo(page)
    page.positive.add_many("always on for maths\nand for sums")
    page.residual_scale.setValue(2.0)
    shared = document.recipe.shared_experts[0]
    assert shared.positive_prompts == ("always on for maths", "and for sums") and shared.residual_scale == 2.0
    assert all(e.positive_prompts == () for e in document.recipe.experts)
    window.show_step(Step.PROMPTS)
    screenshot(window, "prompts-shared-expert")

    page.experts.setCurrentRow(0)
    assert page.positive.prompts == () and page.tabs.isTabEnabled(2) and not page.shared_row_help.isVisibleTo(page)
    assert page.residual_scale.text() == "none"
