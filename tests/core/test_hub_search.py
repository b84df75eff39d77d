"""Search, inspect, errors, tokens and the fit hint, against the local Hub with the real client."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from app.core.hub import (
    GatedModelError,
    HubConfig,
    HubOfflineError,
    MachineMemory,
    ModelNotFoundError,
    RevisionNotFoundError,
    TokenError,
    check_token,
    estimate_fit,
    inspect_model,
    search_models,
)
from app.core.recipe import ModelRef

pytest_plugins = ["tests.hubserver"]


def test_search_lists_matching_text_generation_models_with_merge_facts(hub_config, tiny_hub_files):
    page = search_models("tiny llama", config=hub_config)
    ids = [m.repo_id for m in page.models]
    # by downloads; the gated and embedding repos don't match "tiny", the private one is never listed
    assert ids == [
        "acme/tiny-llama-instruct",
        "acme/tiny-llama-chat",
        "acme/tiny-llama-sharded",
        "acme/tiny-llama-wide",
    ]
    first = page.models[0]
    weights = tiny_hub_files["llama-a"]["model.safetensors"]
    assert first.dtype == "F32"
    assert first.size_bytes == first.parameters * 4
    assert 0 < first.size_bytes < len(weights)  # the file adds its header to the tensors
    assert (first.license, first.gated, first.downloads, first.likes) == ("apache-2.0", False, 500, 3)
    assert first.last_modified.year == 2024
    sharded = page.models[2]
    assert sharded.parameters == first.parameters * 2 or sharded.parameters > 0


def test_search_filters_text_generation_and_reports_gated(hub_config):
    ids = [m.repo_id for m in search_models("llama", limit=50, config=hub_config).models]
    assert "acme/llama-embeddings" not in ids
    assert "acme/secret-llama" not in ids
    gated = search_models("gated", config=hub_config).models
    assert [(m.repo_id, m.gated) for m in gated] == [("acme/gated-llama", True)]


@pytest.mark.parametrize(
    ("sort", "first"),
    [
        ("likes", "acme/tiny-llama-chat"),
        ("updated", "acme/tiny-llama-chat"),
        ("downloads", "acme/tiny-llama-instruct"),
    ],
)
def test_search_sorts(hub_config, sort, first):
    assert search_models("tiny", sort=sort, config=hub_config).models[0].repo_id == first


def test_search_pages_through_results(hub_config):
    first = search_models("tiny", limit=3, config=hub_config)
    assert len(first.models) == 3 and first.has_more
    second = search_models("tiny", limit=3, offset=first.next_offset, config=hub_config)
    assert not second.has_more
    everything = search_models("tiny", limit=10, config=hub_config)
    assert [m.repo_id for m in first.models + second.models] == [m.repo_id for m in everything.models]


def test_inspect_reads_small_files_only_and_checks_against_the_base(hub, hub_config, tiny_hub_files):
    report = inspect_model("acme/tiny-llama-chat", base=ModelRef.parse("acme/tiny-llama-instruct"), config=hub_config)
    arch = report.architecture
    assert (arch.family, arch.layers, arch.hidden_size, arch.intermediate_size) == ("llama", 2, 32, 64)
    assert arch.vocab_size > 0 and arch.rope_theta and arch.has_chat_template
    assert report.can_join, report.problems
    paths = {f.path for f in report.files}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= paths
    assert "README.md" not in paths and ".gitattributes" not in paths
    weights = len(tiny_hub_files["llama-b"]["model.safetensors"])
    # inspecting put only the two small files it read into the cache
    assert {f.path for f in report.files if f.cached} == {"config.json", "tokenizer_config.json"}
    assert report.bytes_to_fetch > weights
    assert "to fetch" in report.size_text() and "already cached" in report.size_text()
    assert hub.file_requests("model.safetensors") == []  # nothing large was downloaded


def test_inspect_reports_an_incompatible_model(hub_config):
    report = inspect_model("acme/tiny-llama-wide", base=ModelRef.parse("acme/tiny-llama-instruct"), config=hub_config)
    assert not report.can_join
    assert any("hidden" in p.message for p in report.problems if p.is_error), report.problems


def test_inspect_takes_one_copy_of_sharded_weights(hub_config, tiny_hub_files):
    report = inspect_model("acme/tiny-llama-sharded", config=hub_config)
    weights = sorted(f.path for f in report.files if f.path.endswith(".safetensors"))
    assert "consolidated.safetensors" not in weights
    assert len(weights) == 4 and "model.safetensors.index.json" in {f.path for f in report.files}


def test_inspect_reports_a_model_without_safetensors(hub_config):
    report = inspect_model("acme/pickle-llama", config=hub_config)
    assert not report.can_join
    assert any("safetensors" in p.message for p in report.problems)


def test_gated_model_names_the_page_to_accept_terms(hub, hub_config):
    with pytest.raises(GatedModelError) as caught:
        inspect_model("acme/gated-llama", config=hub_config)
    assert caught.value.url == f"{hub.url}/acme/gated-llama"
    assert "log in" in caught.value.hint and caught.value.url in caught.value.hint

    hub.add_token("hf_not_granted", "someone")
    refused = HubConfig(**{**hub_config.__dict__, "token": "hf_not_granted"})
    with pytest.raises(GatedModelError) as caught:
        inspect_model("acme/gated-llama", config=refused)
    assert "accept the terms" in caught.value.hint and "hf_not_granted" not in str(caught.value)

    hub.add_token("hf_granted", "tester")
    hub.repos["acme/gated-llama"].granted_tokens.add("hf_granted")
    granted = HubConfig(**{**hub_config.__dict__, "token": "hf_granted"})
    assert inspect_model("acme/gated-llama", config=granted).architecture.family == "llama"


@pytest.mark.parametrize("repo", ["acme/no-such-model", "acme/secret-llama"])
def test_missing_or_private_model(hub_config, repo):
    with pytest.raises(ModelNotFoundError, match="not found on the Hub, or it is private"):
        inspect_model(repo, config=hub_config)


def test_missing_revision(hub_config):
    with pytest.raises(RevisionNotFoundError, match="no revision 'v9'"):
        inspect_model("acme/tiny-llama-instruct@v9", config=hub_config)


def test_revision_is_honoured(hub, hub_config):
    report = inspect_model("acme/tiny-llama-instruct@v1", config=hub_config)
    assert report.commit == hub.repos["acme/tiny-llama-instruct"].refs["v1"]


def test_unreachable_hub_is_reported_as_offline(hub_home):
    closed = HubConfig(endpoint="http://127.0.0.1:9", cache_dir=hub_home / "hub", retry_delay_s=0.01)
    # (search is left out: huggingface_hub's listing retries a refused connection for 23 s)
    with pytest.raises(HubOfflineError, match="cannot reach the Hub"):
        inspect_model("acme/tiny-llama-instruct", config=closed)


def test_offline_mode_is_named(hub_config, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE"):
        inspect_model("acme/tiny-llama-instruct", config=hub_config)
    with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE"):
        search_models("llama", config=hub_config)


def test_check_token_asks_whoami_and_never_shows_the_token(hub, hub_config):
    hub.add_token("hf_valid_token", "tester")
    user = check_token("hf_valid_token", hub_config)
    assert (user.name, user.token_name, user.role) == ("tester", "test token", "read")
    with pytest.raises(TokenError) as caught:
        check_token("hf_wrong_token", hub_config)
    assert "hf_wrong_token" not in f"{caught.value} {caught.value.hint}"
    with pytest.raises(TokenError, match="no Hugging Face access token"):
        check_token(None, hub_config)


def test_saved_token_goes_through_huggingface_hub_login(hub, hub_home):
    # login() validates against huggingface_hub's import-time endpoint: run it where HF_ENDPOINT
    # is set before import, as it is for a user with a mirror.
    hub.add_token("hf_saved_token", "tester")
    script = (
        "import sys\n"
        "from app.core.hub import save_token, has_token, check_token\n"
        "user = save_token(sys.stdin.readline())\n"
        "print(user.name, has_token(), check_token().name)\n"
    )
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(hub_home), "PYTHONPATH": str(Path.cwd())}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run(
        [sys.executable, "-c", script],
        input="hf_saved_token\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["tester", "True", "tester"]
    assert "hf_saved_token" not in done.stdout + done.stderr
    assert (hub_home / "token").read_text().strip() == "hf_saved_token"


LLAMA_7B = {
    "model_type": "llama",
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}


def test_fit_estimates_memory_of_gates_and_chat():
    big = MachineMemory(ram_total=512 * 10**9, ram_available=400 * 10**9)
    estimate = estimate_fit(LLAMA_7B, dense_parameters=7_241_732_096, n_experts=4, machine=big)
    # Mixtral 8x7B has 46.7 B parameters; four Mistral-sized experts come to about 24 B.
    assert 24.0e9 < estimate.moe_parameters < 24.3e9
    assert estimate.gate_bytes < estimate.chat_bytes
    assert estimate.problems == ()

    laptop = MachineMemory(ram_total=16 * 10**9, ram_available=10 * 10**9)
    tight = estimate_fit(LLAMA_7B, dense_parameters=7_241_732_096, n_experts=4, machine=laptop)
    assert {p.field for p in tight.problems} == {"gates", "chat"}
    assert all(p.is_error for p in tight.problems if p.field == "chat")

    gpu = MachineMemory(ram_total=16 * 10**9, ram_available=10 * 10**9, vram_free=80 * 10**9, vram_total=80 * 10**9)
    assert estimate_fit(LLAMA_7B, dense_parameters=7_241_732_096, n_experts=4, machine=gpu).problems == ()
