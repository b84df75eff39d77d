"""Access tokens: the one huggingface_hub already has, or one the user pastes.

A token is never printed, logged or kept anywhere but where huggingface_hub's own login keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub import get_token, login
from huggingface_hub.errors import HfHubHTTPError

from app.core.hub.config import HubConfig, resolve_config
from app.core.hub.errors import TokenError, hub_errors
from app.core.hub.network import require_hub


@dataclass(frozen=True, slots=True)
class HubUser:
    name: str
    token_name: str | None
    role: str | None


def has_token() -> bool:
    """Whether huggingface_hub has a token (``HF_TOKEN`` or a saved login)."""
    return get_token() is not None


def check_token(token: str | None = None, config: HubConfig | None = None) -> HubUser:
    """Who a token belongs to (``whoami``); without ``token``, the one huggingface_hub already has."""
    config = resolve_config(config)
    token = token.strip() if token is not None else config.token or get_token()
    if not token:
        raise TokenError(
            "no Hugging Face access token is set",
            "paste a token from your Hugging Face settings (Access Tokens); a read token is enough",
        )
    try:
        with hub_errors(None, None, config):
            require_hub(config)
            answer = config.api().whoami(token=token)
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 401:
            raise TokenError(
                "the Hub refused this access token",
                "copy the token again from your Hugging Face settings (Access Tokens); it may be revoked",
            ) from None  # the original error holds the request, whose headers hold the token
        raise
    access = (answer.get("auth") or {}).get("accessToken") or {}
    return HubUser(name=str(answer.get("name", "")), token_name=access.get("displayName"), role=access.get("role"))


def save_token(token: str, config: HubConfig | None = None) -> HubUser:
    """Check a pasted token and store it through huggingface_hub's login, for every HF tool to use.

    huggingface_hub's ``login`` validates against its import-time endpoint (``HF_ENDPOINT``), which
    is ``config.endpoint`` in every real setting, so the check here only adds a clear error.
    """
    user = check_token(token, config)
    login(token=token.strip(), add_to_git_credential=False)
    return user
