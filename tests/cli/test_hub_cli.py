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


def test_offline_search_prints_one_error_and_no_retry_lines(hub_home, closed_endpoint, monkeypatch, capfd):
    monkeypatch.setenv("HF_ENDPOINT", closed_endpoint)
    assert run_cli(["hub", "search", "llama"]) == 1
    err = capfd.readouterr().err
    assert err.splitlines() == [
        f"error: cannot reach the Hub at {closed_endpoint} (127.0.0.1 port {closed_endpoint.rsplit(':', 1)[1]} "
        "refused the connection)",
        "fix: check the internet connection and any proxy (or HF_ENDPOINT, for a mirror); "
        "models already in the Hugging Face cache still work offline",
    ]


def test_offline_fetch_fails_at_once_without_retrying(hub_home, closed_endpoint, monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("HF_ENDPOINT", closed_endpoint)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base_model: acme/tiny-llama-instruct\ngate_mode: random\nexperts:\n  - source_model: acme/a\n")
    assert run_cli(["hub", "fetch", str(recipe)]) == 1
    captured = capfd.readouterr()
    assert "error: cannot reach the Hub" in captured.err
    assert "retrying" not in (captured.out + captured.err).lower()


def test_merge_of_cached_hub_models_works_offline(cli_hub, hub_home, closed_endpoint, monkeypatch, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "base_model: acme/tiny-llama-instruct\ngate_mode: random\nexperts:\n"
        "  - source_model: acme/tiny-llama-chat\n  - source_model: acme/tiny-llama-instruct\n"
    )
    assert run_cli(["hub", "fetch", str(recipe)]) == 0
    monkeypatch.setenv("HF_ENDPOINT", closed_endpoint)
    out = tmp_path / "moe"
    assert run_cli(["merge", str(recipe), str(out), "--quiet"]) == 0
    assert f"merged 2 experts into {out}" in capsys.readouterr().out


def hub_login(hub, hub_home, token: str):
    """`frankenmoe hub login` in a process of its own (huggingface_hub's login reads the endpoint at import)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, "-m", "app", "hub", "login"],
        input=token + "\n",
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(repo), "HF_ENDPOINT": hub.url, "HF_HOME": str(hub_home)},
    )


def test_login_checks_the_token_saves_it_and_never_prints_it(hub, hub_home):
    hub.add_token("hf_alice_secret", "alice")
    refused = hub_login(hub, hub_home, "hf_wrong_secret")
    assert refused.returncode == 1
    assert "the Hub refused this access token" in refused.stderr and "fix: " in refused.stderr
    assert not (hub_home / "token").exists()

    accepted = hub_login(hub, hub_home, "hf_alice_secret")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "logged in as alice (token 'test token', read)" in accepted.stdout
    assert (hub_home / "token").read_text().strip() == "hf_alice_secret"
    for result in (refused, accepted):
        assert "secret" not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr
