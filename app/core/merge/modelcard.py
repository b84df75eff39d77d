"""The merged model's README.md: Hub front matter plus what a reader needs to use and trust it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from app.core.recipe import Recipe, dump_recipe


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


def render_model_card(recipe: Recipe, fields: ModelCardFields, base_folder: Path, out_name: str) -> str:
    license_id = fields.license or base_license(base_folder) or "other"
    hub_models = [str(ref.path) for ref in recipe.model_refs() if not ref.is_local]
    front: dict[str, object] = {
        "license": license_id,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["moe", "frankenmoe", "mixtral", "merge"],
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
