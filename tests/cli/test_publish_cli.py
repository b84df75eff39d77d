"""`frankenmoe publish` in a process of its own against the local Hub: the repo URL on success, one message
and a non-zero exit for each bad input, a rerun that finishes an interrupted upload, the token never shown."""

from __future__ import annotations

import hashlib

from tests.cli.test_cli import frankenmoe
from tests.publishing import READ_TOKEN, WRITE_TOKEN, hub_merge

pytest_plugins = ["tests.hubserver"]


def test_publish_prints_the_repo_url_and_the_files_are_on_the_hub(publish_config, hub, llama_donors, tmp_path):
    model = hub_merge(publish_config, llama_donors, tmp_path)
    done = frankenmoe("publish", str(model), "alice/tiny-moe", "--token", WRITE_TOKEN, "--message", "First")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{hub.url}/alice/tiny-moe"
    assert "uploading" in done.stderr and "acme/gated-llama is gated" in done.stderr
    committed = hub.repos["alice/tiny-moe"].commits[hub.repos["alice/tiny-moe"].refs["main"]]
    assert committed["config.json"] == (model / "config.json").read_bytes()
    assert WRITE_TOKEN not in done.stdout + done.stderr


def test_bad_inputs_exit_non_zero_with_one_message_each(publish_config, hub, llama_donors, tmp_path):
    model = hub_merge(publish_config, llama_donors, tmp_path)
    read_only = frankenmoe("publish", str(model), "bob/tiny-moe", "--token", READ_TOKEN)
    assert read_only.returncode == 1 and "its role is read" in read_only.stderr
    assert read_only.stdout == "" and "bob/tiny-moe" not in hub.repos

    invalid = frankenmoe("publish", str(model), "alice/tiny moe", "--token", WRITE_TOKEN)
    assert invalid.returncode == 1 and "not a valid Hub repo id" in invalid.stderr
    assert "e.g. alice/tiny-moe" in invalid.stderr

    (model / "config.json").unlink()
    unfinished = frankenmoe("publish", str(model), "alice/tiny-moe", "--token", WRITE_TOKEN)
    assert unfinished.returncode == 1 and "no readable config.json" in unfinished.stderr
    for run in (read_only, invalid, unfinished):
        assert len([line for line in run.stderr.splitlines() if line.startswith("error")]) == 1, run.stderr
        assert READ_TOKEN not in run.stderr and WRITE_TOKEN not in run.stderr


def test_a_rerun_after_a_network_fault_finishes_the_upload(publish_config, hub, llama_donors, tmp_path, monkeypatch):
    model = hub_merge(publish_config, llama_donors, tmp_path)
    shard = sorted(model.glob("*.safetensors"))[1]
    hub.fail_upload(hashlib.sha256(shard.read_bytes()).hexdigest())
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)  # the token as huggingface_hub finds it, no --token
    failed = frankenmoe("publish", str(model), "alice/tiny-moe")
    assert failed.returncode == 1
    assert f"error: uploading {shard.name} to {hub.url} failed" in failed.stderr and "publish again" in failed.stderr
    uploaded_before = len(hub.lfs_uploads())
    rerun = frankenmoe("publish", str(model), "alice/tiny-moe")
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip() == f"{hub.url}/alice/tiny-moe"
    assert len(hub.lfs_uploads()) - uploaded_before == len(list(model.glob("*.safetensors"))) - 1
    assert WRITE_TOKEN not in failed.stderr + rerun.stderr
