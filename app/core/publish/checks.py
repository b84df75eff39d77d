"""Checks before anything is uploaded: a complete merge, a valid repo id, a token that can write there,
and no file that gives away this machine's paths or the token."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from app.core.merge.leftovers import PARTIAL_MARK, REPLACED_MARK
from app.core.merge.shards import SAMPLE_HASHES_KEY, sample_sha256
from app.core.problems import Problem, Severity
from app.core.sources import SAFETENSORS_INDEX, ModelSourceError, read_safetensors_header

SINGLE_WEIGHTS = "model.safetensors"
# How many shards' sample hashes are checked: the first, the last and one between are enough to tell a
# folder whose shards were swapped, re-merged or damaged, without reading a large model twice.
SAMPLED_SHARDS = 3
# Text files above this size are scanned only in their first part (a tokenizer.json is a few MB).
SCAN_BYTES = 64 * 2**20
# A GGUF keeps its metadata (where a path could hide) before its tensors.
GGUF_SCAN_BYTES = 32 * 2**20
_REPO_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def _problem(field: str, message: str, hint: str, severity: Severity = Severity.ERROR) -> Problem:
    return Problem(field=field, message=message, hint=hint, severity=severity)


# --------------------------------------------------------------------------- the merge folder


def check_merge_folder(model_dir: Path) -> list[Problem]:
    """Whether ``model_dir`` is a whole merge: config, weights whose files, sizes and sample hashes match
    the index, and no sign of a merge still running or killed."""
    hint = "merge again into a new folder and publish that one once the merge says it is done"
    if not model_dir.is_dir():
        return [_problem("model", f"the model folder {model_dir} does not exist", "give the folder a merge wrote")]
    if model_dir.name.startswith((PARTIAL_MARK, REPLACED_MARK)):
        return [_problem("model", f"{model_dir.name} is the work folder of a merge that has not finished", hint)]
    problems: list[Problem] = []
    config = model_dir / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if not model_type:
        problems.append(_problem("model", f"{model_dir.name} has no readable config.json with a model_type", hint))
    index_path = model_dir / SAFETENSORS_INDEX
    if index_path.is_file():
        problems += _check_index(model_dir, index_path, hint)
    elif (model_dir / SINGLE_WEIGHTS).is_file():
        problems += _check_shard(model_dir / SINGLE_WEIGHTS, None, hint)
    else:
        problems.append(_problem("model", f"{model_dir.name} holds no weights ({SINGLE_WEIGHTS} or an index)", hint))
    return problems


def _check_shard(path: Path, expected_names: set[str] | None, hint: str) -> list[Problem]:
    """A shard's header reads and its size is exactly the header's plus the data the header describes."""
    try:
        tensors = read_safetensors_header(path)
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
    except (ModelSourceError, OSError, struct.error) as exc:
        reason = exc.message if isinstance(exc, ModelSourceError) else str(exc)
        return [_problem("model", f"{path.name} is not a readable safetensors file ({reason})", hint)]
    expected = max((t.end for t in tensors.values()), default=8 + header_size)
    size = path.stat().st_size
    if size != expected:
        return [_problem("model", f"{path.name} is {size} bytes, its header says {expected}", hint)]
    if expected_names is not None and set(tensors) != expected_names:
        return [_problem("model", f"the tensors in {path.name} are not the ones the index lists for it", hint)]
    return []


def _check_index(model_dir: Path, index_path: Path, hint: str) -> list[Problem]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map: dict[str, str] = index["weight_map"]
        metadata: dict[str, Any] = index.get("metadata") or {}
    except (OSError, ValueError, KeyError, TypeError):
        return [_problem("model", f"{SAFETENSORS_INDEX} in {model_dir.name} is not a readable index", hint)]
    by_shard: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(tensor)
    missing = [shard for shard in by_shard if not (model_dir / shard).is_file()]
    if missing:
        message = f"{model_dir.name} lacks {len(missing)} shard(s) its index lists, e.g. {missing[0]}"
        return [_problem("model", message, hint)]
    problems: list[Problem] = []
    for shard, names in by_shard.items():
        problems += _check_shard(model_dir / shard, names, hint)
    if problems:
        return problems
    total = metadata.get("total_size")
    data = sum(_data_bytes(model_dir / shard) for shard in by_shard)
    if isinstance(total, int) and total != data:
        problems.append(_problem("model", f"the index says {total} bytes of weights, the shards hold {data}", hint))
    hashes = metadata.get(SAMPLE_HASHES_KEY)
    if isinstance(hashes, Mapping):
        shards = sorted(hashes)
        sampled = sorted({shards[0], shards[len(shards) // 2], shards[-1]}) if shards else []
        for shard in sampled[:SAMPLED_SHARDS]:
            if not (model_dir / shard).is_file() or sample_sha256(model_dir / shard) != hashes[shard]:
                problems.append(_problem("model", f"{shard} is not the file the merge wrote (its hash differs)", hint))
    return problems


def _data_bytes(path: Path) -> int:
    return sum(t.nbytes for t in read_safetensors_header(path).values())


# --------------------------------------------------------------------------- the repo id and the token


def suggested_repo_id(repo_id: str) -> str:
    """A valid repo id close to ``repo_id``: allowed characters only, no "--" or "..", no leading or
    trailing "-" or ".", at most 96 characters."""
    parts = [part for part in repo_id.strip().strip("/").split("/") if part][-2:]
    fixed = []
    for part in parts:
        part = _REPO_NAME_CHARS.sub("-", part)
        part = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", part)).strip("-.")
        fixed.append(part.removesuffix(".git") or "model")
    return "/".join(fixed or ["my-frankenmoe"])[:96].strip("-.")


def repo_id_problem(repo_id: str) -> Problem | None:
    """None for a repo id huggingface_hub accepts; otherwise what is wrong and a valid id to use."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        reason = str(exc).split(":", 1)[0].rstrip(".")
        return _problem(
            "repo_id",
            f"{repo_id!r} is not a valid Hub repo id ({reason})",
            f"use letters, digits, '-', '_' and '.' as namespace/name, e.g. {suggested_repo_id(repo_id)}",
        )
    return None


def write_permission(whoami: Mapping[str, Any], namespace: str) -> tuple[bool, str]:
    """Whether the token ``whoami`` describes can create and write repos under ``namespace``, and its
    role in words (for the message when it cannot)."""
    access = (whoami.get("auth") or {}).get("accessToken") or {}
    role = str(access.get("role") or "unknown")
    user = str(whoami.get("name", ""))
    org_roles = {str(org.get("name")): str(org.get("roleInOrg") or "") for org in whoami.get("orgs") or []}
    if namespace != user and namespace not in org_roles:
        return False, f"{role} (and {user} is not a member of {namespace})"
    if namespace != user and org_roles[namespace] not in ("write", "admin", "contributor"):
        return False, f"{role} (and {user}'s role in {namespace} is {org_roles[namespace] or 'read'})"
    if role == "fineGrained":
        scoped = (access.get("fineGrained") or {}).get("scoped") or []
        can = any(
            (entry.get("entity") or {}).get("name") == namespace and "repo.write" in (entry.get("permissions") or [])
            for entry in scoped
        )
        return can, f"fine-grained{'' if can else f' without repo.write for {namespace}'}"
    return role in ("write", "admin"), role


# --------------------------------------------------------------------------- what the files hold


def local_paths(model_dir: Path, donor_folders: Iterable[Path], cache_dir: Path | None) -> list[str]:
    """This machine's paths a published file must not hold: the home folder, the model's folder and the
    folder holding it, the donors' folders and the Hugging Face cache."""
    paths = {str(Path.home()), str(model_dir), str(model_dir.parent), *(str(f) for f in donor_folders)}
    paths |= {str(Path(os.path.realpath(p))) for p in list(paths)}
    if cache_dir is not None:
        paths.add(str(cache_dir))
    # "/" or a one-letter drive would match everything; a path that short is no secret.
    return sorted((p.rstrip("/\\") for p in paths if len(p.rstrip("/\\")) > 4), key=len, reverse=True)


def _path_pattern(paths: list[str]) -> re.Pattern[bytes] | None:
    if not paths:
        return None
    alternatives = b"|".join(re.escape(p.encode()) for p in paths)
    # A path, not a longer name that starts like one: "/root" must not match "/rootfs".
    return re.compile(b"(?:" + alternatives + rb")(?![A-Za-z0-9_.-])")


def scanned_bytes(path: Path) -> bytes:
    """The part of a file where a path or a token could be: a safetensors header, a GGUF's metadata,
    the beginning of any other file."""
    with path.open("rb") as handle:
        if path.suffix == ".safetensors":
            head = handle.read(8)
            if len(head) < 8:
                return head
            (size,) = struct.unpack("<Q", head)
            return handle.read(min(size, SCAN_BYTES))
        return handle.read(GGUF_SCAN_BYTES if path.suffix == ".gguf" else SCAN_BYTES)


def leak_problems(contents: Mapping[str, bytes], paths: list[str], token: str | None) -> list[Problem]:
    """A problem for each file (by its name in the repo) that holds one of ``paths`` or the token.

    The message names the file and the path found, never the token itself.
    """
    pattern = _path_pattern(paths)
    problems = []
    for name, data in contents.items():
        if token and token.encode() in data:
            problems.append(
                _problem(
                    "files",
                    f"{name} holds your Hugging Face access token",
                    f"remove the token from {name} (and revoke it in your Hub settings), then publish again",
                )
            )
        found = pattern.search(data) if pattern is not None else None
        if found is not None:
            problems.append(
                _problem(
                    "files",
                    f"{name} holds a path of this machine ({found.group(0).decode(errors='replace')})",
                    f"remove the path from {name}, or name the model by its Hub id or folder name only",
                )
            )
    return problems
