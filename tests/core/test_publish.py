"""Publishing a real tiny merge to the local Hub with the unmodified huggingface_hub client: the checks
before the upload, the card, the upload itself, a resumed upload after a fault, and the token kept secret."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, snapshot_download

from app.core.hub import HubOfflineError
from app.core.merge.pipeline import RECIPE_FILENAME, MergeOptions, merge_moe
from app.core.problems import ProblemsError
from app.core.progress import Cancelled, Progress, run_job
from app.core.publish import PublishError, PublishRequest, plan_publish, publish
from app.core.recipe import parse_recipe
from app.startup import start_logging
from tests.publishing import READ_TOKEN, WRITE_TOKEN, hub_merge, local_donor

pytest_plugins = ["tests.hubserver"]


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def collect(job) -> tuple[list[Progress], object]:
    records: list[Progress] = []
    result = run_job(job, records.append)
    return records, result


def lfs_oid(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def app_log() -> Iterator[io.StringIO]:
    """What the app's log file handler (installed at a desktop start) writes during the test."""
    log = io.StringIO()
    start_logging(log)
    yield log
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "frankenmoe_log", False)]:
        root.removeHandler(handler)


def test_publish_uploads_the_merge_and_a_download_gives_back_the_same_files(
    publish_config, hub, llama_donors, tmp_path, caplog, app_log
):
    model = hub_merge(publish_config, llama_donors, tmp_path)
    caplog.set_level(logging.DEBUG)
    plan = plan_publish(PublishRequest(model, "tiny-moe", token=WRITE_TOKEN), config=publish_config)
    assert not plan.errors, plan.problems
    assert plan.user == "alice" and plan.request.repo_id == "alice/tiny-moe" and not plan.repo_exists
    assert any("acme/gated-llama is gated" in w for w in plan.warnings), plan.warnings
    assert any("llama3" in w and "apache-2.0" in w for w in plan.warnings), plan.warnings

    card = ModelCard(plan.card_text)  # huggingface_hub's own parser and metadata types
    assert card.data.base_model == ["acme/tiny-llama-instruct", "acme/tiny-llama-chat", "acme/gated-llama"]
    assert card.data.base_model_relation == "merge"
    assert card.data.license == "llama3"  # the most restrictive of apache-2.0 and llama3
    assert {"moe", "frankenmoe", "mixtral"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "`my-local-expert`" in card.text and str(tmp_path) not in plan.card_text
    assert 'from_pretrained("alice/tiny-moe"' in card.text and "gate mode `random`" in card.text
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    assert len(shards) > 2 and {"model.safetensors.index.json", *shards} <= set(plan.files)

    records, result = collect(publish(plan, config=publish_config))
    assert result.url == f"{hub.url}/alice/tiny-moe" and result.commit == hub.repos["alice/tiny-moe"].refs["main"]
    byte_counts = [r.bytes_done for r in records]
    assert byte_counts == sorted(byte_counts) and byte_counts[-1] == plan.total_bytes
    assert all(r.bytes_total == plan.total_bytes for r in records)

    downloaded = Path(
        snapshot_download("alice/tiny-moe", endpoint=hub.url, token=WRITE_TOKEN, cache_dir=tmp_path / "dl")
    )
    assert sorted(p.name for p in downloaded.iterdir()) == sorted([*plan.files, ".gitattributes"])
    for name in plan.files:
        if name not in ("README.md", RECIPE_FILENAME):
            assert (downloaded / name).read_bytes() == (model / name).read_bytes(), name
    assert (downloaded / "README.md").read_text(encoding="utf-8") == plan.card_text
    published_recipe = (downloaded / RECIPE_FILENAME).read_text(encoding="utf-8")
    assert "my-local-expert" in published_recipe and str(tmp_path) not in published_recipe
    # The folder's own recipe keeps its paths: the merge can still be run again from it here.
    assert str(tmp_path) in (model / RECIPE_FILENAME).read_text(encoding="utf-8")

    # The token is in no uploaded file and in no log line, at any level.
    for file in downloaded.iterdir():
        assert WRITE_TOKEN.encode() not in file.read_bytes(), file.name
    assert caplog.records and WRITE_TOKEN not in caplog.text
    assert "HTTP Request: POST" in app_log.getvalue() and WRITE_TOKEN not in app_log.getvalue()


def test_a_read_only_token_is_refused_by_name_and_nothing_is_uploaded(publish_config, hub, llama_donors, tmp_path):
    model = hub_merge(publish_config, llama_donors, tmp_path)
    requests_before = len(hub.requests)
    plan = plan_publish(PublishRequest(model, "bob/tiny-moe", token=READ_TOKEN), config=publish_config)
    [error] = plan.errors
    assert error.field == "token" and "its role is read" in error.message and "write role" in error.hint
    with pytest.raises(ProblemsError):
        run_job(publish(plan, config=publish_config))
    assert "bob/tiny-moe" not in hub.repos
    assert not [r for r in hub.requests[requests_before:] if r[0] in ("POST", "PUT")]


def test_a_token_for_another_namespace_or_without_write_scope_is_refused(publish_config, hub, llama_donors, tmp_path):
    model = hub_merge(publish_config, llama_donors, tmp_path)
    plan = plan_publish(PublishRequest(model, "someone-else/tiny-moe", token=WRITE_TOKEN), config=publish_config)
    assert [p.field for p in plan.errors] == ["token"] and "not a member of someone-else" in plan.errors[0].message
    scoped = [{"entity": {"type": "user", "name": "carol"}, "permissions": ["repo.content.read"]}]
    hub.add_token("hf_carol_fine", "carol", "fineGrained", scoped=scoped)
    plan = plan_publish(PublishRequest(model, "carol/tiny-moe", token="hf_carol_fine"), config=publish_config)
    assert [p.field for p in plan.errors] == ["token"] and "without repo.write" in plan.errors[0].message
    # An organisation the user writes to is fine.
    plan = plan_publish(PublishRequest(model, "acme-org/tiny-moe", token=WRITE_TOKEN), config=publish_config)
    assert not plan.errors


def test_an_invalid_repo_id_is_refused_with_a_valid_one_to_use(publish_config, hub, llama_donors, tmp_path):
    model = hub_merge(publish_config, llama_donors, tmp_path)
    plan = plan_publish(PublishRequest(model, "alice/tiny--moe!", token=WRITE_TOKEN), config=publish_config)
    [error] = plan.errors
    assert error.field == "repo_id" and "alice/tiny--moe!" in error.message and "alice/tiny-moe" in error.hint
    plan = plan_publish(PublishRequest(model, "a/b/c", token=WRITE_TOKEN), config=publish_config)
    assert [p.field for p in plan.errors] == ["repo_id"]


def test_an_unfinished_or_altered_merge_folder_is_refused(publish_config, hub, llama_donors, tmp_path):
    model = hub_merge(publish_config, llama_donors, tmp_path)
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    shard, last = shards[1], shards[-1]

    def problems_of(folder: Path) -> list[str]:
        plan = plan_publish(PublishRequest(folder, "alice/tiny-moe", token=WRITE_TOKEN), config=publish_config)
        return [p.message for p in plan.errors]

    truncated = tmp_path / "truncated"
    shutil.copytree(model, truncated)
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[:-100])
    assert any(shard in m and "is not a readable safetensors file" in m for m in problems_of(truncated))

    grown = tmp_path / "grown"
    shutil.copytree(model, grown)
    with (grown / shard).open("ab") as handle:
        handle.write(b"\0" * 64)
    assert any(shard in m and "its header says" in m for m in problems_of(grown))

    missing = tmp_path / "missing"
    shutil.copytree(model, missing)
    (missing / shard).unlink()
    assert any("lacks 1 shard" in m for m in problems_of(missing))

    # Same size, other bytes: only the hash the merge recorded in the index tells.
    altered = tmp_path / "altered"
    shutil.copytree(model, altered)
    data = bytearray((altered / last).read_bytes())
    data[-4:] = bytes(4 - i for i in range(4)) if data[-4:] != bytes(4 - i for i in range(4)) else b"\0\0\0\0"
    (altered / last).write_bytes(bytes(data))
    assert any(last in m and "hash differs" in m for m in problems_of(altered))

    work = tmp_path / ".frankenmoe-partial-tiny-moe-123"
    shutil.copytree(model, work)
    assert any("has not finished" in m for m in problems_of(work))
    assert "alice/tiny-moe" not in hub.repos


def test_a_file_holding_a_local_path_or_the_token_is_refused(publish_config, hub, llama_donors, tmp_path):
    model = hub_merge(publish_config, llama_donors, tmp_path)
    (model / "notes.txt").write_text(f"merged in {model.parent}/work\n")
    (model / "run.sh").write_text(f"HF_TOKEN={WRITE_TOKEN} python -m app\n")
    plan = plan_publish(PublishRequest(model, "alice/tiny-moe", token=WRITE_TOKEN), config=publish_config)
    messages = [p.message for p in plan.errors]
    assert any(m.startswith("notes.txt holds a path of this machine") for m in messages), messages
    assert "run.sh holds your Hugging Face access token" in messages
    assert all(WRITE_TOKEN not in p.message + p.hint for p in plan.problems)


def test_an_unknown_donor_licence_is_not_guessed(publish_config, hub, llama_donors, tmp_path):
    base = local_donor(llama_donors["base"], tmp_path / "donors" / "base", "apache-2.0")
    expert = local_donor(llama_donors["expert0"], tmp_path / "donors" / "no-licence-expert", None)
    recipe = parse_recipe(
        f"base_model: {base}\ngate_mode: random\nexperts:\n  - source_model: {base}\n  - source_model: {expert}\n"
    )
    model = tmp_path / "moe"
    run_job(merge_moe(recipe, MergeOptions(out_dir=model, device="cpu")))
    (model / "README.md").unlink()  # a card the user deleted: the repo still gets one
    plan = plan_publish(PublishRequest(model, "alice/tiny-moe", token=WRITE_TOKEN), config=publish_config)
    [error] = plan.errors
    assert error.field == "license" and "no-licence-expert" in error.message and "--license" in error.hint
    plan = plan_publish(
        PublishRequest(model, "alice/tiny-moe", token=WRITE_TOKEN, license="apache-2.0"), config=publish_config
    )
    assert not plan.errors and front_matter(plan.card_text)["license"] == "apache-2.0"
    assert "base_model" not in front_matter(plan.card_text)  # local donors only: no Hub id to name
    assert "README.md" in plan.files


def test_an_upload_that_fails_midway_resumes_with_only_the_missing_files(publish_config, hub, llama_donors, tmp_path):
    model = hub_merge(publish_config, llama_donors, tmp_path)
    shards = sorted(model.glob("*.safetensors"))
    hub.fail_upload(lfs_oid(shards[2]))
    request = PublishRequest(model, "alice/tiny-moe", token=WRITE_TOKEN)
    with pytest.raises(PublishError) as failure:
        run_job(publish(plan_publish(request, config=publish_config), config=publish_config))
    assert f"uploading {shards[2].name}" in failure.value.message and "400 RequestTimeout" in failure.value.message
    assert "publish again" in failure.value.hint
    repo = hub.repos["alice/tiny-moe"]
    assert set(repo.commits[repo.refs["main"]]) == {".gitattributes"}  # nothing half-published
    first = hub.lfs_uploads()

    run_job(publish(plan_publish(request, config=publish_config), config=publish_config))
    second = hub.lfs_uploads()[len(first) :]
    all_oids = {lfs_oid(s) for s in shards}
    assert set(first) | set(second) == all_oids and not set(first) & set(second)
    assert lfs_oid(shards[2]) in second and lfs_oid(shards[0]) in first
    committed = repo.commits[repo.refs["main"]]
    assert all(committed[s.name] == s.read_bytes() for s in shards)


def test_a_cancelled_publish_stops_between_files_and_a_retry_finishes(publish_config, hub, llama_donors, tmp_path):
    model = hub_merge(publish_config, llama_donors, tmp_path)
    cancel = threading.Event()
    plan = plan_publish(PublishRequest(model, "alice/tiny-moe", token=WRITE_TOKEN), config=publish_config)
    job = publish(plan, cancel=cancel, config=publish_config)
    with pytest.raises(Cancelled):
        for record in job:
            if record.done == 2:
                cancel.set()
    repo = hub.repos["alice/tiny-moe"]
    assert set(repo.commits[repo.refs["main"]]) == {".gitattributes"}
    result = run_job(publish(plan_publish(plan.request, config=publish_config), config=publish_config))
    assert set(repo.commits[result.commit]) == {*plan.files, ".gitattributes"}


def test_publish_to_a_private_repo_on_a_branch_with_a_gguf(publish_config, hub, llama_donors, tmp_path):
    model = hub_merge(publish_config, llama_donors, tmp_path)
    gguf = tmp_path / "tiny-moe-q8_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    request = PublishRequest(
        model,
        "acme-org/tiny-moe",
        private=True,
        revision="dev",
        include_gguf=(gguf,),
        message="First version",
        token=WRITE_TOKEN,
    )
    plan = plan_publish(request, config=publish_config)
    assert not plan.errors and "tiny-moe-q8_0.gguf" in plan.files
    assert "llama-cli -m tiny-moe-q8_0.gguf" in plan.card_text
    result = run_job(publish(plan, config=publish_config))
    assert result.url == f"{hub.url}/acme-org/tiny-moe/tree/dev"
    repo = hub.repos["acme-org/tiny-moe"]
    assert repo.private and set(repo.commits[repo.refs["main"]]) == {".gitattributes"}
    assert repo.commits[repo.refs["dev"]]["tiny-moe-q8_0.gguf"] == gguf.read_bytes()
    downloaded = Path(
        snapshot_download(
            "acme-org/tiny-moe", revision="dev", endpoint=hub.url, token=WRITE_TOKEN, cache_dir=tmp_path / "dl"
        )
    )
    assert (downloaded / "tiny-moe-q8_0.gguf").read_bytes() == gguf.read_bytes()
    # Published again unchanged: the Hub has every file, nothing is sent again.
    uploads = len(hub.lfs_uploads())
    run_job(publish(plan_publish(request, config=publish_config), config=publish_config))
    assert len(hub.lfs_uploads()) == uploads


def test_without_a_token_or_a_model_folder_each_is_named(publish_config, hub, tmp_path):
    plan = plan_publish(PublishRequest(tmp_path / "nowhere", "alice/tiny-moe"), config=publish_config)
    assert [(p.field, p.message) for p in plan.errors] == [
        ("model", f"the model folder {tmp_path / 'nowhere'} does not exist"),
        ("token", "no Hugging Face access token is set"),
    ]
    assert plan.files == () and plan.total_bytes == 0
    with pytest.raises(ProblemsError):
        run_job(publish(plan, config=publish_config))


def test_a_hub_that_does_not_answer_is_said_at_once(publish_config, closed_endpoint, tmp_path):
    config = replace(publish_config, endpoint=closed_endpoint)
    with pytest.raises(HubOfflineError) as failure:
        plan_publish(PublishRequest(tmp_path, "alice/tiny-moe", token=WRITE_TOKEN), config=config)
    assert closed_endpoint in failure.value.message


def test_a_connection_lost_once_mid_upload_is_retried_and_the_publish_completes(
    publish_config, hub, llama_donors, tmp_path
):
    model = hub_merge(publish_config, llama_donors, tmp_path)
    shard = sorted(model.glob("*.safetensors"))[1]
    hub.drop_upload(lfs_oid(shard))
    plan = plan_publish(PublishRequest(model, "alice/tiny-moe", token=WRITE_TOKEN), config=publish_config)
    result = run_job(publish(plan, config=publish_config))
    puts = [p for m, p, _ in hub.requests if m == "PUT" and p.endswith(lfs_oid(shard))]
    assert len(puts) == 2  # the lost one and huggingface_hub's own retry
    assert hub.repos["alice/tiny-moe"].commits[result.commit][shard.name] == shard.read_bytes()
