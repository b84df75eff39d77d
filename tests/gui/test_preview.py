"""The Preview page: computes by itself when that is quick, says what to do next, shows the top-k picks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QCoreApplication

from app.gui.main_window import Step
from app.gui.pages import preview
from tests.gui.conftest import screenshot

WORK_TIMEOUT_MS = 60_000


def without_test_prompts(recipe):
    extras = tuple(extra.model_copy(update={"test_prompts": ()}) for extra in recipe.studio.experts)
    return recipe.model_copy(update={"studio": recipe.studio.model_copy(update={"experts": extras})})


def test_the_preview_of_a_tiny_model_computes_on_arrival(window, qtbot, demo_recipe: Path) -> None:
    assert window.open_recipe(demo_recipe)
    page = window.preview_page
    recipe = window.document.recipe
    test_prompts = sum(len(extras.test_prompts) for extras in recipe.studio.experts)
    assert test_prompts > 0
    # Before: the placeholder asks for what is missing (a computation), not for prompts that exist.
    assert page.routing.empty_text == f"Compute the preview to see where the {test_prompts} test prompts go."
    assert not page.progress.isVisibleTo(page)

    with qtbot.waitSignal(page.computed, timeout=WORK_TIMEOUT_MS):
        window.show_step(Step.PREVIEW)
        assert page.estimate_job is not None  # judged in a worker: the window did not wait
    qtbot.waitUntil(lambda: not page.progress.isVisible(), timeout=WORK_TIMEOUT_MS)
    assert page.result is not None and page.result.recipe == recipe

    # Every layer outlines its top-k experts (the demo routes each token to 2), likeliest first.
    routing = page.routing.data
    assert routing is not None and recipe.experts_per_token == 2
    assert not routing.outlined
    for row, marked in zip(routing.values, routing.marked, strict=True):
        assert len(marked) == 2 and len(set(marked)) == 2
        assert list(marked) == [int(i) for i in np.argsort(-np.asarray(row), kind="stable")[:2]]
    assert routing.outline_legend == "the 2 experts each layer picks (top 2)"
    screenshot(window, "3-preview-on-arrival")

    # The progress bar shows only while working.
    page.compute_button.click()
    assert page.progress.isVisible()
    qtbot.waitUntil(lambda: page.compute_button.isEnabled(), timeout=WORK_TIMEOUT_MS)
    assert not page.progress.isVisible()

    # Without test prompts, the placeholder asks for some.
    window.document.edit(without_test_prompts(recipe), "remove the test prompts")
    assert page.routing.empty_text == "Add test prompts on the Prompts page to see where they go."


def test_a_preview_that_is_not_quick_waits_for_compute(
    window, qtbot, demo_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preview, "AUTO_PREVIEW_MAX_PARAMETERS", 0)  # as if the base were a 7B model
    assert window.open_recipe(demo_recipe)
    page = window.preview_page
    window.show_step(Step.PREVIEW)
    assert page.estimate_job is not None
    with qtbot.waitSignal(page.estimate_job.finished, timeout=WORK_TIMEOUT_MS):
        pass
    QCoreApplication.processEvents()
    assert page.result is None and page.job is None
    assert page.compute_button.isEnabled() and not page.progress.isVisible()
    assert page.status.text() == preview.COMPUTE_HINT
    assert page.routing.data is None and "Compute the preview to see where the 9 test prompts go" in (
        page.routing.empty_text
    )
    screenshot(window, "3-preview-waiting")
