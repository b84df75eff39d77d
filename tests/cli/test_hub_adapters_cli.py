"""`frankenmoe hub search --adapters` and `hub info` of an adapter, against the local Hub."""

from __future__ import annotations

import pytest

from app.cli.main import run_cli
from tests.hubserver import ADAPTER_BASE

pytest_plugins = ["tests.hubserver"]


@pytest.fixture
def cli_hub(adapter_hub, hub_home, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", adapter_hub.url)
    return adapter_hub


def test_search_for_adapters_lists_them_with_their_base(cli_hub, capsys):
    assert run_cli(["hub", "search", "tiny", "--adapters"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["adapter", "base"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["acme/tiny-adapter-chat", ADAPTER_BASE],
        ["acme/tiny-adapter-plain", ADAPTER_BASE],
        ["acme/tiny-adapter-pickle", ADAPTER_BASE],
    ]


def test_info_of_an_adapter_shows_its_rank_base_and_download(cli_hub, capsys):
    assert run_cli(["hub", "info", "acme/tiny-adapter-plain"]) == 0
    out = capsys.readouterr().out
    assert "LoRA adapter  r=8, alpha=16, on " in out
    assert f"base model    {ADAPTER_BASE}" in out
    assert "family        llama (LlamaForCausalLM)" in out
    assert f"for its base {ADAPTER_BASE} (not in the cache)" in out
