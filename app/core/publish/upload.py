"""The upload: create the repo (and branch), send each file, then one commit; a retry sends only what
the Hub does not have yet.

Files go up one at a time through huggingface_hub's ``preupload_lfs_files`` (Xet where the Hub and
``hf_xet`` offer it, LFS otherwise), so progress is reported and a cancel is honoured between files;
the commit that follows makes them appear in the repo all at once. An interrupted publish leaves the
repo as it was: the files already uploaded wait on the Hub, unreferenced, and the next attempt's
upload check (the LFS batch call, or Xet's deduplication) skips them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.hub.errors import HubError, hub_errors
from app.core.progress import Cancelled, Job, Progress, check_cancel
from app.core.publish.plan import PublishPlan, raise_if_blocked, resolved_token, upload_sources

if TYPE_CHECKING:
    from app.core.hub.config import HubConfig


@dataclass(frozen=True)
class PublishResult:
    url: str
    commit: str | None


class PublishError(HubError):
    """The upload failed part way; publishing again resumes it."""


_RESUME_HINT = "check the connection and publish again: files the Hub already received are not sent again"


def publish(
    plan: PublishPlan, *, cancel: threading.Event | None = None, config: HubConfig | None = None
) -> Job[PublishResult]:
    """Upload a checked plan. Yields Progress("upload", files done, files, bytes done, bytes total).

    Raises ProblemsError when the plan has errors (nothing is uploaded then), Cancelled between files,
    PublishError / HubError when the Hub fails; a retry after a failure uploads only what is missing.
    """
    from huggingface_hub import CommitOperationAdd

    from app.core.hub.config import resolve_config

    raise_if_blocked(plan)
    config = resolve_config(config)
    request = plan.request
    token = resolved_token(request)
    api = config.api()
    repo_id = request.repo_id
    revision = request.revision or None
    sources = upload_sources(plan)
    total_files = len(sources)
    yield Progress("upload", 0, total_files, 0, plan.total_bytes, message=f"creating {repo_id}")
    with hub_errors(repo_id, revision, config):
        api.create_repo(repo_id, token=token, private=request.private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    operations = []
    done_bytes = 0
    for done, (name, source) in enumerate(sources.items()):
        check_cancel(cancel)
        content = str(source) if isinstance(source, Path) else source
        operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=content)
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        yield Progress("upload", done, total_files, done_bytes, plan.total_bytes, message=name)
        with _upload_errors(name, config):
            api.preupload_lfs_files(repo_id, additions=[operation], token=token, revision=revision, free_memory=False)
        operations.append(operation)
        done_bytes += size
        yield Progress("upload", done + 1, total_files, done_bytes, plan.total_bytes, message=name)
    check_cancel(cancel)
    message = request.message or f"Upload {Path(request.model_dir).name} with FrankenMoE Studio"
    yield Progress("commit", total_files, total_files, done_bytes, plan.total_bytes, message="committing")
    with _upload_errors("the commit", config):
        info = api.create_commit(repo_id, operations, commit_message=message, token=token, revision=revision)
    url = config.repo_url(repo_id) + (f"/tree/{revision}" if revision else "")
    yield Progress("done", total_files, total_files, plan.total_bytes, plan.total_bytes, message=url)
    return PublishResult(url=url, commit=info.oid)


@contextmanager
def _upload_errors(what: str, config: HubConfig) -> Iterator[None]:
    """A huggingface_hub call, quiet; a failed upload or commit comes out as one PublishError (the original
    error stays out of the chain, since its request's headers hold the token)."""
    from huggingface_hub.utils import disable_progress_bars

    try:
        # huggingface_hub's own bars would print from the core; the job reports progress itself. Off only
        # for this call (never across a yield), so a download running meanwhile elsewhere keeps its bars.
        with disable_progress_bars():
            yield
    except (HubError, Cancelled):
        raise
    except Exception as exc:  # huggingface_hub wraps a failed upload in RuntimeError, OSError or ValueError
        raise _upload_error(what, exc, config) from None


def _upload_error(what: str, exc: BaseException, config: HubConfig) -> PublishError:
    """The one error for a failed upload: what failed and the Hub's reason, never the request (whose
    headers hold the token)."""
    reason = ""
    current: BaseException | None = exc
    while current is not None:
        response = getattr(current, "response", None)
        status = getattr(response, "status_code", None)
        if status is not None:
            code = response.headers.get("X-Error-Code") if response is not None else None
            reason = f"the Hub answered {status}" + (f" {code}" if code else "")
            break
        current = current.__cause__ or current.__context__
    if not reason:
        reason = "the connection failed"
    return PublishError(f"uploading {what} to {config.endpoint} failed ({reason})", _RESUME_HINT)
