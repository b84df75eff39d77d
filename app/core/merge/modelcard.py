"""The merged model's README.md: Hub front matter plus what a reader needs to use and trust it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath

import yaml

from app.core.recipe import Expert, ModelRef, Recipe, dump_recipe

# A Hub download's folder in the Hugging Face cache: .../models--ORG--NAME/snapshots/COMMIT
_HUB_CACHE_FOLDER = re.compile(r"^models--(.+)$")


@dataclass(frozen=True, slots=True)
class ModelCardFields:
    name: str | None = None
    description: str | None = None
    license: str | None = None


def base_license(base_folder: Path) -> str | None:
    """The licence in the base model's own card front matter, if it has one."""
    readme = base_folder / "README.md"
    if not readme.is_file():
        return None
    match = re.match(r"^---\s*\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace"), re.DOTALL)
    if not match:
        return None
    try:
        front = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return None
    value = front.get("license") if isinstance(front, dict) else None
    return str(value) if value else None


def hub_id_of(ref: ModelRef) -> str | None:
    """The Hub repository a donor came from: a Hub reference, or a folder inside the Hugging Face cache."""
    if not ref.is_local:
        return ref.path
    parts = PurePath(os.path.normpath(ref.path)).parts
    for index, part in enumerate(parts):
        match = _HUB_CACHE_FOLDER.match(part)
        if match and parts[index + 1 : index + 2] == ("snapshots",):
            return match.group(1).replace("--", "/")
    return None


def public_ref(ref: ModelRef) -> ModelRef:
    """How a published card names a donor: its Hub id, else only its folder's name, never a local path."""
    if ref.lora is not None:  # MODEL+ADAPTER: each part named so
        return public_ref(ref.model).model_copy(update={"lora": public_ref(ref.lora)})
    if not ref.is_local:
        return ref
    hub_id = hub_id_of(ref)
    if hub_id is not None:
        return ModelRef(path=hub_id)
    return ModelRef(path=PurePath(os.path.normpath(os.path.expanduser(ref.path))).name)


def public_recipe(recipe: Recipe) -> Recipe:
    """The recipe with every donor named as public_ref names it."""

    def expert(entry: Expert) -> Expert:
        return entry.model_copy(update={"source_model": public_ref(entry.source_model)})

    return recipe.model_copy(
        update={
            "base_model": public_ref(recipe.base_model),
            "experts": tuple(expert(e) for e in recipe.experts),
            "shared_experts": tuple(expert(e) for e in recipe.shared_experts),
        }
    )


def render_model_card(
    recipe: Recipe, fields: ModelCardFields, base_folder: Path, out_name: str, model_type: str
) -> str:
    """The card of a merged model whose config.json has this model_type; it names no local path."""
    license_id = fields.license or base_license(base_folder) or "other"
    hub_models = list(dict.fromkeys(h for h in map(hub_id_of, recipe.model_refs()) if h is not None))
    recipe = public_recipe(recipe)
    front: dict[str, object] = {
        "license": license_id,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["moe", "frankenmoe", model_type, "merge"],
    }
    if hub_models:
        front["base_model"] = hub_models
    title = fields.name or out_name
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    if fields.description:
        lines += [fields.description.strip(), ""]
    lines += [
        f"A Mixture-of-Experts model with {len(recipe.experts)} experts and {recipe.experts_per_token} "
        f"active per token, built with FrankenMoE Studio. Attention, norms and embeddings come from "
        f"`{recipe.base_model}`; each expert's MLP comes from its donor; the routers were initialised "
        f"with gate mode `{recipe.gate_mode}`.",
        "",
        "## Experts",
        "",
    ]
    for index, expert in enumerate(recipe.experts):
        lines.append(f"### {recipe.expert_label(index)}: `{expert.source_model}`")
        lines.append("")
        if expert.positive_prompts:
            lines.append("Positive prompts:")
            lines += [f"- {_one_line(p)}" for p in expert.positive_prompts]
            lines.append("")
        if expert.negative_prompts:
            lines.append("Negative prompts:")
            lines += [f"- {_one_line(p)}" for p in expert.negative_prompts]
            lines.append("")
    lines += [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{out_name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{out_name}", dtype="auto", device_map="auto")',
        'messages = [{"role": "user", "content": "Hello!"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')",
        "print(tokenizer.decode(model.generate(inputs.to(model.device), max_new_tokens=64)[0]))",
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        dump_recipe(recipe).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())
