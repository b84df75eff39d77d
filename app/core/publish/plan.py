"""What a publish will do, checked before a byte is uploaded: plan_publish."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.merge.modelcard import (
    ROUTING_PREVIEW_IMAGE,
    card_sections,
    card_title_and_description,
    choose_license,
    donor_folder,
    donor_licenses,
    donor_parts,
    hub_id_of,
    hub_models,
    public_recipe,
    render_model_card,
)
from app.core.merge.pipeline import RECIPE_FILENAME
from app.core.problems import FrankenMoEError, Problem, Severity
from app.core.progress import check_cancel
from app.core.publish.checks import (
    check_merge_folder,
    leak_problems,
    local_paths,
    repo_id_problem,
    scanned_bytes,
    write_permission,
)
from app.core.recipe import Recipe, dump_recipe, load_recipe

if TYPE_CHECKING:
    from app.core.hub.config import HubConfig

CARD = "README.md"


@dataclass(frozen=True)
class PublishRequest:
    model_dir: Path
    repo_id: str
    private: bool = False
    revision: str | None = None
    include_gguf: tuple[Path, ...] = ()
    message: str | None = None
    # None: huggingface_hub's own (HF_TOKEN, or the token `hf auth login` saved). Kept out of repr.
    token: str | None = field(default=None, repr=False)
    # The licence the card states; None: the most restrictive of the donors' (refused when one is unknown).
    license: str | None = None


@dataclass(frozen=True)
class PublishPlan:
    request: PublishRequest  # repo_id completed with the token's user when it had no namespace
    user: str
    repo_exists: bool
    files: tuple[str, ...]  # paths in the repo, in upload order
    total_bytes: int
    card_text: str
    warnings: tuple[str, ...]
    problems: tuple[Problem, ...]

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.is_error)


def _error(field_name: str, message: str, hint: str) -> Problem:
    return Problem(field=field_name, message=message, hint=hint, severity=Severity.ERROR)


def resolved_token(request: PublishRequest) -> str | None:
    """The request's token, else huggingface_hub's (``HF_TOKEN`` first, then the saved login)."""
    if request.token is not None and request.token.strip():
        return request.token.strip()
    from huggingface_hub import get_token

    return get_token()


def generated_files(request: PublishRequest, card_text: str) -> dict[str, bytes]:
    """Files the repo gets in place of the folder's own: the Hub card, and the recipe naming donors by
    Hub id or folder name (the folder's recipe keeps the paths that let the merge run again here)."""
    files = {CARD: card_text.encode("utf-8")}
    recipe_path = Path(request.model_dir) / RECIPE_FILENAME
    if recipe_path.is_file():
        files[RECIPE_FILENAME] = dump_recipe(public_recipe(load_recipe(recipe_path))).encode("utf-8")
    return files


def folder_files(model_dir: Path) -> list[str]:
    """The model folder's files as repo paths, hidden files and folders left out."""
    names = []
    for root, folders, files in os.walk(model_dir):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        relative = Path(root).relative_to(model_dir)
        names += [(relative / name).as_posix() for name in sorted(files) if not name.startswith(".")]
    return names


def upload_sources(plan: PublishPlan) -> dict[str, Path | bytes]:
    """Each repo path of the plan and what goes there: a file on disk, or generated content."""
    generated = generated_files(plan.request, plan.card_text)
    gguf = {path.name: Path(path) for path in plan.request.include_gguf}
    model_dir = Path(plan.request.model_dir)
    return {name: generated.get(name) or gguf.get(name) or model_dir / name for name in plan.files}


def _whoami(token: str, config: HubConfig) -> dict[str, Any] | Problem:
    from huggingface_hub.errors import HfHubHTTPError

    from app.core.hub.errors import hub_errors
    from app.core.hub.network import require_hub

    try:
        with hub_errors(None, None, config):
            require_hub(config)
            return config.api().whoami(token=token)
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 401:
            return _error(
                "token",
                "the Hub refused this access token (it may be mistyped, expired or revoked)",
                "create a token with the write role in your Hugging Face settings (Access Tokens) and log in "
                "with it (`hf auth login`), set HF_TOKEN, or pass --token",
            )
        raise


def _hub_donor_facts(
    recipe: Recipe, token: str | None, config: HubConfig
) -> tuple[dict[str, str | None], list[str]]:
    """The licence each Hub donor's page states, and a warning for each gated donor."""
    licenses: dict[str, str | None] = {}
    warnings: list[str] = []
    api = config.api()
    for hub_id in hub_models(recipe):
        try:
            info = api.model_info(hub_id, token=token)
        except Exception:  # a best-effort look: any failure becomes a warning to check by hand
            warnings.append(f"could not check {hub_id} on the Hub (licence, gating); check its page yourself")
            continue
        card = info.card_data.to_dict() if info.card_data is not None else {}
        value = card.get("license")
        licenses[hub_id] = str(value) if value else None
        if info.gated:
            warnings.append(
                f"{hub_id} is gated on the Hub: its licence terms may forbid redistributing its weights or "
                "models made from them; read them before publishing"
            )
    return licenses, warnings


def _license(
    request: PublishRequest, recipe: Recipe, hub_licenses: Mapping[str, str | None], hub_checked: bool
) -> tuple[str | None, list[str], list[Problem]]:
    local = donor_licenses(recipe)
    merged = {name: value or hub_licenses.get(name) for name, value in local.items()}
    decision = choose_license(merged)
    if request.license:
        warnings = []
        if decision.license and request.license.lower() != decision.license:
            warnings.append(
                f"you chose the licence {request.license!r}; the donors' cards say {decision.license!r} at their "
                "most restrictive. Check that their terms allow it"
            )
        return request.license, warnings, []
    unknown = [name for name in decision.unknown if hub_checked or not _is_hub_name(name, recipe)]
    if unknown:
        names = ", ".join(unknown)
        problem = _error(
            "license",
            f"the licence of {names} is unknown (its model card states none), so the merge's cannot be chosen",
            "read the donors' terms and give the licence yourself (--license ID, e.g. apache-2.0 or other)",
        )
        return None, list(decision.warnings), [problem]
    return decision.license or "other", list(decision.warnings), []


def _is_hub_name(name: str, recipe: Recipe) -> bool:
    return name in {hub_id_of(ref) for ref in recipe.model_refs()}


def _gguf_problems(request: PublishRequest, taken: set[str]) -> list[Problem]:
    problems = []
    for path in request.include_gguf:
        path = Path(path)
        hint = "give a .gguf file that exists (for example one written by `frankenmoe export-gguf`)"
        if not path.is_file():
            problems.append(_error("gguf", f"{path} does not exist", hint))
            continue
        with path.open("rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            problems.append(_error("gguf", f"{path.name} is not a GGUF file", hint))
        elif path.name in taken:
            problems.append(
                _error("gguf", f"{path.name} has the name of a file already in the repo", "rename the GGUF file")
            )
        taken.add(path.name)
    return problems


def plan_publish(
    request: PublishRequest, *, cancel: threading.Event | None = None, config: HubConfig | None = None
) -> PublishPlan:
    """Check everything a publish needs and build the card; nothing is uploaded.

    Problems (errors stop the publish; warnings are for the user to read): an unfinished merge folder,
    a repo id the Hub refuses, no token or one that cannot write to the namespace, a donor licence
    that is unknown, a file holding a local path or the token. Raises HubError when the Hub cannot be
    reached at all.
    """
    from app.core.hub.config import resolve_config

    config = resolve_config(config)
    model_dir = Path(os.path.realpath(os.path.expanduser(request.model_dir)))
    request = replace(request, model_dir=model_dir)
    problems: list[Problem] = list(check_merge_folder(model_dir))
    warnings: list[str] = []
    check_cancel(cancel)

    repo_problem = repo_id_problem(request.repo_id)
    if repo_problem is not None:
        problems.append(repo_problem)
    token = resolved_token(request)
    user = ""
    repo_exists = False
    answer: dict[str, Any] | Problem | None = None
    if token is None:
        problems.append(
            _error(
                "token",
                "no Hugging Face access token is set",
                "log in with a token that has the write role (`hf auth login`), set HF_TOKEN, or pass --token",
            )
        )
    else:
        answer = _whoami(token, config)
        if isinstance(answer, Problem):
            problems.append(answer)
    if isinstance(answer, dict):
        user = str(answer.get("name", ""))
    if isinstance(answer, dict) and repo_problem is None:
        if "/" not in request.repo_id:
            request = replace(request, repo_id=f"{user}/{request.repo_id}")
        namespace = request.repo_id.split("/")[0]
        can_write, role = write_permission(answer, namespace)
        if not can_write:
            problems.append(
                _error(
                    "token",
                    f"the access token can't upload to {namespace}: its role is {role}",
                    f"create a token with the write role for {namespace} in your Hugging Face settings "
                    "(Access Tokens) and log in with it (`hf auth login`), set HF_TOKEN, or pass --token",
                )
            )
        else:
            repo_exists = config.api().repo_exists(request.repo_id, token=token)
    check_cancel(cancel)

    card_text = ""
    files: list[str] = []
    recipe_path = model_dir / RECIPE_FILENAME
    if model_dir.is_dir() and not recipe_path.is_file():
        problems.append(
            _error(
                "model",
                f"{model_dir.name} has no {RECIPE_FILENAME}, so it is not a FrankenMoE Studio merge",
                "publish a folder the merge wrote",
            )
        )
    elif model_dir.is_dir():
        recipe = load_recipe(recipe_path)
        # Without a working token the Hub is not asked; the check runs again once the token is fixed.
        hub_checked = isinstance(answer, dict)
        hub_licenses, donor_warnings = _hub_donor_facts(recipe, token, config) if hub_checked else ({}, [])
        warnings += donor_warnings
        license_id, license_warnings, license_problems = _license(request, recipe, hub_licenses, hub_checked)
        warnings += license_warnings
        problems += license_problems
        card_text = _card(request, recipe, model_dir, license_id or "other")
        files = folder_files(model_dir)
        if CARD not in files:  # the card is generated: the repo gets one even when the folder has none
            files.insert(0, CARD)
        problems += _gguf_problems(request, set(files))
        files += [Path(p).name for p in request.include_gguf if Path(p).name not in files]
        local_parts = [part for part in donor_parts(recipe) if part.ref.is_local]
        donors = [f for f in (donor_folder(p.ref, adapter=p.is_adapter) for p in local_parts) if f is not None]
        check_cancel(cancel)
        problems += _leaks(request, files, card_text, local_paths(model_dir, donors, config.cache_dir), token)
    plan = PublishPlan(
        request=request,
        user=user,
        repo_exists=repo_exists,
        files=tuple(files),
        total_bytes=0,
        card_text=card_text,
        warnings=tuple(warnings),
        problems=tuple(problems),
    )
    sources = upload_sources(plan) if files else {}
    total = sum(len(s) if isinstance(s, bytes) else s.stat().st_size for s in sources.values() if _exists(s))
    return replace(plan, total_bytes=total)


def _exists(source: Path | bytes) -> bool:
    return isinstance(source, bytes) or source.is_file()


def _card(request: PublishRequest, recipe: Recipe, model_dir: Path, license_id: str) -> str:
    readme = model_dir / CARD
    existing = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else ""
    try:
        model_type = str(json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["model_type"])
    except (OSError, ValueError, KeyError, TypeError):
        model_type = "mixtral"  # check_merge_folder has reported the broken config
    base = donor_folder(recipe.base_model)
    return render_model_card(
        recipe,
        card_title_and_description(existing),
        base if base is not None else model_dir,
        model_dir.name,
        model_type,
        license_id=license_id,
        repo_id=request.repo_id if "/" in request.repo_id else None,
        gguf_files=[Path(p).name for p in request.include_gguf],
        preview_image=ROUTING_PREVIEW_IMAGE if (model_dir / ROUTING_PREVIEW_IMAGE).is_file() else None,
        kept_sections=card_sections(existing),
    )


def _leaks(
    request: PublishRequest, files: list[str], card_text: str, paths: list[str], token: str | None
) -> list[Problem]:
    generated = generated_files(request, card_text)
    contents: dict[str, bytes] = {}
    for name in files:
        if name in generated:
            contents[name] = generated[name]
            continue
        gguf = next((Path(p) for p in request.include_gguf if Path(p).name == name), None)
        path = gguf if gguf is not None else Path(request.model_dir) / name
        if path.is_file():
            contents[name] = scanned_bytes(path)
    return leak_problems(contents, paths, token)


def raise_if_blocked(plan: PublishPlan) -> None:
    """Refuse to upload while the plan has errors."""
    if plan.errors:
        from app.core.problems import ProblemsError

        raise ProblemsError(plan.problems)
    if not plan.files:
        raise FrankenMoEError("there is nothing to publish", "give the folder of a finished merge")
