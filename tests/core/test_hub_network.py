"""A Hub that does not answer: said at once in one error, never retried behind the user's back,
and models already in the cache keep working without a request. Against loopback addresses only.

How quickly is measured in bench/hub_offline.py; here the probe's own words in the error show that
the probe, not a timeout or a retry loop, ended the call.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import replace

import httpx2
import pytest

from app.core.hub import (
    DownloadProgress,
    HubConfig,
    HubOfflineError,
    call_cancellable,
    check_token,
    download_model,
    ensure_recipe_models,
    fetch_config,
    forget_reachability,
    inspect_model,
    search_models,
    unreachable_reason,
)
from app.core.hub.network import connection_target
from app.core.progress import Cancelled, run_job
from app.core.recipe import ModelRef, parse_recipe
from app.core.sources import resolve_model_dir

pytest_plugins = ["tests.hubserver"]

REPO = "acme/tiny-llama-instruct"


@pytest.fixture
def http_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every HTTP request huggingface_hub sends from now on, as "METHOD url", recorded at the transport."""
    sent: list[str] = []
    original = httpx2.HTTPTransport.handle_request

    def recording(transport: httpx2.HTTPTransport, request: httpx2.Request) -> httpx2.Response:
        sent.append(f"{request.method} {request.url}")
        return original(transport, request)

    monkeypatch.setattr(httpx2.HTTPTransport, "handle_request", recording)
    return sent


def offline_config(hub_home, endpoint: str, **settings) -> HubConfig:
    return HubConfig(endpoint=endpoint, cache_dir=hub_home / "hub", retry_delay_s=0.01, **settings)


def collect(job) -> tuple[object, list[DownloadProgress]]:
    records: list[DownloadProgress] = []
    return run_job(job, records.append), records


def test_a_refused_connection_is_one_clear_error_for_every_hub_call(hub_home, closed_endpoint, http_requests):
    config = offline_config(hub_home, closed_endpoint)
    port = closed_endpoint.rsplit(":", 1)[1]
    calls = {
        "search": lambda: search_models("llama", config=config),
        "inspect": lambda: inspect_model(REPO, config=config),
        "config": lambda: fetch_config(ModelRef.parse(REPO), config),
        "token": lambda: check_token("hf_some_token", config),
    }
    for name, call in calls.items():
        with pytest.raises(HubOfflineError) as caught:
            call()
        error = caught.value
        reason = f"127.0.0.1 port {port} refused the connection"
        assert error.message == f"cannot reach the Hub at {closed_endpoint} ({reason})", name
        assert "models already in the Hugging Face cache still work offline" in error.hint, name
    # The probe said so: not one request was sent, so none was retried.
    assert http_requests == []


def test_a_download_while_offline_fails_without_retrying(hub_home, closed_endpoint, http_requests):
    # Before: five retries with growing pauses (2 + 4 + 8 + 16 + 32 s with the default settings).
    with pytest.raises(HubOfflineError, match="refused the connection"):
        collect(download_model(REPO, config=offline_config(hub_home, closed_endpoint, max_retries=5)))
    assert http_requests == []


def test_a_recipe_fetch_while_offline_fails_without_retrying(hub_home, closed_endpoint):
    recipe = parse_recipe(f"base_model: {REPO}\ngate_mode: random\nexperts:\n  - source_model: acme/tiny-llama-chat\n")
    records: list[DownloadProgress] = []
    with pytest.raises(HubOfflineError, match="cannot reach the Hub"):
        run_job(ensure_recipe_models(recipe, config=offline_config(hub_home, closed_endpoint)), records.append)
    assert [r.message for r in records if r.retry] == []


def test_a_connection_that_never_opens_ends_with_the_probe(hub_home, silent_endpoint):
    # A short probe keeps the test quick; the default 1.5 s is measured by the bench.
    config = offline_config(hub_home, silent_endpoint, probe_timeout_s=0.2)
    with pytest.raises(HubOfflineError, match=r"did not answer within 0\.2 s"):
        search_models("llama", config=config)  # before: waited without any timeout
    with pytest.raises(HubOfflineError, match=r"did not answer within 0\.2 s"):
        collect(download_model(REPO, config=config))


def test_a_server_that_accepts_but_never_answers_times_out(hub, hub_config):
    release = hub.hold("/api/models")
    patient = replace(hub_config, request_timeout_s=0.3)
    try:
        with pytest.raises(HubOfflineError, match=r"\(no answer in time\)"):
            search_models("llama", config=patient)  # before: waited for ever
        with pytest.raises(HubOfflineError, match=r"\(no answer in time\)"):
            inspect_model(REPO, config=patient)
    finally:
        release.set()


def test_a_search_is_asked_once(hub, hub_config):
    # huggingface_hub's listing retried a dropped connection five times over 23 s; a search now
    # reports the failure at once and the user searches again.
    hub.refuse_connections(5)
    with pytest.raises(HubOfflineError, match="closed without an answer"):
        search_models("llama", config=hub_config)
    assert hub.refusals_left == 4
    hub.refuse_connections(0)
    assert search_models("tiny", config=hub_config).models


@pytest.mark.parametrize("endpoint_fixture", ["closed_endpoint", "silent_endpoint"])
def test_cached_models_work_offline_without_a_request(
    request, hub, hub_config, hub_home, tiny_hub_files, http_requests, endpoint_fixture
):
    folder, _ = collect(download_model(REPO, config=hub_config))
    offline = offline_config(hub_home, request.getfixturevalue(endpoint_fixture), probe_timeout_s=0.2)
    http_requests.clear()

    recipe = parse_recipe(f"base_model: {REPO}\ngate_mode: random\nexperts:\n  - source_model: {REPO}\n")
    folders, records = collect(ensure_recipe_models(recipe, config=offline))
    assert folders == {ModelRef.parse(REPO): folder} and records == []
    assert resolve_model_dir(ModelRef.parse(REPO), cache_dir=offline.cache_dir) == folder
    # config.json comes from the cache as under HF_HUB_OFFLINE (before: a HEAD request first,
    # which waited out its 10 s timeout when the connection never opened)
    assert fetch_config(ModelRef.parse(REPO), offline) == fetch_config(ModelRef(path=str(folder)))
    assert http_requests == []
    # A model the cache lacks is named as unreachable, not as missing.
    with pytest.raises(HubOfflineError, match="cannot reach the Hub"):
        fetch_config(ModelRef.parse("acme/tiny-llama-chat"), offline)


def test_the_probe_is_remembered_briefly_and_asked_again_when_forgotten(hub_home):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        config = offline_config(hub_home, f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert unreachable_reason(config) is None
        assert unreachable_reason(config) is None
        listener.settimeout(5)
        listener.accept()[0].close()
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # the second question was answered from memory
        forget_reachability()
        assert unreachable_reason(config) is None
        listener.settimeout(5)
        listener.accept()[0].close()


def test_through_a_proxy_the_proxy_is_probed(hub_home, closed_endpoint, monkeypatch):
    # Only loopback is ever contacted: the endpoint's own name is never resolved.
    monkeypatch.setenv("HTTPS_PROXY", closed_endpoint)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    port = int(closed_endpoint.rsplit(":", 1)[1])
    assert connection_target("https://hub.example.invalid") == ("127.0.0.1", port)
    with pytest.raises(HubOfflineError, match=f"127.0.0.1 port {port} refused"):
        search_models("llama", config=offline_config(hub_home, "https://hub.example.invalid"))
    monkeypatch.setenv("NO_PROXY", "hub.example.invalid")
    assert connection_target("https://hub.example.invalid") == ("hub.example.invalid", 443)
    assert connection_target("http://mirror.example.invalid:8080") == ("mirror.example.invalid", 8080)


def test_huggingface_hub_retry_lines_are_not_printed(hub, hub_home, capfd):
    from huggingface_hub.utils import http_backoff

    import app.core.hub.network  # noqa: F401  # what every Hub call of ours imports

    hub.refuse_connections(1)
    response = http_backoff("GET", f"{hub.url}/api/models", base_wait_time=0.01, max_wait_time=0.01)
    assert response.status_code == 200 and hub.refusals_left == 0  # it did retry, once
    assert "Retry" not in capfd.readouterr().err


def test_a_cancellable_call_is_given_up_at_once():
    never_answered = threading.Event()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        call_cancellable(never_answered.wait, cancel)
    never_answered.set()  # lets the abandoned thread end

    def fails() -> None:
        raise HubOfflineError("raised in the call's thread", "")

    assert call_cancellable(lambda: 42, threading.Event()) == 42
    with pytest.raises(HubOfflineError, match="raised in the call's thread"):
        call_cancellable(fails, threading.Event())
