"""`frankenmoe hub ...` against the local Hub; HF_ENDPOINT is read when each command runs."""

from __future__ import annotations

import re

import pytest

from app.cli.main import run_cli

pytest_plugins = ["tests.hubserver"]


@pytest.fixture
def cli_hub(hub, hub_home, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    return hub


def test_search_prints_a_table(cli_hub, capsys):
    assert run_cli(["hub", "search", "tiny", "llama", "--sort", "likes", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].startswith("acme/tiny-llama-chat") and "llama3" in lines[1] and "F32" in lines[1]
    assert lines[2].startswith("acme/tiny-llama-instruct")
    assert "more results" in out


def test_info_shows_architecture_and_sizes(cli_hub, capsys):
    assert run_cli(["hub", "info", "acme/tiny-llama-instruct"]) == 0
    out = capsys.readouterr().out
    assert "family        llama (LlamaForCausalLM)" in out
    assert "hidden size   32, intermediate 64" in out
    assert "to fetch" in out


def test_info_checks_against_a_recipe(cli_hub, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "base_model: acme/tiny-llama-instruct\ngate_mode: random\nexperts:\n"
        "  - source_model: acme/tiny-llama-chat\n  - source_model: acme/tiny-llama-wide\n"
    )
    assert run_cli(["hub", "info", "acme/tiny-llama-wide", "--recipe", str(recipe)]) == 1
    assert "error:" in capsys.readouterr().out


def test_download_then_fetch_a_recipe(cli_hub, hub_home, tmp_path, capsys):
    assert run_cli(["hub", "download", "acme/tiny-llama-instruct@v1"]) == 0
    captured = capsys.readouterr()
    folder = captured.out.strip().splitlines()[-1]
    # Sizes as every size the CLI prints (decimal, with a space), not tqdm's own "1.21G".
    assert re.search(r"\d+\.\d [kM]B / \d+\.\d [kM]B", captured.err), captured.err
    assert folder.startswith(str(hub_home / "hub" / "models--acme--tiny-llama-instruct" / "snapshots"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "base_model: acme/tiny-llama-instruct@v1\ngate_mode: random\nexperts:\n"
        "  - source_model: acme/tiny-llama-instruct@v1\n  - source_model: acme/tiny-llama-chat\n"
    )
    assert run_cli(["hub", "fetch", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert f"acme/tiny-llama-instruct@v1: {folder}" in out
    assert "acme/tiny-llama-chat: " in out


def test_gated_download_explains_what_to_do(cli_hub, capsys):
    assert run_cli(["hub", "download", "acme/gated-llama"]) == 1
    err = capsys.readouterr().err
    assert "error: acme/gated-llama is gated" in err
    assert f"{cli_hub.url}/acme/gated-llama" in err


def test_merge_downloads_missing_hub_models_first(cli_hub, hub_home, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "base_model: acme/tiny-llama-instruct\ngate_mode: hidden\nexperts:\n"
        "  - source_model: acme/tiny-llama-chat\n    positive_prompts: [chat with me]\n"
        "  - source_model: acme/tiny-llama-sharded\n    positive_prompts: [what is 2 plus 2]\n"
    )
    out = tmp_path / "moe"
    assert run_cli(["merge", str(recipe), str(out), "--quiet"]) == 0
    assert f"merged 2 experts into {out}" in capsys.readouterr().out
    cached = sorted(p.name for p in (hub_home / "hub").iterdir() if p.name.startswith("models--"))
    assert cached == [f"models--acme--tiny-llama-{name}" for name in ("chat", "instruct", "sharded")]
    assert (out / "config.json").is_file()
    # A second merge finds everything in the cache: the Hub is not asked for files again.
    requests_before = len(cli_hub.requests)
    assert run_cli(["merge", str(recipe), str(tmp_path / "again"), "--quiet"]) == 0
    assert cli_hub.requests[requests_before:] == []
