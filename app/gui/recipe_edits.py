"""Pure functions from one Recipe snapshot to the next; the pages push their results as undo steps.

Experts and their extras (label, colour, test prompts) are kept aligned by position, so every
function here that moves experts moves their extras with them.
"""

from __future__ import annotations

from typing import Any

from app.core.recipe import Expert, ExpertExtras, ModelRef, Recipe

# Distinct on light and dark backgrounds, and for the commonest colour-vision deficiencies (Okabe-Ito).
EXPERT_COLORS = ("#E69F00", "#56B4E9", "#009E73", "#CC79A7", "#0072B2", "#D55E00", "#F0E442", "#999999")


def expert_color(recipe: Recipe, index: int) -> str:
    return recipe.studio.experts[index].color or EXPERT_COLORS[index % len(EXPERT_COLORS)]


def _with_experts(recipe: Recipe, experts: list[Expert], extras: list[ExpertExtras]) -> Recipe:
    studio = recipe.studio.model_copy(update={"experts": tuple(extras)})
    return recipe.model_copy(update={"experts": tuple(experts), "studio": studio})


def set_base(recipe: Recipe, reference: str) -> Recipe:
    return recipe.model_copy(update={"base_model": ModelRef.parse(reference)})


def add_expert(recipe: Recipe, reference: str, label: str | None = None) -> Recipe:
    index = len(recipe.experts)
    used = {extras.color for extras in recipe.studio.experts}
    color = next((c for c in EXPERT_COLORS if c not in used), EXPERT_COLORS[index % len(EXPERT_COLORS)])
    expert = Expert(source_model=ModelRef.parse(reference))
    extras = ExpertExtras(label=label, color=color)
    return _with_experts(recipe, [*recipe.experts, expert], [*recipe.studio.experts, extras])


def remove_expert(recipe: Recipe, index: int) -> Recipe:
    experts = list(recipe.experts)
    extras = list(recipe.studio.experts)
    del experts[index], extras[index]
    return _with_experts(recipe, experts, extras)


def move_expert(recipe: Recipe, index: int, offset: int) -> Recipe:
    target = index + offset
    if not 0 <= target < len(recipe.experts):
        return recipe
    experts = list(recipe.experts)
    extras = list(recipe.studio.experts)
    experts[index], experts[target] = experts[target], experts[index]
    extras[index], extras[target] = extras[target], extras[index]
    return _with_experts(recipe, experts, extras)


def update_expert(recipe: Recipe, index: int, **changes: Any) -> Recipe:
    experts = list(recipe.experts)
    experts[index] = experts[index].model_copy(update=changes)
    return _with_experts(recipe, experts, list(recipe.studio.experts))


def update_extras(recipe: Recipe, index: int, **changes: Any) -> Recipe:
    extras = list(recipe.studio.experts)
    extras[index] = extras[index].model_copy(update=changes)
    return _with_experts(recipe, list(recipe.experts), extras)


def update_settings(recipe: Recipe, **changes: Any) -> Recipe:
    return recipe.model_copy(update=changes)


def set_adapter(recipe: Recipe, index: int, adapter: str | None) -> Recipe:
    """The expert's source as its model + ``adapter`` (a folder or a Hub id), or its model alone for None."""
    model = recipe.experts[index].source_model.model
    source = model if adapter is None else model.model_copy(update={"lora": ModelRef.parse(adapter).model})
    return update_expert(recipe, index, source_model=source)


def add_adapter_expert(recipe: Recipe, model: str, adapter: str, label: str | None = None) -> Recipe:
    """A new expert made of ``model`` + ``adapter``."""
    with_expert = add_expert(recipe, model, label)
    return set_adapter(with_expert, len(with_expert.experts) - 1, adapter)
