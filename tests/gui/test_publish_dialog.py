"""The Publish dialog against the local Hub server and its write API: who is logged in, the check
with the card preview, the upload with its byte progress and the repo's link, a read-only token's
refusal, and a window that stays usable while the upload waits on the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from huggingface_hub import constants
from PySide6.QtCore import QCoreApplication, Qt

from app.core.export import export_gguf
from app.core.merge.modelcard import ModelCardFields
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.progress import Progress, run_job
from app.core.recipe import parse_recipe
from app.gui.context import AppContext
from app.gui.main_window import Step
from app.gui.settings import AppSettings
from app.gui.ship.common import link_html
from app.gui.ship.publish_dialog import PublishDialog, ggufs_beside, suggested_repo_id
from tests.core.test_chat_capture import MERGED_RECIPE
from tests.publishing import READ_TOKEN, WRITE_TOKEN

if TYPE_CHECKING:
    from app.core.hub import HubConfig
    from tests.hubserver import HubServer

pytest_plugins = ["tests.hubserver"]

TIMEOUT_MS = 60_000
SHOTS = Path("/work/wt/shots")


@pytest.fixture(scope="module")
def merged(llama_donors: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merged tiny MoE with a licence, and its f16 GGUF beside it under the export dialog's name."""
    recipe = parse_recipe(MERGED_RECIPE.format(**llama_donors))
    out = tmp_path_factory.mktemp("publish-gui") / "tiny-moe"
    run_job(merge_moe(recipe, MergeOptions(out_dir=out, card=ModelCardFields(license="apache-2.0"))))
    run_job(export_gguf(out, out.parent / "tiny-moe-f16.gguf", "f16"))
    return out


@pytest.fixture
def gui_hub(hub: HubServer, publish_config: HubConfig) -> HubServer:
    """The local Hub for every Hub call of the app, with alice's write token and bob's read token."""
    return hub


@pytest.fixture
def logged_in(gui_hub: HubServer) -> HubServer:
    """alice's write token in huggingface_hub's token store, as its login leaves it."""
    token_file = Path(constants.HF_TOKEN_PATH)
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(WRITE_TOKEN)
    return gui_hub


@pytest.fixture
def context(settings: AppSettings) -> AppContext:
    return AppContext(settings)


def open_dialog(qtbot, merged: Path, context: AppContext) -> PublishDialog:
    dialog = PublishDialog(merged, context)
    dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, False)
    qtbot.addWidget(dialog)
    dialog.resize(760, 820)
    dialog.show()
    return dialog


@pytest.fixture
def log(context: AppContext) -> list[str]:
    lines: list[str] = []
    context.logged.connect(lines.append)
    return lines


def check(qtbot, dialog: PublishDialog) -> None:
    assert dialog.check_button.isEnabled()
    dialog.check_button.click()
    assert dialog.check_job is not None
    with qtbot.waitSignal(dialog.check_job.finished, timeout=TIMEOUT_MS):
        pass
    assert dialog.plan is not None, dialog.messages.text()


def save_shot(dialog: PublishDialog, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    QCoreApplication.processEvents()  # the layout catches up with the latest texts first
    dialog.grab().save(str(SHOTS / f"ship-gui-{name}.png"))


def test_check_then_publish_to_the_hub(qtbot, logged_in: HubServer, merged: Path, context: AppContext, log):
    dialog = open_dialog(qtbot, merged, context)
    qtbot.waitUntil(lambda: dialog.repo_id.text() == "alice/tiny-moe", timeout=TIMEOUT_MS)
    assert "alice" in dialog.account.text() and "write" in dialog.account.text()
    gguf = merged.parent / "tiny-moe-f16.gguf"
    assert [dialog.gguf_list.item(row).text() for row in range(dialog.gguf_list.count())] == [str(gguf)]
    assert not dialog.publish_button.isEnabled()
    # The donors' cards name no licence: the user gives it (the merge's card's is shown, not taken).
    assert dialog.license.text() == "" and "apache-2.0" in dialog.license.placeholderText()
    dialog.license.setText("apache-2.0")
    dialog.private.setChecked(True)

    check(qtbot, dialog)
    plan = dialog.plan
    assert plan is not None and not any(p.is_error for p in plan.problems), dialog.messages.text()
    assert dialog.publish_button.isEnabled()
    assert "✓" in dialog.summary.text() and "new private repo alice/tiny-moe" in dialog.summary.text()
    card = dialog.card_preview.toPlainText()
    assert card == plan.card_text and "frankenmoe" in card
    assert "tiny-moe-f16.gguf" in plan.files and "config.json" in plan.files
    assert "alice/tiny-moe" not in logged_in.repos  # a check uploads nothing
    save_shot(dialog, "publish-checked")

    dialog.publish_button.click()
    job = dialog.publish_job
    assert job is not None
    records: list[Progress] = []
    job.progress.connect(records.append)
    with qtbot.waitSignal(job.finished, timeout=TIMEOUT_MS):
        pass
    assert dialog.result is not None, dialog.stage.text()
    url = dialog.result.url
    assert url.rstrip("/").endswith("alice/tiny-moe")
    assert url in dialog.link.text() and dialog.link.openExternalLinks()
    assert any(record.bytes_total for record in records)
    assert dialog.progress.value() == 1000
    repo = logged_in.repos["alice/tiny-moe"]
    assert repo.private
    files = repo.commits[repo.refs["main"]]
    assert {"README.md", "config.json", "tiny-moe-f16.gguf"} <= set(files)
    assert files["tiny-moe-f16.gguf"] == gguf.read_bytes()
    assert all(WRITE_TOKEN not in line for line in log)
    save_shot(dialog, "publish-done")
    dialog.close()


def test_a_read_only_token_is_refused_and_nothing_is_uploaded(
    qtbot, gui_hub: HubServer, merged: Path, context: AppContext, log
):
    dialog = open_dialog(qtbot, merged, context)
    qtbot.waitUntil(lambda: "Not logged in" in dialog.account.text(), timeout=TIMEOUT_MS)
    assert dialog.repo_id.text() == ""
    dialog.token.setText(READ_TOKEN)
    dialog.token.editingFinished.emit()
    qtbot.waitUntil(lambda: dialog.repo_id.text() == "bob/tiny-moe", timeout=TIMEOUT_MS)
    assert "role read" in dialog.account.text()

    check(qtbot, dialog)
    shown = dialog.messages.text()
    assert "✗" in shown and "read" in shown, shown
    assert "Token field" in shown and "--token" not in shown  # the fix in the dialog's own terms
    assert "✗" in dialog.summary.text()
    assert not dialog.publish_button.isEnabled()
    dialog.start_publish()  # as a click would, were the button not off
    assert dialog.publish_job is None
    save_shot(dialog, "publish-read-token")
    assert "bob/tiny-moe" not in gui_hub.repos
    assert not [request for request in gui_hub.requests if request[0] in ("POST", "PUT")]
    # The pasted token was used for this publish only: not saved, not logged.
    assert not Path(constants.HF_TOKEN_PATH).exists()
    assert all(READ_TOKEN not in line for line in log)
    dialog.close()
    assert dialog.token.text() == ""


def test_the_window_stays_usable_while_the_upload_waits(qtbot, window, logged_in: HubServer, merged: Path):
    page = window.merge_page
    page.merged_folder = merged
    page.publish_button.click()
    dialog = page.findChild(PublishDialog)
    assert dialog is not None
    qtbot.waitUntil(lambda: dialog.repo_id.text() == "alice/tiny-moe", timeout=TIMEOUT_MS)
    dialog.repo_id.setText("alice/held-moe")
    dialog.license.setText("apache-2.0")
    check(qtbot, dialog)
    assert dialog.publish_button.isEnabled(), dialog.messages.text()

    release = logged_in.hold("/api/models/alice/held-moe/commit")
    dialog.publish_button.click()
    job = dialog.publish_job
    assert job is not None
    qtbot.waitUntil(logged_in.request_held.is_set, timeout=TIMEOUT_MS)
    # The upload is waiting on the Hub; the window answers meanwhile.
    assert job.is_running
    save_shot(dialog, "publish-uploading")
    window.show_step(Step.CHAT)
    assert window.pages.currentWidget() is window.chat_page
    assert not dialog.publish_button.isEnabled() and not dialog.repo_id.isEnabled()
    dialog.cancel_button.click()
    assert dialog.stage.text().startswith("Cancelling…")
    release.set()
    with qtbot.waitSignal(job.finished, timeout=TIMEOUT_MS):
        pass
    assert dialog.result is None
    # Released unanswered, the commit fails (or, were the cancel seen first, stops): either is said.
    assert dialog.stage.text().startswith(("✗ Publishing failed", "Publishing cancelled")), dialog.stage.text()
    repo = logged_in.repos.get("alice/held-moe")
    assert repo is None or not any("config.json" in files for files in repo.commits.values())
    assert dialog.publish_button.isEnabled() and dialog.repo_id.isEnabled()
    dialog.close()


def test_hub_text_is_escaped_before_it_becomes_a_link() -> None:
    hostile = 'https://hub.example/a/b"><img src=x onerror=alert(1)>'
    shown = link_html(hostile, "<b>On the Hub</b>: ")
    assert "<img" not in shown and "<b>" not in shown
    assert "&lt;img" in shown and "&quot;&gt;" in shown


def test_the_suggested_repo_name_is_one_the_hub_takes() -> None:
    assert suggested_repo_id("alice", Path("/models/My MoE (v2)")) == "alice/My-MoE-v2"
    assert suggested_repo_id("alice", Path("/models/tiny_moe-1.0")) == "alice/tiny_moe-1.0"


def test_an_unknown_licence_is_asked_for_in_the_licence_field(
    qtbot, logged_in: HubServer, llama_donors: dict[str, Path], context: AppContext, tmp_path: Path
):
    recipe = parse_recipe(MERGED_RECIPE.format(**llama_donors))
    folder = tmp_path / "no-licence-moe"
    run_job(merge_moe(recipe, MergeOptions(out_dir=folder)))
    dialog = open_dialog(qtbot, folder, context)
    assert dialog.license.text() == ""  # never a guess: the donors' cards name no licence
    qtbot.waitUntil(lambda: dialog.repo_id.text() == "alice/no-licence-moe", timeout=TIMEOUT_MS)
    check(qtbot, dialog)
    assert "Licence field" in dialog.messages.text() and not dialog.publish_button.isEnabled()
    dialog.license.setText("apache-2.0")
    assert not dialog.publish_button.isEnabled()  # changed since the check
    check(qtbot, dialog)
    assert "Licence field" not in dialog.messages.text()
    assert dialog.publish_button.isEnabled(), dialog.messages.text()
    assert "license: apache-2.0" in dialog.card_preview.toPlainText()


def test_the_ggufs_offered_are_those_exported_from_this_folder(tmp_path: Path) -> None:
    model = tmp_path / "moe [v2]"
    model.mkdir()
    for name in ("moe [v2]-q8_0.gguf", "moe [v2]-f16.gguf", "other-f16.gguf", "moe v-f16.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    assert [p.name for p in ggufs_beside(model)] == ["moe [v2]-f16.gguf", "moe [v2]-q8_0.gguf"]
