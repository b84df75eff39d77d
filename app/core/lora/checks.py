"""Can this adapter be applied to this model? Every mismatch named, before any heavy work."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Literal

from app.core.lora.adapter import MLP_KIND, AdapterInfo, ModuleDelta
from app.core.problems import FrankenMoEError, Problem, Severity
from app.core.sources import ModelSource

FIELD = "lora"
_SHOWN = 3
_OTHER_MODEL_HINT = (
    "use the adapter with the model it was trained on (its adapter_config.json names it as base_model_name_or_path)"
)


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown if len(names) <= _SHOWN else f"{shown} and {len(names) - _SHOWN} more"


def _names(ref: str) -> set[str]:
    """The ways a model reference may be written in base_model_name_or_path: path, Hub id, folder name."""
    model = ref.split("+", 1)[0].strip()
    without_revision = model.rsplit("@", 1)[0] if "@" in model and not os.path.exists(model) else model
    names = {model, without_revision, PurePath(os.path.normpath(without_revision)).name}
    # A snapshot in the Hugging Face cache: .../models--org--name/snapshots/<commit>
    for part in PurePath(os.path.normpath(without_revision)).parts:
        if part.startswith("models--"):
            hub_id = part[len("models--") :].replace("--", "/")
            names |= {hub_id, hub_id.rsplit("/", 1)[-1]}
    return {n.rstrip("/").lower() for n in names if n}


def _same_model(base_model: str, model_ref: str, model_folder: Path) -> bool:
    ours = _names(model_ref) | _names(str(model_folder))
    theirs = _names(base_model)
    return bool(ours & theirs)


def _target_matches(target: str, module: str) -> bool:
    return module == target or module.endswith(f".{target}")


def adapter_problems(
    info: AdapterInfo,
    model_folder: Path,
    model_ref: str,
    *,
    role: Literal["expert", "base"] = "expert",
) -> list[Problem]:
    """Errors and warnings of applying the adapter to the model in model_folder (called model_ref).

    Problems are filed under the field ``lora``; callers file them under their own. As an expert
    (the default), the deltas outside the MLP are dropped with a warning; as the base model every
    delta is used.
    """
    problems: list[Problem] = []
    where = f"the adapter {info.shown_name}"
    for reason in info.unsupported:
        problems.append(
            Problem(
                FIELD,
                f"{where} cannot be applied exactly: {reason}",
                "use a plain LoRA adapter (PEFT LoraConfig), or merge this one into its model with PEFT "
                "(merge_and_unload) and use the merged model as the expert",
            )
        )
    if info.base_model and not _same_model(info.base_model, model_ref, model_folder):
        problems.append(
            Problem(
                FIELD,
                f"{where} was trained on {info.base_model}, but is applied to {model_ref}",
                "nothing to fix if the model is that one or a fine-tune of it; otherwise " + _OTHER_MODEL_HINT,
                severity=Severity.WARNING,
            )
        )
    try:
        model = ModelSource(Path(model_folder))
    except FrankenMoEError as exc:
        return [*problems, Problem(FIELD, exc.message, exc.hint)]
    with model:
        problems += _shape_problems(info, model, model_ref, where)
    if role == "expert" and info.dropped_modules and not any(p.is_error for p in problems):
        problems.append(_dropped_warning(info, model_ref, where))
    return problems


def _shape_problems(info: AdapterInfo, model: ModelSource, model_ref: str, where: str) -> list[Problem]:
    problems: list[Problem] = []
    modules = [name[: -len(".weight")] for name in model.tensor_names if name.endswith(".weight")]
    family = model.family
    if info.target_pattern is not None:
        if not any(re.fullmatch(info.target_pattern, m) for m in modules):
            problems.append(
                Problem(
                    FIELD,
                    f"{where} targets modules matching {info.target_pattern!r}, but {model_ref} ({family}) has none",
                    _OTHER_MODEL_HINT,
                )
            )
    else:
        # "all-linear" is PEFT's shorthand for every linear layer but the output layer.
        targets = [t for t in info.target_modules if t != "all-linear"]
        absent = [t for t in targets if not any(_target_matches(t, m) for m in modules)]
        if absent:
            problems.append(
                Problem(
                    FIELD,
                    f"{where} targets module(s) {_listed(absent)}, which {model_ref} ({family}) does not have; "
                    "the adapter was made for another architecture",
                    _OTHER_MODEL_HINT,
                )
            )
    missing = [d.target for d in info.deltas if not model.has_tensor(d.target)]
    if missing:
        problems.append(
            Problem(
                FIELD,
                f"{where} changes {len(missing)} weight(s) that {model_ref} does not have, e.g. {_listed(missing)}",
                _OTHER_MODEL_HINT,
            )
        )
    mismatched: list[str] = []
    for delta in info.deltas:
        if model.has_tensor(delta.target):
            mismatched += _delta_shape_errors(delta, model.tensor_info(delta.target).shape)
    rank_errors = [m for m in mismatched if "rank" in m]
    size_errors = [m for m in mismatched if "rank" not in m]
    if rank_errors:
        problems.append(
            Problem(
                FIELD,
                f"{where} has A and B matrices of different ranks: {_listed(rank_errors)}",
                "the adapter file is damaged or its adapter_config.json (r, rank_pattern) does not belong to it; "
                "download or save the adapter again",
            )
        )
    if size_errors:
        problems.append(
            Problem(
                FIELD,
                f"{where} does not fit the weights of {model_ref}: {_listed(size_errors)}; "
                "it was trained on a model of another size",
                _OTHER_MODEL_HINT,
            )
        )
    return problems


def _delta_shape_errors(delta: ModuleDelta, weight: tuple[int, ...]) -> list[str]:
    if delta.replacement is not None and delta.replacement.shape != weight:
        adapter_shape = _shape(delta.replacement.shape)
        return [f"{delta.target} is {adapter_shape} in the adapter, {_shape(weight)} in the model"]
    if delta.kind == "replacement":
        return []
    assert delta.a is not None and delta.b is not None
    a, b = delta.a.shape, delta.b.shape
    if len(a) != 2 or len(b) != 2 or len(weight) != 2:
        return [f"{delta.module} has A {_shape(a)} and B {_shape(b)} for a weight of {_shape(weight)}"]
    errors = []
    if a[0] != b[1]:
        errors.append(f"{delta.module} has rank {a[0]} in A but {b[1]} in B")
    elif a[0] != delta.rank:
        errors.append(f"{delta.module} has rank {a[0]} in its matrices but {delta.rank} in adapter_config.json")
    # A linear delta is B @ A, shaped like the weight (out x in); an embedding's is (B @ A).T.
    rows, columns = (b[0], a[1]) if delta.kind == "linear" else (a[1], b[0])
    if (rows, columns) != weight:
        errors.append(
            f"{delta.module} makes a {rows}x{columns} change (A {_shape(a)}, B {_shape(b)}) "
            f"to a weight of {_shape(weight)}"
        )
    if delta.magnitude is not None and delta.magnitude.shape != (weight[0],):
        errors.append(f"{delta.module} has a DoRA magnitude of {_shape(delta.magnitude.shape)} for {weight[0]} rows")
    return errors


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "a scalar"


def _dropped_warning(info: AdapterInfo, model_ref: str, where: str) -> Problem:
    percent = info.dropped_fraction * 100
    names = list(info.dropped_modules)
    kinds = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    if info.mlp_parameter_count == 0:
        return Problem(
            FIELD,
            f"{where} changes only the {kinds}, none of which an expert contributes to a MoE (only its MLP): "
            f"all of it ({percent:.0f} % of its parameters) is dropped and this expert is {model_ref} unchanged",
            "use an adapter trained on the MLP (gate_proj, up_proj, down_proj), or use this one on the base model",
            severity=Severity.WARNING,
        )
    return Problem(
        FIELD,
        f"{where} also changes the {kinds}, which an expert does not contribute to a MoE (only its MLP): "
        f"{percent:.0f} % of its parameters are dropped, its {MLP_KIND} part is used",
        "nothing to fix; the MoE's attention, norms and embeddings are the base model's",
        severity=Severity.WARNING,
    )

