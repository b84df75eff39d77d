"""The merged model's README.md: Hub front matter plus what a reader needs to use and trust it.

The merge writes a card right away; publishing renders it again for the Hub (with the licence the
donors allow, the repo's own id in the usage code and the GGUF files uploaded beside the weights),
keeping the sections other tools added since: router training and evaluation results.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import yaml

from app.core.recipe import Expert, ModelRef, Recipe, dump_recipe

# A Hub download's folder in the Hugging Face cache: .../models--ORG--NAME/snapshots/COMMIT
_HUB_CACHE_FOLDER = re.compile(r"^models--(.+)$")
_FRONT_MATTER = re.compile(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", re.DOTALL)
# The routing preview a model folder may hold (saved from the app's routing preview); the card shows it.
ROUTING_PREVIEW_IMAGE = "routing-preview.png"
# Sections other tools write into a model's card, which a new rendering of the card keeps.
KEPT_SECTIONS = ("## Router training", "## Evaluation")
INTRO_START = "A Mixture-of-Experts model with"

# Licences by how much they allow, least restrictive first. An id not listed (llama3, gemma, "other", ...)
# is a model's own licence with its own terms, ranked between share-alike and non-commercial.
_PERMISSIVE = frozenset(
    {
        "apache-2.0",
        "mit",
        "bsd",
        "bsd-2-clause",
        "bsd-3-clause",
        "bsd-3-clause-clear",
        "cc0-1.0",
        "cc-by-2.0",
        "cc-by-3.0",
        "cc-by-4.0",
        "unlicense",
        "isc",
        "zlib",
        "pddl",
        "odc-by",
        "postgresql",
        "ecl-2.0",
        "afl-3.0",
        "artistic-2.0",
        "bsl-1.0",
        "wtfpl",
    }
)
_SHARE_ALIKE = frozenset(
    {"cc-by-sa-3.0", "cc-by-sa-4.0", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "agpl-3.0"}
    | {"mpl-2.0", "epl-2.0", "eupl-1.1", "osl-3.0", "odbl", "openrail", "openrail++", "creativeml-openrail-m"}
    | {"bigscience-openrail-m", "bigscience-bloom-rail-1.0", "bigcode-openrail-m"}
)
PERMISSIVE_RANK, SHARE_ALIKE_RANK, CUSTOM_RANK, NON_COMMERCIAL_RANK = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class ModelCardFields:
    name: str | None = None
    description: str | None = None
    license: str | None = None


@dataclass(frozen=True, slots=True)
class LicenseDecision:
    """The licence a merge of these donors can carry, and what the user must know or settle first."""

    license: str | None  # the most restrictive known licence; None when no donor states one
    warnings: tuple[str, ...]
    unknown: tuple[str, ...]  # donors (as the card names them) whose licence is not known: publishing refuses


def _front_matter(text: str) -> dict[str, object]:
    match = _FRONT_MATTER.match(text.replace("\r\n", "\n"))
    if not match:
        return {}
    try:
        front = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return {}
    return front if isinstance(front, dict) else {}


def base_license(base_folder: Path) -> str | None:
    """The licence in a model's own card front matter, if it has one."""
    readme = base_folder / "README.md"
    if not readme.is_file():
        return None
    value = _front_matter(readme.read_text(encoding="utf-8", errors="replace")).get("license")
    return str(value) if value else None


def license_rank(license_id: str) -> int:
    name = license_id.lower()
    if name in _PERMISSIVE:
        return PERMISSIVE_RANK
    if name in _SHARE_ALIKE:
        return SHARE_ALIKE_RANK
    if "-nc" in name or "noncommercial" in name or "non-commercial" in name:
        return NON_COMMERCIAL_RANK
    return CUSTOM_RANK


def choose_license(donor_licenses: Mapping[str, str | None]) -> LicenseDecision:
    """The most restrictive of the donors' known licences, and the donors whose licence is unknown
    (a publisher must settle those: an unknown licence is never guessed).

    Two different licences of the same rank above permissive cannot be ordered: the result is "other",
    and the warning names both, for the user to read their terms.
    """
    unknown = tuple(name for name, value in donor_licenses.items() if not value)
    known = {name: str(value).lower() for name, value in donor_licenses.items() if value}
    distinct = sorted(set(known.values()), key=lambda value: (license_rank(value), value))
    warnings: list[str] = []
    chosen: str | None = None
    if distinct:
        top_rank = license_rank(distinct[-1])
        strictest = [value for value in distinct if license_rank(value) == top_rank]
        # Permissive licences combine (any of them will do; the first by name keeps the choice stable);
        # two share-alike or custom ones do not, and "other" sends the reader to the terms.
        chosen = strictest[0] if len(strictest) == 1 or top_rank == PERMISSIVE_RANK else "other"
        if len(distinct) > 1:
            who = "; ".join(f"{name}: {value}" for name, value in known.items())
            warnings.append(
                f"the donors' licences differ ({who}); the card says {chosen!r}, the most restrictive. "
                "Check that every donor's terms allow this merge to be shared under it"
            )
    return LicenseDecision(license=chosen, warnings=tuple(warnings), unknown=unknown)


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


@dataclass(frozen=True, slots=True)
class DonorPart:
    """One model or LoRA adapter a recipe reads: ``MODEL+ADAPTER`` is two, each a donor in its own right."""

    ref: ModelRef
    is_adapter: bool = False


def donor_parts(recipe: Recipe) -> list[DonorPart]:
    """Every model and adapter the recipe reads, base first, each once."""
    parts: list[DonorPart] = []
    for ref in recipe.model_refs():
        pieces = (DonorPart(ref.model), DonorPart(ref.lora, True)) if ref.lora is not None else (DonorPart(ref),)
        parts += [piece for piece in pieces if piece not in parts]
    return parts


def hub_models(recipe: Recipe) -> list[str]:
    """The Hub ids of the base and every donor (model or adapter) that came from the Hub, base first, each once."""
    return list(dict.fromkeys(h for h in (hub_id_of(part.ref) for part in donor_parts(recipe)) if h is not None))


def donor_folder(ref: ModelRef, cache_dir: Path | None = None, *, adapter: bool = False) -> Path | None:
    """Where a donor is on this machine (its folder, or its snapshot in the Hugging Face cache), if anywhere."""
    from app.core.sources import ModelSourceError, resolve_adapter_dir, resolve_model_dir

    try:
        return (resolve_adapter_dir if adapter else resolve_model_dir)(ref, cache_dir)
    except ModelSourceError:
        return None


def donor_licenses(
    recipe: Recipe, base_folder: Path | None = None, cache_dir: Path | None = None
) -> dict[str, str | None]:
    """Each model of the recipe (named as the card names it) and the licence its own card states."""
    licenses: dict[str, str | None] = {}
    for part in donor_parts(recipe):
        if part.ref == recipe.base_model and base_folder is not None:
            folder: Path | None = base_folder
        else:
            folder = donor_folder(part.ref, cache_dir, adapter=part.is_adapter)
        licenses[str(public_ref(part.ref).path)] = base_license(folder) if folder is not None else None
    return licenses


def card_sections(card: str, headings: Sequence[str] = KEPT_SECTIONS) -> list[str]:
    """The sections of a card under these headings, each up to the next heading of its level or above."""
    lines = card.replace("\r\n", "\n").split("\n")
    sections = []
    for heading in headings:
        start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
        if start is None:
            continue
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"^#{1,2} ", lines[i])), len(lines))
        sections.append("\n".join(lines[start:end]).strip() + "\n")
    return sections


def card_title_and_description(card: str) -> ModelCardFields:
    """The title and description a card written by render_model_card holds (the user's, if they gave them)."""
    body = _FRONT_MATTER.sub("", card.replace("\r\n", "\n"), count=1)
    lines = body.split("\n")
    title_at = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
    if title_at is None:
        return ModelCardFields()
    rest = lines[title_at + 1 :]
    intro_at = next((i for i, line in enumerate(rest) if line.startswith(INTRO_START) or line.startswith("#")), 0)
    description = "\n".join(rest[:intro_at]).strip()
    return ModelCardFields(name=lines[title_at][2:].strip() or None, description=description or None)


def render_model_card(
    recipe: Recipe,
    fields: ModelCardFields,
    base_folder: Path,
    out_name: str,
    model_type: str,
    *,
    license_id: str | None = None,
    repo_id: str | None = None,
    gguf_files: Sequence[str] = (),
    preview_image: str | None = None,
    kept_sections: Sequence[str] = (),
) -> str:
    """The card of a merged model whose config.json has this model_type; it names no local path.

    The licence is ``license_id``, else the user's, else the most restrictive one the donors' cards
    state, else "other". ``repo_id`` names the model in the usage code (the folder's name otherwise).
    """
    if license_id is None:
        license_id = fields.license or choose_license(donor_licenses(recipe, base_folder)).license or "other"
    hub_ids = hub_models(recipe)
    recipe = public_recipe(recipe)
    front: dict[str, object] = {
        "license": license_id,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["moe", "frankenmoe", model_type, "merge"],
    }
    if hub_ids:
        front["base_model"] = hub_ids
        front["base_model_relation"] = "merge"
    title = fields.name or out_name
    model_id = repo_id or out_name
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    if fields.description:
        lines += [fields.description.strip(), ""]
    lines += [
        f"{INTRO_START} {len(recipe.experts)} experts and {recipe.experts_per_token} "
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
    for shared in recipe.shared_experts:
        lines += [f"Shared expert (used for every token): `{shared.source_model}`.", ""]
    if preview_image:
        lines += [
            "## Routing preview",
            "",
            "Which expert the routers chose for each expert's prompts, before the merge:",
            "",
            f"![Routing preview]({preview_image})",
            "",
        ]
    lines += [
        "## Usage",
        "",
        "With transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{model_id}", dtype="auto", device_map="auto")',
        'messages = [{"role": "user", "content": "Hello!"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')",
        "print(tokenizer.decode(model.generate(inputs.to(model.device), max_new_tokens=64)[0]))",
        "```",
        "",
        *_gguf_usage(model_id, list(gguf_files)),
        "## Recipe",
        "",
        "```yaml",
        dump_recipe(recipe).strip(),
        "```",
        "",
    ]
    for section in kept_sections:
        lines += [section.strip(), ""]
    return "\n".join(lines)


def _gguf_usage(model_id: str, gguf_files: list[str]) -> list[str]:
    if gguf_files:
        lines = ["With llama.cpp, or apps built on it (LM Studio, Ollama, GPT4All), from a GGUF file of this repo:"]
        lines.append("")
        lines += [f"- `{name}`" for name in gguf_files]
        return [*lines, "", "```sh", f"llama-cli -m {gguf_files[0]} -cnv", "```", ""]
    return [
        "For llama.cpp, or apps built on it (LM Studio, Ollama, GPT4All), convert it to GGUF with FrankenMoE Studio:",
        "",
        "```sh",
        f"frankenmoe export-gguf {model_id.rsplit('/', 1)[-1]} model-q8_0.gguf --type q8_0",
        "llama-cli -m model-q8_0.gguf -cnv",
        "```",
        "",
    ]


def _one_line(text: str) -> str:
    return " ".join(text.split())
