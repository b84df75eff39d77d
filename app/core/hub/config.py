"""Where the Hub is and how patiently to talk to it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants


@dataclass(frozen=True)
class HubConfig:
    """The Hub endpoint, the cache to fill, and retry settings for one session of Hub work.

    ``token`` None means "whatever huggingface_hub already has" (``HF_TOKEN`` or a saved login).
    It is kept out of ``repr`` so that no log line or traceback ever shows it.
    """

    endpoint: str
    cache_dir: Path
    token: str | None = field(default=None, repr=False)
    max_retries: int = 5
    retry_delay_s: float = 2.0
    max_workers: int = 4
    # How long a connection to the Hub may take to open before the Hub counts as unreachable.
    probe_timeout_s: float = 1.5
    # How long one metadata request (search, model info, a small file's headers) may go unanswered.
    request_timeout_s: float = 10.0

    @classmethod
    def current(cls) -> HubConfig:
        """The settings huggingface_hub itself would use right now.

        ``HF_ENDPOINT`` is read from the environment at call time, because huggingface_hub reads it
        only once, at import; the cache location is huggingface_hub's own.
        """
        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        return cls(endpoint=endpoint.rstrip("/"), cache_dir=Path(constants.HF_HUB_CACHE))

    def api(self) -> HfApi:
        return HfApi(endpoint=self.endpoint, token=self.token)

    def repo_url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"


def resolve_config(config: HubConfig | None) -> HubConfig:
    return config if config is not None else HubConfig.current()
