"""PEFT adapters on the Hub, against the local Hub with the real client: the search filter, the
details (base and rank), the fit hint and downloads that fetch only an adapter's files."""

from __future__ import annotations

import json

import pytest

from app.core.hub import (
    MachineMemory,
    NoSafetensorsError,
    cached_snapshot,
    download_model,
    estimate_fit,
    inspect_model,
    search_models,
)
from app.core.progress import run_job
from app.core.recipe import ModelRef
from tests.hubserver import ADAPTER_BASE, hub_files_of, safetensors_parameters

pytest_plugins = ["tests.hubserver"]

ADAPTER = "acme/tiny-adapter-chat"
ROOMY = MachineMemory(ram_total=64 * 10**9, ram_available=60 * 10**9)


def adapter_parameters(files: dict[str, bytes]) -> int:
    return sum(safetensors_parameters(files["adapter_model.safetensors"]).values())


def test_the_adapter_filter_lists_peft_repos_only_with_their_base(adapter_hub, hub_config, tiny_hub_adapters):
    adapters = search_models("tiny", adapters=True, config=hub_config).models
    ids = [m.repo_id for m in adapters]
    assert ids == ["acme/tiny-adapter-chat", "acme/tiny-adapter-plain", "acme/tiny-adapter-pickle"]
    assert all(m.is_adapter and m.library == "peft" and m.base_model == ADAPTER_BASE for m in adapters)
    plain = adapters[1]
    assert plain.parameters == adapter_parameters(tiny_hub_adapters["lora"])
    # The plain search lists adapters that declare text generation too, marked as adapters.
    models = search_models("tiny", limit=50, config=hub_config).models
    assert {m.repo_id for m in models if m.is_adapter} == {m.repo_id for m in adapters}
    assert {m.library for m in models if not m.is_adapter} == {"transformers"}
    assert all(m.base_model is None for m in models if not m.is_adapter)


def test_the_local_hub_filters_by_library_as_the_hub_api_does(adapter_hub, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = HfApi(endpoint=adapter_hub.url, token=False)
    by_filter = {m.id for m in api.list_models(filter="peft")}
    assert by_filter == {"acme/tiny-adapter-chat", "acme/tiny-adapter-plain", "acme/tiny-adapter-pickle"}
    # The Hub also answers a `library` parameter; huggingface_hub sends the library as a filter.
    response = api_get(adapter_hub.url + "/api/models?library=peft&search=plain")
    assert [m["id"] for m in response] == ["acme/tiny-adapter-plain"]


def api_get(url: str) -> list[dict]:
    from huggingface_hub.utils import get_session

    response = get_session().get(url)
    response.raise_for_status()
    return response.json()


def test_details_show_the_adapters_base_rank_and_size(adapter_hub, hub_config, tiny_hub_adapters, tiny_hub_files):
    report = inspect_model(ADAPTER, base=ModelRef.parse(ADAPTER_BASE), config=hub_config)
    card = report.adapter
    assert card is not None
    assert (card.base_model, card.r, card.lora_alpha, card.peft_type) == (ADAPTER_BASE, 8, 16.0, "LORA")
    assert card.rank_text() == "r=8, alpha=16"
    assert set(card.target_modules) == {"gate_proj", "up_proj", "down_proj", "q_proj"}
    assert card.weights_bytes == len(tiny_hub_adapters["lora"]["adapter_model.safetensors"])
    # Its architecture is its base's, and it can join a recipe on that base.
    assert report.architecture.family == "llama"
    assert report.config == json.loads(tiny_hub_files["llama-a"]["config.json"])
    assert report.can_join, report.problems
    assert card.base_parameters == sum(safetensors_parameters(tiny_hub_files["llama-a"]["model.safetensors"]).values())
    assert not card.base_cached
    assert "for its base acme/tiny-llama-instruct (not in the cache)" in card.fetch_text()


def test_details_check_the_adapters_base_against_the_recipe(adapter_hub, hub_config):
    report = inspect_model(ADAPTER, base=ModelRef.parse("acme/tiny-llama-wide"), config=hub_config)
    assert not report.can_join
    assert any("hidden" in p.message and ADAPTER_BASE in p.message for p in report.problems if p.is_error), (
        report.problems
    )


def test_a_pickle_only_adapter_is_refused_with_the_reason(adapter_hub, hub_config):
    report = inspect_model("acme/tiny-adapter-pickle", config=hub_config)
    assert not report.can_join
    assert any("adapter_model.safetensors" in p.message and "pickle" in p.message for p in report.problems)
    with pytest.raises(NoSafetensorsError, match=r"LoRA adapter without adapter_model\.safetensors"):
        run_job(download_model("acme/tiny-adapter-pickle", config=hub_config))


def test_the_fit_hint_counts_the_adapter_not_a_full_model(adapter_hub, hub_config, tiny_hub_adapters):
    report = inspect_model(ADAPTER, config=hub_config)
    card = report.adapter
    assert card is not None and card.base_parameters
    # The adapter's own files (config, weights, tokenizer, card), none of the repo's training leftovers.
    adapter_files = ("adapter_config.json", "adapter_model.safetensors", "README.md")
    adapter_size = sum(len(content) for name, content in hub_files_of(adapter_hub, ADAPTER).items()
                       if name in adapter_files or ("token" in name and "/" not in name))
    assert card.weights_bytes == len(tiny_hub_adapters["lora"]["adapter_model.safetensors"])
    base_size = card.base_bytes
    assert base_size is not None and base_size > adapter_size
    # What using it downloads: the adapter, plus its base while the cache lacks it.
    assert card.fetch_bytes == adapter_size + base_size
    run_job(download_model(ADAPTER_BASE, config=hub_config))
    cached = inspect_model(ADAPTER, config=hub_config).adapter
    assert cached is not None and cached.base_cached and cached.fetch_bytes == adapter_size
    assert "already in the cache" in cached.fetch_text()
    # Memory: the base with its adapter beside it for the gates; an MoE of the base's size to chat.
    parameters = adapter_parameters(tiny_hub_adapters["lora"])
    with_adapter = estimate_fit(
        report.config, dense_parameters=card.base_parameters, adapter_parameters=parameters, n_experts=2, machine=ROOMY
    )
    full = estimate_fit(report.config, dense_parameters=card.base_parameters, n_experts=2, machine=ROOMY)
    assert with_adapter.gate_bytes == int((card.base_parameters + parameters) * 2 * 1.2)
    assert with_adapter.chat_bytes == full.chat_bytes


def test_download_of_an_adapter_fetches_only_its_files(adapter_hub, hub_config, tiny_hub_adapters):
    folder = run_job(download_model(ADAPTER, config=hub_config))
    fetched = sorted(p.name for p in folder.iterdir())
    lora = tiny_hub_adapters["lora"]
    tokenizer = sorted(name for name in hub_files_of(adapter_hub, ADAPTER) if "token" in name)
    assert tokenizer
    assert fetched == sorted(["adapter_config.json", "adapter_model.safetensors", "README.md", *tokenizer])
    assert (folder / "adapter_model.safetensors").read_bytes() == lora["adapter_model.safetensors"]
    for name in ("adapter_model.bin", "training_args.bin", "optimizer.pt", "checkpoint-10/adapter_model.safetensors"):
        assert not adapter_hub.file_requests(name), name
    # The cache knows it as complete, for the merge to find without the network.
    assert cached_snapshot(ModelRef.parse(ADAPTER), hub_config) == folder
    gets = len(adapter_hub.file_requests("adapter_model.safetensors"))
    assert run_job(download_model(ADAPTER, config=hub_config)) == folder
    assert len(adapter_hub.file_requests("adapter_model.safetensors")) == gets == 1


def test_a_partly_downloaded_adapter_is_not_taken_as_cached(adapter_hub, hub_config):
    folder = run_job(download_model("acme/tiny-adapter-plain", config=hub_config))
    (folder / "adapter_model.safetensors").unlink()
    assert cached_snapshot(ModelRef.parse("acme/tiny-adapter-plain"), hub_config) is None


def test_a_model_plus_adapter_reference_fetches_the_model_and_only_the_adapters_files(adapter_hub, hub_config):
    from app.core.hub import ensure_models

    ref = ModelRef.parse(f"{ADAPTER_BASE}+{ADAPTER}")
    folders = run_job(ensure_models([ref], config=hub_config))
    assert (folders[ref] / "model.safetensors").is_file()
    adapter_folder = folders[ref.lora]
    assert (adapter_folder / "adapter_model.safetensors").is_file()
    assert not adapter_hub.file_requests("adapter_model.bin")
    assert not adapter_hub.file_requests("optimizer.pt")
