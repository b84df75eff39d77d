"""Whether the Hub answers at all, asked quickly; and Hub calls that a user can walk away from.

Left to itself, huggingface_hub is patient: its listings retry a failed connection five times over
23 s, and a request whose connection never opens waits out the whole request timeout. So before
Hub work a TCP connection to the endpoint (or to the proxy that carries it) is tried with a short
timeout; when none opens, the work stops at once with one :class:`HubOfflineError`, and what can
come from the cache comes from the cache without asking, as under ``HF_HUB_OFFLINE``. The answer
is remembered for a few seconds, so a burst of calls costs one probe.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import TypeVar, cast
from urllib.parse import urlsplit

from huggingface_hub import constants

from app.core.hub.config import HubConfig
from app.core.hub.errors import unreachable_error
from app.core.progress import Cancelled

T = TypeVar("T")

# A working connection is trusted for a while; a failed one is asked again soon, since the user
# may be fixing it right now.
REACHABLE_TTL_S = 30.0
UNREACHABLE_TTL_S = 5.0
# How often a waiting call looks at its cancel event: fast enough to feel immediate.
CANCEL_POLL_S = 0.05

_DEFAULT_PORTS = {"http": 80, "https": 443}
_probes: dict[tuple[str, int, float], tuple[float, str | None]] = {}
_probes_lock = threading.Lock()


def connection_target(endpoint: str) -> tuple[str, int]:
    """The host and port that a request to ``endpoint`` connects to: the proxy's, when one is set for it."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    # The proxies httpx (under huggingface_hub) uses: the environment's, or the system's where it has them.
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass_environment(host, proxies):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_parts.hostname or "", proxy_parts.port or _DEFAULT_PORTS.get(proxy_parts.scheme, 80)
    return host, parts.port or _DEFAULT_PORTS.get(parts.scheme, 443)


def _try_connect(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror:
        return f"the name {host} cannot be resolved"
    except ConnectionRefusedError:
        return f"{host} port {port} refused the connection"
    except TimeoutError:
        return f"{host} port {port} did not answer within {timeout:g} s"
    except OSError as exc:
        return f"{host} port {port}: {exc.strerror or exc}"


def _probe(host: str, port: int, timeout: float) -> str | None:
    # Name resolution has no timeout of its own (a missing DNS server can take many seconds), so
    # the whole attempt runs in a thread that is waited for no longer than ``timeout``.
    outcome: SimpleQueue[str | None] = SimpleQueue()
    threading.Thread(
        target=lambda: outcome.put(_try_connect(host, port, timeout)), name="hub probe", daemon=True
    ).start()
    try:
        return outcome.get(timeout=timeout)
    except Empty:
        return f"{host} port {port} did not answer within {timeout:g} s"


def unreachable_reason(config: HubConfig) -> str | None:
    """Why no connection to the Hub opens right now, or None when one does.

    Under ``HF_HUB_OFFLINE`` nothing is tried (None): huggingface_hub then refuses every request
    itself, and the error names the setting.
    """
    if constants.is_offline_mode():
        return None
    host, port = connection_target(config.endpoint)
    key = (host, port, config.probe_timeout_s)
    now = time.monotonic()
    with _probes_lock:
        cached = _probes.get(key)
    if cached is not None:
        asked_at, reason = cached
        if now - asked_at < (REACHABLE_TTL_S if reason is None else UNREACHABLE_TTL_S):
            return reason
    reason = _probe(host, port, config.probe_timeout_s)
    with _probes_lock:
        _probes[key] = (time.monotonic(), reason)
    return reason


def forget_reachability() -> None:
    """Ask afresh next time (after a settings change, or between tests that reuse a port)."""
    with _probes_lock:
        _probes.clear()


def require_hub(config: HubConfig) -> None:
    """Raise :class:`HubOfflineError` at once when no connection to the Hub opens."""
    reason = unreachable_reason(config)
    if reason is not None:
        raise unreachable_error(config, reason)


def call_cancellable(work: Callable[[], T], cancel: threading.Event | None) -> T:
    """``work()``, given up as soon as ``cancel`` is set.

    A blocking Hub request cannot be interrupted, so it runs in a thread of its own; once cancelled
    it is left to end by itself (its timeouts bound it) and its answer is dropped. Only reads come
    here, and small files that huggingface_hub writes whole into the cache, so a late end is harmless.
    """
    if cancel is None:
        return work()
    outcome: SimpleQueue[tuple[T | None, BaseException | None]] = SimpleQueue()

    def run() -> None:
        try:
            outcome.put((work(), None))
        except BaseException as exc:  # handed to the caller, which re-raises it in its own thread
            outcome.put((None, exc))

    threading.Thread(target=run, name="hub call", daemon=True).start()
    while True:
        if cancel.is_set():
            raise Cancelled("cancelled")
        try:
            result, error = outcome.get(timeout=CANCEL_POLL_S)
        except Empty:
            continue
        if error is not None:
            raise error
        return cast(T, result)


class _LibraryRetryLines(logging.Filter):
    """Drops huggingface_hub's raw "Retrying in 8s [Retry 5/5]" lines: our jobs report their own
    retries as progress, and a failure ends in one error that says what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not ("[Retry " in text or "thrown while requesting" in text)


_http_logger = logging.getLogger("huggingface_hub.utils._http")
if not any(isinstance(f, _LibraryRetryLines) for f in _http_logger.filters):
    _http_logger.addFilter(_LibraryRetryLines())
