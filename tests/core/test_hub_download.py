"""Downloads into the HF cache from the local Hub: progress, cancel, resume, retries, recipes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from huggingface_hub import constants

from app.core.hub import (
    DiskFullError,
    DownloadProgress,
    HubOfflineError,
    NoSafetensorsError,
    cached_snapshot,
    download_model,
    ensure_recipe_models,
    inspect_model,
)
from app.core.hub import download as download_module
from app.core.progress import Cancelled, run_job
from app.core.recipe import ModelRef, parse_recipe

pytest_plugins = ["tests.hubserver"]

REPO = "acme/tiny-llama-instruct"


def collect(job):
    records: list[DownloadProgress] = []
    return run_job(job, records.append), records


def leftovers(cache: Path) -> list[Path]:
    return list(cache.rglob("*.incomplete"))


def test_download_fetches_what_a_merge_needs_with_progress(hub, hub_config, tiny_hub_files):
    folder, records = collect(download_model(REPO, config=hub_config))
    expected = tiny_hub_files["llama-a"]
    assert folder.parent.parent == hub_config.cache_dir / "models--acme--tiny-llama-instruct"
    for name, content in expected.items():
        assert (folder / name).read_bytes() == content
    assert not (folder / "README.md").exists()
    last = records[-1]
    assert last.bytes_done == last.bytes_total == sum(len(c) for c in expected.values())
    assert (last.done, last.total) == (len(expected), len(expected))
    assert all(0 <= r.fraction <= 1 for r in records)
    assert cached_snapshot(ModelRef.parse(REPO), hub_config) == folder

    # Already there: nothing is fetched twice, and inspect says so.
    gets = len(hub.file_requests("model.safetensors"))
    assert collect(download_model(REPO, config=hub_config))[0] == folder
    assert len(hub.file_requests("model.safetensors")) == gets == 1
    assert inspect_model(REPO, config=hub_config).size_text().startswith("all ")


def test_download_is_pinned_to_the_revision(hub, hub_config, tiny_hub_files):
    folder, _ = collect(download_model(f"{REPO}@v1", config=hub_config))
    assert folder.name == hub.repos[REPO].refs["v1"]
    assert (folder / "model.safetensors").read_bytes() == tiny_hub_files["llama-b"]["model.safetensors"]


def test_cancel_leaves_a_consistent_cache_and_the_next_download_completes(hub, hub_config, tiny_hub_files, monkeypatch):
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    hub.throttle("model.safetensors", piece=4096, pause_s=0.03)
    cancel = threading.Event()

    def cancel_once_bytes_flow(record):
        if record.bytes_done > 0:
            cancel.set()

    with pytest.raises(Cancelled):
        run_job(download_model(REPO, cancel, hub_config), cancel_once_bytes_flow)
    cache = hub_config.cache_dir
    assert leftovers(cache) == []
    snapshot = cache / "models--acme--tiny-llama-instruct" / "snapshots" / hub.repos[REPO].refs["main"]
    weights = tiny_hub_files["llama-a"]["model.safetensors"]
    # The weights were cut off midway, so no file of that name is in the snapshot.
    assert not (snapshot / "model.safetensors").exists()
    assert all((snapshot / p.name).read_bytes() == tiny_hub_files["llama-a"][p.name] for p in snapshot.iterdir())
    assert cached_snapshot(ModelRef.parse(REPO), hub_config) is None

    finished_before = {p.name for p in snapshot.iterdir()}
    folder, _ = collect(download_model(REPO, config=hub_config))
    assert (folder / "model.safetensors").read_bytes() == weights
    for name in finished_before:  # finished files were not fetched again
        assert len(hub.file_requests(name)) == 1


def test_dropped_connection_resumes_with_a_range_request(hub, hub_config, tiny_hub_files, monkeypatch):
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    hub.drop_connection("model.safetensors", after_bytes=3 * 4096)
    folder, _ = collect(download_model(REPO, config=hub_config))
    assert (folder / "model.safetensors").read_bytes() == tiny_hub_files["llama-a"]["model.safetensors"]
    assert hub.file_requests("model.safetensors") == [None, f"bytes={3 * 4096}-"]


def test_refused_connections_are_retried_then_reported(hub, hub_config):
    hub.refuse_connections(2)
    folder, records = collect(download_model(REPO, config=hub_config))
    assert (folder / "config.json").exists()
    assert max(r.retry for r in records) >= 1
    assert any("retrying" in r.message for r in records)

    hub.refuse_connections(1000)
    with pytest.raises(HubOfflineError, match="cannot reach the Hub"):
        collect(download_model("acme/tiny-llama-chat", config=hub_config))


def test_no_safetensors_is_refused_before_downloading(hub, hub_config):
    with pytest.raises(NoSafetensorsError, match="no safetensors weights"):
        collect(download_model("acme/pickle-llama", config=hub_config))
    assert hub.file_requests("pytorch_model.bin") == []


def test_disk_space_is_checked_before_starting(hub, hub_config, monkeypatch):
    # Demand more room than any disk has, rather than filling the test machine's disk.
    monkeypatch.setattr(download_module, "DISK_MARGIN_BYTES", 2**62)
    with pytest.raises(DiskFullError, match=r"only .* is free") as caught:
        collect(download_model(REPO, config=hub_config))
    assert "HF_HUB_CACHE" in caught.value.hint
    assert hub.file_requests("model.safetensors") == []


def test_gated_download_names_the_page(hub, hub_config):
    from app.core.hub import GatedModelError

    with pytest.raises(GatedModelError) as caught:
        collect(download_model("acme/gated-llama", config=hub_config))
    assert caught.value.url.endswith("/acme/gated-llama")


def test_recipe_models_come_from_the_cache_or_are_downloaded(hub, hub_config, tmp_path, tiny_hub_files):
    collect(download_model(REPO, config=hub_config))
    gets_before = len(hub.file_requests("model.safetensors"))
    local = tmp_path / "local-expert"
    local.mkdir()
    recipe = parse_recipe(
        f"base_model: {REPO}\n"
        "gate_mode: random\n"
        "experts:\n"
        f"  - source_model: {REPO}\n"
        "  - source_model: acme/tiny-llama-sharded\n"
        f"  - source_model: {local}\n"
    )
    folders, records = collect(ensure_recipe_models(recipe, config=hub_config))
    assert folders[ModelRef.parse(REPO)] == cached_snapshot(ModelRef.parse(REPO), hub_config)
    assert folders[ModelRef(path=str(local))] == local
    sharded = folders[ModelRef.parse("acme/tiny-llama-sharded")]
    assert not (sharded / "consolidated.safetensors").exists()
    assert (sharded / "model.safetensors.index.json").exists()
    assert {r.repo_id for r in records} == {"acme/tiny-llama-sharded"}  # the cached one was not touched
    assert len(hub.file_requests("model.safetensors")) == gets_before


def test_the_engine_opens_a_downloaded_model(hub, hub_config):
    from app.core.sources import open_model

    folder, _ = collect(download_model(REPO, config=hub_config))
    with open_model(ModelRef(path=str(folder))) as source:
        assert source.config["model_type"] == "llama"


def test_the_engine_resolves_a_downloaded_hub_ref(hub, hub_config):
    from app.core.sources import resolve_model_dir

    folder, _ = collect(download_model(REPO, config=hub_config))
    assert resolve_model_dir(ModelRef.parse(REPO), cache_dir=hub_config.cache_dir) == folder
