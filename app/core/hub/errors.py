"""Hub failures as errors a user can act on.

huggingface_hub reports the same situation in several shapes (a 401 for a missing repo, a
``LocalEntryNotFoundError`` wrapping a refused connection, ...). :func:`translate_error` looks
through the whole exception chain and names the situation once, with what to do about it.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.errors import RevisionNotFoundError as HfRevisionNotFoundError

from app.core.hub.config import HubConfig
from app.core.problems import FrankenMoEError
from app.core.progress import Cancelled


class HubError(FrankenMoEError):
    """Something about the Hub went wrong; ``message`` says what and ``hint`` what to do."""


class GatedModelError(HubError):
    """The repo's authors ask users to accept their terms; ``url`` is the page to do so."""

    def __init__(self, message: str, hint: str, url: str) -> None:
        super().__init__(message, hint)
        self.url = url


class ModelNotFoundError(HubError):
    pass


class RevisionNotFoundError(HubError):
    pass


class HubOfflineError(HubError):
    pass


class HubServerError(HubError):
    pass


class DiskFullError(HubError):
    pass


class NoSafetensorsError(HubError):
    pass


class TokenError(HubError):
    pass


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def is_transient(exc: BaseException) -> bool:
    """A failure that may go away by itself: a dropped or refused connection, a timeout, a 5xx."""
    chain = list(_exception_chain(exc))
    if any(isinstance(e, OfflineModeIsEnabled | RepositoryNotFoundError | HfRevisionNotFoundError) for e in chain):
        return False
    for error in chain:
        if isinstance(error, httpx2.TransportError):
            return True
        status = _status(error)
        if isinstance(error, HfHubHTTPError) and status is not None and (status >= 500 or status in (408, 429)):
            return True
    # snapshot_download turns "no connection and not in the cache" into LocalEntryNotFoundError
    return any(isinstance(e, LocalEntryNotFoundError) for e in chain)


def translate_error(
    exc: BaseException, repo_id: str | None, revision: str | None, config: HubConfig
) -> HubError | None:
    """The :class:`HubError` that names ``exc``'s situation, or None if it is not a Hub situation."""
    chain = list(_exception_chain(exc))
    name = repo_id or "the model"
    for error in chain:
        if isinstance(error, GatedRepoError):
            url = config.repo_url(repo_id) if repo_id else config.endpoint
            if _status(error) == 401:
                hint = (
                    f"log in to the Hub with an access token (Settings, or `hf auth login`), then open {url} "
                    "and accept the terms there"
                )
            else:
                hint = f"open {url} while logged in as the token's owner and accept the terms"
            return GatedModelError(f"{name} is gated: its authors ask you to accept their terms first", hint, url)
    for error in chain:
        if isinstance(error, RepositoryNotFoundError):
            return ModelNotFoundError(
                f"{name} was not found on the Hub, or it is private",
                "check the spelling (org/name); for a private model, log in with a token that can read it",
            )
        if isinstance(error, HfRevisionNotFoundError):
            return RevisionNotFoundError(
                f"{name} has no revision {revision!r}",
                "use a branch, tag or commit that exists, or leave the revision out for main",
            )
    for error in chain:
        if isinstance(error, OfflineModeIsEnabled):
            return HubOfflineError(
                f"HF_HUB_OFFLINE is set, and {name} is not complete in the Hugging Face cache",
                "unset HF_HUB_OFFLINE to reach the Hub, or use a model that is already downloaded",
            )
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return DiskFullError(
                f"the disk filled up while downloading {name}",
                f"free some space on the disk holding {config.cache_dir} (or point HF_HUB_CACHE elsewhere), "
                "then download again: finished files are kept",
            )
    if is_transient(exc):
        status = next((s for s in map(_status, chain) if s is not None and s >= 500), None)
        if status is not None:
            return HubServerError(
                f"the Hub at {config.endpoint} answered with error {status}",
                "the Hub may be busy or down; try again in a few minutes",
            )
        return unreachable_error(config, _connection_failure(chain))
    return None


def unreachable_error(config: HubConfig, reason: str) -> HubOfflineError:
    """The one error for "the Hub does not answer", whatever the way it failed."""
    return HubOfflineError(
        f"cannot reach the Hub at {config.endpoint} ({reason})",
        "check the internet connection and any proxy (or HF_ENDPOINT, for a mirror); "
        "models already in the Hugging Face cache still work offline",
    )


def _connection_failure(chain: list[BaseException]) -> str:
    """A few words on how the connection failed, for :func:`unreachable_error`."""
    for error in chain:
        if isinstance(error, httpx2.TimeoutException):
            return "no answer in time"
        if isinstance(error, httpx2.ConnectError):
            return "the connection failed"
        if isinstance(error, httpx2.RemoteProtocolError):
            return "the connection closed without an answer"
    return "the connection failed"


@contextmanager
def hub_errors(repo_id: str | None, revision: str | None, config: HubConfig) -> Iterator[None]:
    """Re-raise huggingface_hub failures inside the block as :class:`HubError`."""
    try:
        yield
    except (HubError, Cancelled):
        raise
    except Exception as exc:
        translated = translate_error(exc, repo_id, revision, config)
        if translated is None:
            raise
        raise translated from exc
