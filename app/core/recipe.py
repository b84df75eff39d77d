"""Recipes: mergekit-moe YAML, read and written with its meaning kept.

Everything mergekit-moe knows lives at the top level exactly as mergekit-moe writes it; our own
additions (labels, colours, test prompts, the upcycling flag) live under the single ``frankenmoe``
key, which mergekit-moe's pydantic models ignore.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.core.problems import Problem, ProblemsError, Severity, sentence

EXTENSION_KEY = "frankenmoe"

PROMPT_GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "calibrated")
RANDOM_GATE_MODES = ("random", "uniform_random")
GATE_MODES = PROMPT_GATE_MODES + RANDOM_GATE_MODES
# Our own modes, with what mergekit-moe reads in their place: the recipe keeps the real mode under
# our extension key and writes the fallback as `gate_mode`, so mergekit-moe still runs it.
MERGEKIT_FALLBACK_MODES = {"calibrated": "hidden"}

GATE_MODE_HELP = {
    "hidden": "Router input of every layer at each prompt's last token (recommended).",
    "hidden_avg": "Router input of every layer averaged over each prompt's tokens.",
    "hidden_last": "Same as hidden (mergekit-moe's alias).",
    "cheap_embed": "Sum of the prompts' token embeddings, the same for every layer; no model run.",
    "calibrated": "Each layer's router fitted on every prompt token (ours; mergekit-moe reads it as hidden).",
    "random": "Random normal router weights; for training the MoE afterwards.",
    "uniform_random": "Random uniform router weights like a fresh nn.Linear; for training afterwards.",
}

DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}

# mergekit-moe's names: Mixtral, Qwen2-MoE (with a shared expert) and Qwen3-MoE.
ARCHITECTURES = ("mixtral", "qwen", "qwen3")

# Ranges of the numeric settings. Noise past 1 buries any weight (they are around 0.02); a residual
# scale past 10 swamps the rest of the layer; the largest published MoE models have 256 experts.
# torch seeds are 64-bit.
MAX_NOISE_SCALE = 1.0
MAX_RESIDUAL_SCALE = 10.0
MAX_EXPERTS = 256
MAX_SEED = 2**63 - 1


class ModelRefError(ValueError):
    """A model reference that cannot be read, with the fix (pydantic shows it as the value's error)."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


ADAPTER_SEPARATOR = "+"
_ADAPTER_SYNTAX_HINT = "write MODEL+ADAPTER, each a Hub id (org/name, optionally @revision) or a local folder"


class ModelRef(BaseModel):
    """A Hub repository (``org/name`` with optional ``@revision``) or a local folder.

    ``lora`` is a PEFT LoRA adapter applied to it (mergekit's ``MODEL+ADAPTER``); the adapter's own
    reference never carries one.
    """

    model_config = ConfigDict(frozen=True)

    path: str
    revision: str | None = None
    lora: ModelRef | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """``org/name``, ``org/name@rev``, a folder, or any two of these joined by ``+`` (model, adapter).

        Raises :class:`ModelRefError` for ``+`` with an empty part or more than two parts. A local
        folder whose name holds a ``+`` is taken whole when it exists.
        """
        text = text.strip()
        if ADAPTER_SEPARATOR not in text or os.path.exists(os.path.expanduser(text)):
            return cls._parse_one(text)
        parts = [part.strip() for part in text.split(ADAPTER_SEPARATOR)]
        if len(parts) > 2:
            raise ModelRefError(
                f"{text!r} has {len(parts) - 1} '+' signs, but a model takes one adapter", _ADAPTER_SYNTAX_HINT
            )
        model, adapter = parts
        if not model or not adapter:
            missing = "model" if not model else "adapter"
            raise ModelRefError(f"{text!r} has an empty {missing} part around its '+'", _ADAPTER_SYNTAX_HINT)
        return cls._parse_one(model).model_copy(update={"lora": cls._parse_one(adapter)})

    @classmethod
    def _parse_one(cls, text: str) -> ModelRef:
        if looks_local(text) or "@" not in text:
            return cls(path=text)
        path, _, revision = text.rpartition("@")
        return cls(path=path, revision=revision or None)

    @property
    def is_local(self) -> bool:
        return looks_local(self.path)

    @property
    def model(self) -> ModelRef:
        """The model part alone, without its adapter."""
        return self if self.lora is None else self.model_copy(update={"lora": None})

    def __str__(self) -> str:
        own = f"{self.path}@{self.revision}" if self.revision else self.path
        return own if self.lora is None else f"{own}{ADAPTER_SEPARATOR}{self.lora}"


def looks_local(text: str) -> bool:
    """A reference is local if it exists on disk or is written as a path rather than ``org/name``."""
    if os.path.exists(os.path.expanduser(text)):
        return True
    return text.startswith(("/", "./", "../", "~", "\\")) or (len(text) > 1 and text[1] == ":")


def _plain_ref(value: Any) -> ModelRef | None:
    """mergekit's ModelPath: ``{path, revision}`` or its text."""
    if isinstance(value, str):
        return ModelRef._parse_one(value.strip())
    if isinstance(value, Mapping) and "path" in value:
        revision = value.get("revision")
        return ModelRef(path=str(value["path"]), revision=None if revision is None else str(revision))
    return None


def _coerce_model_ref(value: Any) -> Any:
    if isinstance(value, ModelRef):
        return value
    if isinstance(value, str):
        return ModelRef.parse(value)
    if isinstance(value, Mapping):
        # mergekit's structured form: {model: {path, revision}, lora: {path, revision}} or {path, revision}
        model = _plain_ref(value.get("model", value))
        if model is None:
            return value
        lora = value.get("lora")
        if lora is None:
            return model
        adapter = _plain_ref(lora)
        if adapter is None or not adapter.path.strip():
            raise ModelRefError(f"the adapter part {lora!r} names no adapter", "give `lora:` a `path:`")
        return model.model_copy(update={"lora": adapter})
    return value


class Expert(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    source_model: ModelRef
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = Field(default=None, ge=0, le=MAX_NOISE_SCALE, allow_inf_nan=False)
    residual_scale: float | None = Field(default=None, ge=0, le=MAX_RESIDUAL_SCALE, allow_inf_nan=False)

    @field_validator("source_model", mode="before")
    @classmethod
    def _parse_ref(cls, value: Any) -> Any:
        return _coerce_model_ref(value)

    @field_validator("positive_prompts", "negative_prompts", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return () if value is None else value


class ExpertExtras(BaseModel):
    """Per-expert additions of ours, aligned with ``experts`` by position."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str | None = None
    color: str | None = None
    test_prompts: tuple[str, ...] = ()


class StudioExtras(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    experts: tuple[ExpertExtras, ...] = ()
    allow_identical_experts: bool = False
    seed: int = Field(default=0, ge=0, le=MAX_SEED)

    def is_default(self) -> bool:
        return self == StudioExtras()


class Recipe(BaseModel):
    """A mergekit-moe recipe. Loose types where a user can go wrong, so that validation can explain."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    base_model: ModelRef
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: tuple[Expert, ...] = ()
    architecture: str | None = None
    studio: StudioExtras = Field(default_factory=StudioExtras, alias=EXTENSION_KEY)
    # Keys mergekit-moe would silently ignore; we ignore them too, but warn, since most are typos.
    ignored_keys: tuple[str, ...] = Field(default=(), exclude=True)

    @field_validator("base_model", mode="before")
    @classmethod
    def _parse_ref(cls, value: Any) -> Any:
        return _coerce_model_ref(value)

    @field_validator("shared_experts", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return () if value is None else value

    @model_validator(mode="before")
    @classmethod
    def _set_aside_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        ignored = list(data.get("ignored_keys", ()))
        known = {*cls.model_fields, EXTENSION_KEY} - {"ignored_keys"}
        for key in [k for k in data if k not in known and k != "ignored_keys"]:
            ignored.append(str(key))
            del data[key]
        for section in ("experts", "shared_experts"):
            entries = data.get(section)
            if not isinstance(entries, list | tuple):
                continue
            cleaned = []
            for index, entry in enumerate(entries):
                if isinstance(entry, Mapping):
                    entry = dict(entry)
                    for key in [k for k in entry if k not in Expert.model_fields]:
                        ignored.append(f"{section}.{index}.{key}")
                        del entry[key]
                cleaned.append(entry)
            data[section] = cleaned
        extension = data.get(EXTENSION_KEY)
        if isinstance(extension, Mapping) and "gate_mode" in extension:
            extension = dict(extension)
            data["gate_mode"] = extension.pop("gate_mode")
            data[EXTENSION_KEY] = extension
        data["ignored_keys"] = tuple(ignored)
        return data

    @model_validator(mode="after")
    def _pad_extras(self) -> Recipe:
        missing = len(self.experts) - len(self.studio.experts)
        if missing > 0:
            padded = self.studio.experts + (ExpertExtras(),) * missing
            # Frozen model: this runs once, during construction, before anyone can see the object.
            object.__setattr__(self, "studio", self.studio.model_copy(update={"experts": padded}))
        return self

    @property
    def canonical_dtype(self) -> str | None:
        return DTYPE_ALIASES.get(self.dtype.lower()) if self.dtype else None

    def expert_label(self, index: int) -> str:
        extras = self.studio.experts[index] if index < len(self.studio.experts) else ExpertExtras()
        return extras.label or f"expert {index}"

    def model_refs(self) -> list[ModelRef]:
        """Every distinct model the recipe reads, base first."""
        refs: list[ModelRef] = []
        for ref in [self.base_model, *(e.source_model for e in (*self.experts, *self.shared_experts))]:
            if ref not in refs:
                refs.append(ref)
        return refs


# --------------------------------------------------------------------------- reading and writing


def load_recipe(source: str | os.PathLike[str]) -> Recipe:
    """Read a recipe from a YAML file. Raises :class:`ProblemsError` naming the line of a mistake."""
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProblemsError(
            [Problem("recipe", f"cannot read {path}: {exc.strerror or exc}", "check the path and permissions")]
        ) from exc
    except UnicodeDecodeError as exc:
        raise ProblemsError(
            [
                Problem(
                    "recipe",
                    f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded), so it is not a YAML recipe",
                    "open the recipe file itself, or save it again as UTF-8",
                )
            ]
        ) from exc
    return parse_recipe(text)


def parse_recipe(text: str) -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ProblemsError(
            [
                Problem(
                    "recipe",
                    f"the YAML is malformed: {exc.problem or exc}",
                    "correct the indentation or quoting at that line",
                    line=line,
                )
            ]
        ) from exc
    except yaml.YAMLError as exc:
        raise ProblemsError([Problem("recipe", f"the YAML is malformed: {exc}", "fix the file")]) from exc
    if not isinstance(data, dict):
        raise ProblemsError(
            [Problem("recipe", "a recipe must be a YAML mapping", "start with `base_model:` and `experts:`")]
        )
    lines = _field_lines(text)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "recipe"
            problems.append(
                Problem(
                    field,
                    _message_for(error),
                    _hint_for(error),
                    line=_closest_line(lines, error["loc"]),
                )
            )
        raise ProblemsError(problems) from exc


def _message_for(error: Mapping[str, Any]) -> str:
    """Pydantic's message, with the key named in words: `source_model` of expert 0, not experts.0.source_model."""
    loc = [str(part) if isinstance(part, str) else part for part in error.get("loc", ())]
    keys = [part for part in loc if isinstance(part, str)]
    key = f"`{keys[-1]}`" if keys else "the recipe"
    owner = ""
    for section, name in (("experts", "expert"), ("shared_experts", "shared expert")):
        if section in loc[:-1] and isinstance(index := loc[loc.index(section) + 1], int):
            owner = f" of {name} {index}"
    if loc and loc[0] in (EXTENSION_KEY, "studio") and len(keys) > 1:
        owner = f" in the `{EXTENSION_KEY}` settings{owner}"
    kind = error.get("type", "")
    if kind == "missing":
        return f"the key {key}{owner} is missing"
    if kind == "extra_forbidden":
        return f"unknown key {key}{owner}"
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ModelRefError):
        return f"the value of {key}{owner} is wrong: {cause.message}"
    detail = str(error.get("msg", "")).rstrip(".")
    return f"the value of {key}{owner} is wrong: {detail[:1].lower()}{detail[1:]}"


def _hint_for(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    if kind == "missing":
        return "add this key to the recipe"
    if kind == "finite_number":
        return "write a finite number here"
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ModelRefError):
        return cause.hint
    if kind in ("greater_than_equal", "less_than_equal"):
        return "use a value inside that range"
    if kind == "extra_forbidden":
        # Unknown keys elsewhere are set aside with a warning: only our own section refuses them.
        loc = [part for part in error.get("loc", ()) if not isinstance(part, int)]
        model = ExpertExtras if "experts" in loc[1:] else StudioExtras
        known = sorted(model.model_fields)
        return did_you_mean(
            str(loc[-1]) if loc else "", known, f"remove or rename it; known keys here are {', '.join(known)}"
        )
    return "correct the value's type"


def did_you_mean(key: str, known: Iterable[str], hint: str) -> str:
    """The hint, led by "did you mean `gate_mode`?" when the key is spelt close to a known one."""
    matches = difflib.get_close_matches(key, list(known), n=1, cutoff=0.7)
    return f"did you mean `{matches[0]}`? {sentence(hint)}" if matches else hint


def _field_lines(text: str) -> dict[tuple[str | int, ...], int]:
    """Map each key path in the YAML to its 1-based line, for pointing at mistakes."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple[str | int, ...], int] = {}
    # An alias is the very node its anchor names; walking it again at each alias would expand
    # nested aliases exponentially (a "billion laughs" recipe), so each node is walked once.
    walked: set[int] = set()

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        lines[path] = node.start_mark.line + 1
        if id(node) in walked:
            return
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                lines[child] = key.start_mark.line + 1
                walk(value, child)
                lines[child] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*path, index))

    if root is not None:
        walk(root, ())
    return lines


def _closest_line(lines: Mapping[tuple[str | int, ...], int], loc: Iterable[Any]) -> int | None:
    path = tuple(loc)
    aliases = {"studio": EXTENSION_KEY}
    path = tuple(aliases.get(p, p) if isinstance(p, str) else p for p in path)
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get(())


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The YAML mapping, in mergekit-moe's key order, leaving out what mergekit would default."""

    def expert_dict(expert: Expert) -> dict[str, Any]:
        out: dict[str, Any] = {"source_model": str(expert.source_model)}
        if expert.positive_prompts:
            out["positive_prompts"] = list(expert.positive_prompts)
        if expert.negative_prompts:
            out["negative_prompts"] = list(expert.negative_prompts)
        if expert.noise_scale is not None:
            out["noise_scale"] = expert.noise_scale
        if expert.residual_scale is not None:
            out["residual_scale"] = expert.residual_scale
        return out

    data: dict[str, Any] = {
        "base_model": str(recipe.base_model),
        "gate_mode": recipe.gate_mode,
        "dtype": recipe.dtype,
        "experts_per_token": recipe.experts_per_token,
        "experts": [expert_dict(e) for e in recipe.experts],
    }
    if data["dtype"] is None:
        del data["dtype"]
    if recipe.gate_mode in MERGEKIT_FALLBACK_MODES:
        data["gate_mode"] = MERGEKIT_FALLBACK_MODES[recipe.gate_mode]
    if recipe.shared_experts:
        data["shared_experts"] = [expert_dict(e) for e in recipe.shared_experts]
    if recipe.architecture:
        data["architecture"] = recipe.architecture
    extras: dict[str, Any] = {}
    if not recipe.studio.is_default():
        extras = recipe.studio.model_dump(exclude_defaults=True)
        if "experts" in extras:
            extras["experts"] = [
                {k: list(v) if isinstance(v, tuple) else v for k, v in e.model_dump(exclude_defaults=True).items()}
                for e in recipe.studio.experts
            ]
            while extras["experts"] and not extras["experts"][-1]:
                extras["experts"].pop()
            if not extras["experts"]:
                del extras["experts"]
    if recipe.gate_mode in MERGEKIT_FALLBACK_MODES:
        extras = {"gate_mode": recipe.gate_mode, **extras}
    if extras:
        data[EXTENSION_KEY] = extras
    return data


def dump_recipe(recipe: Recipe) -> str:
    text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True, width=100)
    if recipe.gate_mode in MERGEKIT_FALLBACK_MODES:
        fallback = MERGEKIT_FALLBACK_MODES[recipe.gate_mode]
        text = (
            f"# gate_mode {recipe.gate_mode} is FrankenMoE Studio's own (under `{EXTENSION_KEY}:`);\n"
            f"# mergekit-moe ignores that key and falls back to gate_mode {fallback}.\n" + text
        )
    return text


def save_recipe(recipe: Recipe, path: str | os.PathLike[str]) -> None:
    """Write atomically, so that a crash never leaves the user's recipe half-written."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(dump_recipe(recipe), encoding="utf-8")
    os.replace(temporary, target)


# --------------------------------------------------------------------------- validation


def validate_recipe(recipe: Recipe) -> list[Problem]:
    """Everything that is wrong with the recipe itself; models are checked by ``compat``."""
    problems: list[Problem] = []
    n_experts = len(recipe.experts)

    if n_experts == 0:
        problems.append(Problem("experts", "the recipe has no experts", "add at least two experts"))
    elif n_experts > MAX_EXPERTS:
        problems.append(
            Problem(
                "experts",
                f"the recipe has {n_experts} experts, more than the {MAX_EXPERTS} of the largest MoE models",
                f"keep at most {MAX_EXPERTS} experts",
            )
        )
    if recipe.gate_mode not in GATE_MODES:
        problems.append(
            Problem(
                "gate_mode",
                f"unknown gate mode {recipe.gate_mode!r}",
                did_you_mean(recipe.gate_mode, GATE_MODES, f"use one of: {', '.join(GATE_MODES)}"),
            )
        )
    if recipe.gate_mode in MERGEKIT_FALLBACK_MODES:
        problems.append(
            Problem(
                "gate_mode",
                f"gate mode {recipe.gate_mode!r} is FrankenMoE Studio's own: mergekit-moe will run this recipe "
                f"with gate mode {MERGEKIT_FALLBACK_MODES[recipe.gate_mode]!r} instead",
                "nothing to fix for FrankenMoE Studio; expect different routers from mergekit-moe",
                severity=Severity.WARNING,
            )
        )
    if recipe.experts_per_token < 1:
        problems.append(
            Problem(
                "experts_per_token",
                f"the experts_per_token setting is {recipe.experts_per_token}, but each token needs at least "
                "one expert",
                "set experts_per_token to 1 or more (2 is usual)",
            )
        )
    elif n_experts and recipe.experts_per_token > n_experts:
        problems.append(
            Problem(
                "experts_per_token",
                f"the experts_per_token setting is {recipe.experts_per_token}, but there are only {n_experts} experts",
                f"set experts_per_token to at most {n_experts}, or add experts",
            )
        )
    if recipe.dtype is not None and recipe.canonical_dtype is None:
        problems.append(Problem("dtype", f"unknown dtype {recipe.dtype!r}", "use bfloat16, float16 or float32"))
    if recipe.architecture is not None and recipe.architecture.lower() not in ARCHITECTURES:
        problems.append(
            Problem(
                "architecture",
                f"unknown or unsupported output architecture {recipe.architecture!r}",
                f"use one of: {', '.join(ARCHITECTURES)}, or leave it out to choose from the donors",
            )
        )
    if len(recipe.shared_experts) > 1:
        problems.append(
            Problem(
                "shared_experts",
                f"{len(recipe.shared_experts)} shared experts, but a MoE layer holds at most one",
                "keep one shared expert, and move the others into experts",
            )
        )
    architecture = (recipe.architecture or "").lower()
    if recipe.shared_experts and architecture in ("mixtral", "qwen3"):
        problems.append(
            Problem(
                "shared_experts",
                f"the {architecture} architecture has no shared expert",
                "remove shared_experts, or set `architecture: qwen` for a Qwen2-MoE, which has one",
            )
        )
    for key in recipe.ignored_keys:
        problems.append(_ignored_key_problem(recipe, key))
    if len(recipe.studio.experts) > n_experts:
        problems.append(
            Problem(
                f"{EXTENSION_KEY}.experts",
                f"{len(recipe.studio.experts)} entries for {n_experts} experts",
                "keep one entry per expert, in the same order",
                severity=Severity.WARNING,
            )
        )

    if recipe.gate_mode in PROMPT_GATE_MODES:
        for index, expert in enumerate(recipe.experts):
            if not [p for p in expert.positive_prompts if p.strip()]:
                problems.append(
                    Problem(
                        f"experts.{index}.positive_prompts",
                        f"{recipe.expert_label(index)} ({expert.source_model}) has no positive prompts, "
                        f"which gate mode {recipe.gate_mode!r} needs",
                        "add prompts that show what this expert should handle, or use a random gate mode",
                    )
                )
        if n_experts > 1:
            prompt_sets = {(frozenset(e.positive_prompts), frozenset(e.negative_prompts)) for e in recipe.experts}
            # Experts without prompts at all are each reported above already.
            if len(prompt_sets) == 1 and any(e.positive_prompts for e in recipe.experts):
                problems.append(
                    Problem(
                        "experts",
                        "every expert has the same prompts, so the router cannot tell them apart",
                        "give each expert prompts that show what it alone should handle",
                    )
                )

    identical = n_experts > 1 and len({e.source_model for e in recipe.experts}) == 1
    if identical and not recipe.studio.allow_identical_experts:
        problems.append(
            Problem(
                "experts",
                f"all experts are the same model ({recipe.experts[0].source_model}): the MoE would be "
                "larger and slower but answer exactly as that model does",
                f"use different fine-tunes, or set `{EXTENSION_KEY}: {{allow_identical_experts: true}}` "
                "if you will train the MoE after merging (upcycling)",
            )
        )
    return problems


def _ignored_key_problem(recipe: Recipe, key: str) -> Problem:
    """An unknown key, named in words (the expert's label, not `experts.3.`), with the key it may be a typo of."""
    section, _, rest = key.partition(".")
    index_text, _, name = rest.partition(".")
    if section in ("experts", "shared_experts") and index_text.isdigit() and name:
        index = int(index_text)
        owner = f" of {recipe.expert_label(index)}" if section == "experts" else " of the shared expert"
        known: Iterable[str] = Expert.model_fields
    else:
        name, owner = key, ""
        known = (*(f for f in Recipe.model_fields if f not in ("studio", "ignored_keys")), EXTENSION_KEY)
    return Problem(
        key,
        f"unknown key {name!r}{owner} is ignored (mergekit-moe ignores it too)",
        did_you_mean(name, known, "check its spelling, or remove it"),
        severity=Severity.WARNING,
    )
