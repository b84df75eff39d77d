"""The GGUF export dialog on a real merged tiny MoE: the plan's size and disk space, exports read back
with gguf's own reader, cancel, K-quants only with a llama-quantize, and the Merge and Chat hooks."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from gguf.quants import dequantize
from PySide6.QtCore import QCoreApplication, Qt
from safetensors.numpy import load_file

from app.core.export import GgufPlan
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.progress import Progress, run_job
from app.core.recipe import parse_recipe
from app.gui.context import AppContext
from app.gui.main_window import Step
from app.gui.settings import AppSettings
from app.gui.ship.export_dialog import ExportDialog
from app.gui.widgets import format_bytes
from tests.core.test_chat_capture import MERGED_RECIPE

TIMEOUT_MS = 60_000
SHOTS = Path("/work/wt/shots")


@pytest.fixture(scope="module")
def merged(llama_donors: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    recipe = parse_recipe(MERGED_RECIPE.format(**llama_donors))
    out = tmp_path_factory.mktemp("export-gui") / "merged"
    run_job(merge_moe(recipe, MergeOptions(out_dir=out)))
    return out


@pytest.fixture
def no_quantizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH without llama-quantize, whatever this machine has installed."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture
def dialog(qtbot, settings: AppSettings, merged: Path, no_quantizer: None) -> Iterator[ExportDialog]:
    export = ExportDialog(merged, AppContext(settings))
    export.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, False)  # the test still reads it after closing
    qtbot.addWidget(export)
    export.resize(760, 640)
    export.show()
    yield export
    export.close()


def wait_for_plan(qtbot, dialog: ExportDialog) -> None:
    qtbot.waitUntil(lambda: dialog.plan is not None, timeout=TIMEOUT_MS)


def save_shot(dialog: ExportDialog, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    QCoreApplication.processEvents()  # the layout catches up with the latest texts first
    dialog.grab().save(str(SHOTS / f"ship-gui-{name}.png"))


def export(qtbot, dialog: ExportDialog, out_type: str, out: Path) -> tuple[GgufPlan, list[Progress]]:
    dialog.set_type(out_type)
    dialog.set_output(out)
    wait_for_plan(qtbot, dialog)
    plan = dialog.plan
    assert plan is not None and dialog.export_button.isEnabled(), dialog.messages.text()
    dialog.export_button.click()
    assert dialog.export_job is not None
    records: list[Progress] = []
    dialog.export_job.progress.connect(records.append)
    with qtbot.waitSignal(dialog.export_job.finished, timeout=TIMEOUT_MS):
        pass
    assert dialog.result is not None, dialog.stage.text()
    return plan, records


def merged_tensors(folder: Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(shard)
    return tensors


def test_exports_f16_and_q8_0_files_that_gguf_reads_back(qtbot, dialog: ExportDialog, merged: Path, tmp_path: Path):
    embeddings = merged_tensors(merged)["model.embed_tokens.weight"]
    for out_type in ("f16", "q8_0"):
        out = tmp_path / f"tiny-{out_type}.gguf"
        plan, records = export(qtbot, dialog, out_type, out)
        result = dialog.result
        assert result is not None
        assert result.out_path == out and out.is_file() and out.stat().st_size == result.bytes
        assert records and dialog.progress.value() == 1000
        assert str(out) in dialog.result_label.text() and dialog.show_button.isVisible()
        # The estimate shown before writing is not short of the file, nor far over it beyond the
        # megabyte the core allows for the header and vocabulary.
        assert result.bytes <= plan.estimated_bytes <= 1.25 * result.bytes + 2**20

        reader = GGUFReader(out)
        assert len(reader.tensors) == result.tensor_count
        token_embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        if out_type == "f16":
            assert token_embd.tensor_type == GGMLQuantizationType.F16
            np.testing.assert_array_equal(
                np.asarray(token_embd.data).reshape(-1), embeddings.astype(np.float16).reshape(-1)
            )
        else:
            assert token_embd.tensor_type == GGMLQuantizationType.Q8_0
            values = dequantize(np.asarray(token_embd.data), GGMLQuantizationType.Q8_0).reshape(-1)
            scale = np.abs(embeddings).max()
            np.testing.assert_allclose(values, embeddings.reshape(-1), atol=scale / 100)
        experts = [t for t in reader.tensors if t.name.endswith("ffn_gate_exps.weight")]
        assert experts, [t.name for t in reader.tensors]
        wait_for_plan(qtbot, dialog)
        save_shot(dialog, f"export-{out_type}")
    # The written file is now in the way: the dialog says so, and writes over it only when told to.
    wait_for_plan(qtbot, dialog)
    assert not dialog.export_button.isEnabled()
    assert dialog.replace.isVisible() and not dialog.replace.isChecked()


def test_the_size_and_free_space_are_shown_before_writing(qtbot, dialog: ExportDialog, merged: Path):
    assert dialog.out_path.text() == str(merged.parent / "merged-f16.gguf")
    dialog.set_type("q8_0")
    assert dialog.out_path.text() == str(merged.parent / "merged-q8_0.gguf")
    wait_for_plan(qtbot, dialog)
    plan = dialog.plan
    assert plan is not None and plan.estimated_bytes > 0 and plan.free_bytes > 0
    shown = dialog.size_label.text()
    assert format_bytes(plan.estimated_bytes) in shown and format_bytes(plan.free_bytes) in shown
    assert not (merged.parent / "merged-q8_0.gguf").exists()
    for app in ("llama.cpp", "LM Studio", "Ollama"):
        assert app in dialog.apps_note.text()
    save_shot(dialog, "export-plan")


def test_an_existing_file_is_replaced_only_when_ticked(qtbot, dialog: ExportDialog, tmp_path: Path):
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"the user's own file")
    dialog.set_output(mine)
    wait_for_plan(qtbot, dialog)
    assert "already exists" in dialog.messages.text()
    assert dialog.replace.isVisible() and not dialog.replace.isChecked()
    assert not dialog.export_button.isEnabled()
    dialog.start_export()  # as a click would, were the button not off
    assert dialog.export_job is None
    assert mine.read_bytes() == b"the user's own file"
    save_shot(dialog, "export-exists")

    dialog.replace.setChecked(True)
    assert dialog.export_button.isEnabled()
    dialog.export_button.click()
    assert dialog.export_job is not None
    with qtbot.waitSignal(dialog.export_job.finished, timeout=TIMEOUT_MS):
        pass
    assert dialog.result is not None, dialog.stage.text()
    assert len(GGUFReader(mine).tensors) == dialog.result.tensor_count
    # Another file, or the same one seen again, needs the tick again.
    wait_for_plan(qtbot, dialog)
    assert not dialog.replace.isChecked() and not dialog.export_button.isEnabled()


def test_a_folder_that_is_no_model_gets_a_message_and_no_export(
    qtbot, settings: AppSettings, tmp_path: Path, no_quantizer: None
):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("not a model")
    dialog = ExportDialog(folder, AppContext(settings))
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.waitUntil(lambda: dialog.messages.text().startswith("✗"), timeout=TIMEOUT_MS)
    assert not dialog.export_button.isEnabled()
    assert not list(tmp_path.rglob("*.gguf"))


def test_cancel_leaves_no_file(qtbot, dialog: ExportDialog, tmp_path: Path):
    out_folder = tmp_path / "out"
    out_folder.mkdir()
    out = out_folder / "cancelled.gguf"
    dialog.set_output(out)
    wait_for_plan(qtbot, dialog)
    dialog.export_button.click()
    job = dialog.export_job
    assert job is not None
    # Cancelled from the worker thread at the export's first record, so that the tiny export
    # cannot finish before the cancel arrives; the dialog's Cancel then shows "Cancelling…".
    job._worker.progress.connect(lambda _record: job.cancel(), Qt.ConnectionType.DirectConnection)
    with qtbot.waitSignal(job.cancelled, timeout=TIMEOUT_MS):
        dialog.cancel_button.click()
    qtbot.waitUntil(lambda: not job.is_running, timeout=TIMEOUT_MS)
    assert "cancelled" in dialog.stage.text().lower()
    assert list(out_folder.iterdir()) == []
    assert dialog.result is None and not dialog.show_button.isVisible()
    # The dialog is ready for another try.
    wait_for_plan(qtbot, dialog)
    assert dialog.export_button.isEnabled() and dialog.type_box.isEnabled()


def test_k_quants_need_a_llama_quantize(qtbot, dialog: ExportDialog, settings: AppSettings, tmp_path: Path):
    assert not dialog.type_enabled("q4_k_m") and not dialog.type_enabled("q6_k")
    assert dialog.type_enabled("f16") and dialog.type_enabled("q8_0")
    assert "llama-quantize" in dialog.quantizer_status.text()
    save_shot(dialog, "export-no-quantizer")
    # A program of that name chosen in the dialog turns them on, and is remembered in the settings.
    program = tmp_path / "llama.cpp" / "llama-quantize"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    dialog.quantizer_path.setText(str(program))
    dialog.quantizer_path.editingFinished.emit()
    assert dialog.type_enabled("q4_k_m")
    assert settings.llama_quantize == str(program)
    assert AppSettings.load().llama_quantize == str(program)
    # And the setting alone is enough for the next dialog.
    second = ExportDialog(dialog.model_dir, AppContext(settings))
    qtbot.addWidget(second)
    assert second.type_enabled("q5_k_m")


def test_settings_keep_the_llama_quantize_path(qtbot, settings: AppSettings, tmp_path: Path) -> None:
    from app.gui.settings_dialog import SettingsDialog

    program = tmp_path / "bin" / "llama-quantize"
    dialog = SettingsDialog(settings, AppContext(settings))
    qtbot.addWidget(dialog)
    assert dialog.llama_quantize.text() == ""
    dialog.llama_quantize.setText(f"  {program}  ")
    dialog.apply()
    assert AppSettings.load().llama_quantize == str(program)
    qtbot.waitUntil(lambda: dialog.login_button.isEnabled(), timeout=TIMEOUT_MS)
    dialog.close()


def test_the_merge_and_chat_pages_open_the_dialogs_for_their_model(qtbot, window, merged: Path):
    from app.gui.ship.publish_dialog import PublishDialog

    page = window.merge_page
    window.new_recipe()
    window.show_step(Step.MERGE)
    # The page's end-of-merge slot, given what a merge of this folder reports.
    size = sum(path.stat().st_size for path in merged.iterdir())
    page._merged(SimpleNamespace(out_dir=merged, bytes_written=size, seconds=1.0))
    assert page.export_button.isVisible() and page.publish_button.isVisible()
    SHOTS.mkdir(parents=True, exist_ok=True)
    window.grab().save(str(SHOTS / "ship-gui-merge-page.png"))
    qtbot.mouseClick(page.export_button, Qt.MouseButton.LeftButton)
    export_dialog = page.findChild(ExportDialog)
    assert export_dialog is not None and export_dialog.model_dir == merged
    export_dialog.close()
    qtbot.mouseClick(page.publish_button, Qt.MouseButton.LeftButton)
    publish_dialog = page.findChild(PublishDialog)
    assert publish_dialog is not None and publish_dialog.model_dir == merged
    publish_dialog.close()

    chat = window.chat_page
    assert not chat.model_box.export_button.isEnabled()
    window.open_in_chat(merged)
    qtbot.waitUntil(lambda: chat.model_box.export_button.isEnabled(), timeout=TIMEOUT_MS)
    window.grab().save(str(SHOTS / "ship-gui-chat-page.png"))
    qtbot.mouseClick(chat.model_box.export_button, Qt.MouseButton.LeftButton)
    export_dialog = chat.findChild(ExportDialog)
    assert export_dialog is not None and export_dialog.model_dir == merged
    export_dialog.close()


def test_what_llama_cpp_computes_differently_is_said_before_writing(
    qtbot, settings: AppSettings, qwen2_donors: dict[str, Path], tmp_path: Path, no_quantizer: None
):
    from tests.core.test_qwen import merge, recipe_for

    folder = tmp_path / "qwen2-moe"
    shared = [f"- source_model: {qwen2_donors['shared']}"]
    merge(recipe_for(qwen2_donors, "random", shared=shared), folder)
    dialog = ExportDialog(folder, AppContext(settings))
    qtbot.addWidget(dialog)
    dialog.show()
    wait_for_plan(qtbot, dialog)
    plan = dialog.plan
    assert plan is not None and plan.architecture == "qwen2moe" and plan.warnings
    shown = dialog.messages.text()
    assert all(warning[1:60] in shown for warning in plan.warnings), shown
    assert "⚠ norm_topk_prob" in shown  # a setting's name keeps its case
    # A warning informs; it does not stop the export.
    assert dialog.export_button.isEnabled()
    save_shot(dialog, "export-warnings")


def test_a_k_quant_through_a_real_llama_quantize(qtbot, settings: AppSettings, merged: Path, tmp_path: Path):
    """Runs only where llama.cpp was built (LLAMA_QUANTIZE or PATH): a stand-in quantizer would prove nothing."""
    from app.core.export import find_llama_quantize

    quantizer = find_llama_quantize(os.environ.get("LLAMA_QUANTIZE"))
    if quantizer is None:
        pytest.skip("no llama-quantize (set LLAMA_QUANTIZE or put one on PATH)")
    settings.llama_quantize = str(quantizer)
    dialog = ExportDialog(merged, AppContext(settings))
    dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, False)
    qtbot.addWidget(dialog)
    dialog.show()
    assert dialog.type_enabled("q4_k_m")
    out = tmp_path / "tiny-q4_k_m.gguf"
    export(qtbot, dialog, "q4_k_m", out)
    assert dialog.result is not None
    assert GGUFReader(out).fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q4_K_M
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # the intermediate file is gone
    wait_for_plan(qtbot, dialog)
    save_shot(dialog, "export-q4_k_m")
