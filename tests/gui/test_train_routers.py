"""The Train routers page with a real merged tiny MoE and the core trainer: training end to end with the
live charts and the before/after view, cancel, bad input, and the page's place after Merge."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import QCoreApplication, Qt
from PySide6.QtWidgets import QMessageBox

from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.progress import run_job
from app.core.recipe import parse_recipe
from app.core.training.trainer import TrainingProgress
from app.gui.context import AppContext
from app.gui.main_window import Step
from app.gui.pages.train import TrainPage
from app.gui.settings import AppSettings
from app.gui.training.charts import ExpertLoadChart, LossPlot
from app.gui.training.form import TrainingForm
from app.gui.training.jobs import VALIDATION_ROW
from tests.gui.conftest import screenshot
from tests.models import make_tiny_model

TIMEOUT_MS = 180_000
SHOTS = Path("/work/wt/shots")

RECIPE = """
base_model: {base}
gate_mode: hidden
dtype: float32
experts_per_token: {top_k}
experts:
  - source_model: {expert0}
    positive_prompts: ["What is 12 plus 30?", "Compute 7 times 8 and subtract 6."]
  - source_model: {expert1}
    positive_prompts: ["def add(a, b): return a + b", "for i in range(10): print(i)"]
  - source_model: {expert2}
    positive_prompts: ["The old lighthouse keeper watched the storm.", "She opened the letter slowly."]
frankenmoe:
  experts:
    - {{label: maths, test_prompts: ["What is 9 times 9?", "Add 5 and 17."]}}
    - {{label: code, test_prompts: ["def square(x): return x * x"]}}
    - {{label: stories, test_prompts: ["The keeper climbed the tower at dawn."]}}
"""

TRAINING_TEXT = "\n\n".join(
    [
        "What is 12 plus 30? The answer is 42. Compute 7 times 8 and subtract 6: 50.",
        "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)",
        "The old lighthouse keeper watched the storm roll in over the grey sea.",
        "She opened the letter slowly, afraid of what it might say.",
    ]
    * 4
)
HELD_OUT_TEXT = "What is 3 plus 4? The answer is 7.\n\nThe sea was calm when the keeper woke."


@pytest.fixture(scope="module")
def merged(llama_donors: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train-gui") / "merged"
    run_job(merge_moe(parse_recipe(RECIPE.format(top_k=2, **llama_donors)), MergeOptions(out_dir=out)))
    return out


@pytest.fixture
def page(qtbot, settings: AppSettings) -> Iterator[TrainPage]:
    train = TrainPage(AppContext(settings))
    qtbot.addWidget(train)
    train.resize(1180, 760)
    train.show()
    yield train
    train.shutdown()
    for job in (train.job, train.compare, train.legend_job):
        if job is not None:
            job.wait()


def text_file(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def quick_settings(page: TrainPage, steps: int = 6) -> None:
    """A run of a few seconds on a CPU: tiny sequences and batches, validation every third step."""
    form = page.form
    form.budget_kind.setCurrentText("Steps")
    form.budget.setValue(steps)
    form.seq_len.setValue(16)
    form.batch_size.setValue(2)
    form.lr.setValue(0.05)
    form.eval_every.setValue(3)
    form.val_fraction.setValue(0.2)
    form.device.setCurrentText("cpu")


def wait_until_idle(qtbot, page: TrainPage) -> None:
    qtbot.waitUntil(lambda: not page.is_running, timeout=TIMEOUT_MS)
    QCoreApplication.processEvents()


def test_the_page_trains_a_merged_moe_and_shows_losses_and_before_after(
    qtbot, page: TrainPage, merged: Path, tmp_path: Path
) -> None:
    page.set_model(merged)
    out = merged.with_name("merged-routers-trained")
    assert page.out_dir.text() == str(out)  # a sibling by default: the model it starts from stays as it is
    assert page.form.recipe_prompts.isEnabled() and page.form.recipe_prompts.isChecked()
    page.form.data_files.add([text_file(tmp_path, "train.txt", TRAINING_TEXT)])
    page.form.held_out.add([text_file(tmp_path, "held-out.txt", HELD_OUT_TEXT)])
    quick_settings(page)
    records: list[TrainingProgress] = []

    page.start_button.click()
    assert page.job is not None and page.cancel_button.isEnabled() and not page.start_button.isEnabled()
    page.job.progress.connect(records.append)
    with qtbot.waitSignal(page.job.finished, timeout=TIMEOUT_MS):
        pass
    assert page.result is not None, page.message.text()
    assert page.compare is not None
    with qtbot.waitSignal(page.compare.finished, timeout=TIMEOUT_MS):
        pass
    QCoreApplication.processEvents()
    result = page.result

    # The live view got training records while it ran; the finished plot holds every one of the run's.
    assert any(isinstance(r, TrainingProgress) and r.loss is not None for r in records)
    train_points = [(r.step, r.loss) for r in result.history if r.stage == "train" and r.loss is not None]
    val_points = [(r.step, r.val_loss) for r in result.history if r.val_loss is not None]
    assert page.loss_plot.train == train_points and len(train_points) == result.steps
    assert page.loss_plot.validation == val_points and len(val_points) >= 2
    loads = [r.expert_load for r in result.history if r.expert_load]
    assert page.load_chart.start == loads[0] and page.load_chart.now == loads[-1]
    assert abs(sum(page.load_chart.now) - 1) < 1e-6 and page.load_chart.labels == ("maths", "code", "stories")
    assert page.message.text().startswith(f"✓ Trained {result.steps} steps")
    assert f"{result.final_val_loss:.4f}" in page.message.text()
    assert (out / "config.json").is_file() and page.trained_folder == out

    # Before / after: the trainer's validation split, each expert's test prompts and the held-out file.
    view = page.before_after
    comparison = page.comparison
    assert comparison is not None and page.tabs.currentWidget() is view
    rows = [row.dataset for row in comparison.losses]
    assert rows == [VALIDATION_ROW, "maths test prompts", "code test prompts", "stories test prompts", "held-out"]
    cells = view.table_cells()
    assert cells[(VALIDATION_ROW, "old routers")] == f"{result.initial_val_loss:.4f}"
    assert cells[(VALIDATION_ROW, "new routers")] == f"{result.final_val_loss:.4f}"
    # The old routers' loss is the merged model's own, as the Evaluate page measures it.
    held_out = next(row for row in comparison.losses if row.dataset == "held-out")
    from app.core.eval.data import load_data_file
    from app.core.eval.nll import EvalModel, EvalRequest, evaluate

    request = EvalRequest((EvalModel("moe", str(merged)),), (load_data_file(tmp_path / "held-out.txt"),), device="cpu")
    reference = run_job(evaluate(request))
    assert held_out.before == pytest.approx(reference.results[0].nll, abs=1e-5)
    assert cells[("held-out", "change")] == f"{held_out.after - held_out.before:+.4f}"
    # The test prompts' routing under both: four prompts, one heatmap row per layer, old and new side by side.
    assert view.prompt_choice.count() == 4
    assert comparison.before_routing is not None and comparison.after_routing is not None
    assert "Old routers:" in view.quality.text() and "New routers:" in view.quality.text()
    before, after = view.before.data, view.after.data
    assert before is not None and after is not None and len(before.values) == len(after.values) == 2
    assert before.values != after.values  # the routers changed
    assert page.evaluate_button.isVisible() and page.chat_button.isVisible()
    view.prompt_choice.setCurrentIndex(2)
    screenshot(page, "train-routers-before-after")
    QCoreApplication.processEvents()  # back in the light theme
    page.grab().save(str(SHOTS / "router-gui-before-after.png"))
    page.tabs.setCurrentIndex(0)
    QCoreApplication.processEvents()
    page.grab().save(str(SHOTS / "router-gui-training.png"))


def start_a_long_run(page: TrainPage, merged: Path, out: Path, tmp_path: Path) -> None:
    page.set_model(merged)
    page.out_dir.setText(str(out))
    page.form.data_files.add([text_file(tmp_path, "train.txt", TRAINING_TEXT)])
    quick_settings(page, steps=5000)
    page.start_button.click()
    assert page.job is not None


def test_cancel_mid_run_leaves_no_output_and_the_window_usable(window, qtbot, merged: Path, tmp_path: Path) -> None:
    out = tmp_path / "trained"
    window.show_step(Step.TRAIN)
    page = window.train_page
    start_a_long_run(page, merged, out, tmp_path)
    assert window.context.running and "Train routers" in window.jobs_label.text()

    def cancel_once_training(record: object) -> None:
        if isinstance(record, TrainingProgress) and record.stage == "train" and record.step >= 2:
            page.cancel_button.click()

    page.job.progress.connect(cancel_once_training)
    with qtbot.waitSignal(page.job.cancelled, timeout=TIMEOUT_MS):
        pass
    wait_until_idle(qtbot, page)
    assert page.message.text() == "Training cancelled: no model was written."
    assert not out.exists() and page.result is None and page.compare is None
    assert page.start_button.isEnabled() and not page.cancel_button.isEnabled() and page.form.isEnabled()
    assert not page.evaluate_button.isVisible() and page.loss_plot.train  # what it did before the cancel stays shown
    # The window goes on: no job left, and the other steps open.
    assert not window.context.running
    window.show_step(Step.EVALUATE)
    assert window.pages.currentWidget() is window.evaluate_page


def test_closing_the_window_mid_run_stops_and_joins_the_training(
    window, qtbot, answer, merged: Path, tmp_path: Path
) -> None:
    out = tmp_path / "trained"
    window.show_step(Step.TRAIN)
    page = window.train_page
    start_a_long_run(page, merged, out, tmp_path)
    with qtbot.waitSignal(page.job.progress, timeout=TIMEOUT_MS, check_params_cb=lambda r: r.stage == "train"):
        pass
    answer["question"] = QMessageBox.StandardButton.Yes
    assert window.close()
    assert "Train routers" in answer["asked"][-1]
    assert not page.job.is_running and not window.context.running  # joined before the window went
    assert not out.exists()


def test_the_trainers_warnings_stay_in_view_after_the_run(
    qtbot, page: TrainPage, llama_donors: dict[str, Path], tmp_path: Path
) -> None:
    top_1 = tmp_path / "top-1"  # one expert per token, renormalised: the next-token loss moves no router
    run_job(merge_moe(parse_recipe(RECIPE.format(top_k=1, **llama_donors)), MergeOptions(out_dir=top_1)))
    page.set_model(top_1)
    page.form.recipe_prompts.setChecked(True)
    quick_settings(page, steps=2)
    page.start_button.click()
    with qtbot.waitSignal(page.job.finished, timeout=TIMEOUT_MS):
        pass
    assert page.result is not None, page.message.text()
    page.cancel_button.click()  # the comparison is not what this test is about
    wait_until_idle(qtbot, page)
    assert page.warnings.isVisible() and page.warnings.text().startswith("⚠ ")
    assert "one expert" in page.warnings.text() and "Fix:" in page.warnings.text()
    assert page.message.text().startswith("✓ Trained 2 steps")


def test_a_stopped_run_continues_from_its_checkpoint(qtbot, page: TrainPage, merged: Path, tmp_path: Path) -> None:
    from app.core.training.trainer import checkpoint_dir, latest_checkpoint

    out = tmp_path / "trained"
    page.set_model(merged)
    page.out_dir.setText(str(out))
    page.form.data_files.add([text_file(tmp_path, "train.txt", TRAINING_TEXT)])
    quick_settings(page, steps=6)
    page.form.checkpoint_every.setValue(2)
    assert not page.resume.isVisible()
    page.start_button.click()
    assert page.job is not None
    page.job.progress.connect(
        lambda r: page.cancel_button.click() if isinstance(r, TrainingProgress) and r.step >= 3 else None
    )
    with qtbot.waitSignal(page.job.cancelled, timeout=TIMEOUT_MS):
        pass
    wait_until_idle(qtbot, page)
    checkpoint = latest_checkpoint(checkpoint_dir(out))
    assert checkpoint is not None and not out.exists()
    assert page.resume.isVisible() and page.resume.isChecked() and "checkpoint is kept" in page.message.text()

    page.start_button.click()
    steps: list[int] = []
    page.job.progress.connect(lambda r: steps.append(r.step) if r.stage == "train" else None)
    with qtbot.waitSignal(page.job.finished, timeout=TIMEOUT_MS):
        pass
    assert page.result is not None, page.message.text()
    with qtbot.waitSignal(page.compare.finished, timeout=TIMEOUT_MS):
        pass
    # It went on after the checkpoint's step, to the planned end, and the checkpoint went with the run.
    # (The first record of a stage always reaches the page; later ones may be thinned out.)
    assert steps[0] == int(checkpoint.name.removeprefix("step-")) + 1 and page.result.steps == 6
    assert (out / "config.json").is_file() and not checkpoint_dir(out).exists()
    wait_until_idle(qtbot, page)
    assert not page.resume.isVisible()


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("dense") / "llama", "llama", seed=3)


@pytest.mark.parametrize("case", ["empty data file", "learning rate 0", "output folder not empty", "dense model"])
def test_bad_input_shows_one_clear_message_and_writes_nothing(
    qtbot, page: TrainPage, merged: Path, dense: Path, tmp_path: Path, case: str
) -> None:
    out = tmp_path / "trained"
    data = text_file(tmp_path, "train.txt", TRAINING_TEXT)
    expected = {
        "empty data file": "empty.txt",
        "learning rate 0": "learning rate",
        "output folder not empty": "not empty",
        "dense model": "router",
    }[case]
    page.set_model(dense if case == "dense model" else merged)
    page.out_dir.setText(str(out))
    quick_settings(page)
    page.form.recipe_prompts.setChecked(False)
    if case == "empty data file":
        data = text_file(tmp_path, "empty.txt", "")
    page.form.data_files.add([data])
    if case == "learning rate 0":
        page.form.lr.setValue(0.0)
    if case == "output folder not empty":
        out.mkdir()
        (out / "notes.txt").write_text("the user's own file", encoding="utf-8")

    page.start_button.click()
    wait_until_idle(qtbot, page)
    message = page.message.text()
    assert message.startswith("✗") and expected in message.lower() and message.count("✗") == 1, message
    assert "Traceback" not in message and page.result is None
    if case == "output folder not empty":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()
    assert page.start_button.isEnabled() and not page.cancel_button.isEnabled()
    page.grab().save(str(SHOTS / f"router-gui-bad-{case.replace(' ', '-')}.png"))


def test_the_train_step_follows_merge_and_needs_no_recipe(window, merged: Path) -> None:
    names = [window.steps.item(row).text() for row in range(window.steps.count())]
    assert names[3:] == ["4  Merge", "5  Train routers", "6  Evaluate", "7  Chat"]
    assert window.pages.widget(Step.TRAIN) is window.train_page
    assert window.step_actions[Step.TRAIN].isEnabled()  # a model folder is all it needs
    assert window.steps.item(Step.TRAIN).flags() & Qt.ItemFlag.ItemIsEnabled
    window.merge_page.merged_folder = merged
    window.merge_page.train_button.click()
    assert window.pages.currentWidget() is window.train_page
    assert window.train_page.model_path.text() == str(merged)
    window.train_page.trained_folder = merged
    window.train_page.evaluate_button.click()
    assert window.pages.currentWidget() is window.evaluate_page
    assert window.evaluate_page.model_path.text() == str(merged)


def test_the_charts_draw_training_records(qtbot) -> None:
    """The live charts from hand-made records: the plot widgets alone, no training."""
    loss, load = LossPlot(), ExpertLoadChart()
    for chart in (loss, load):
        qtbot.addWidget(chart)
        chart.resize(640, 300)
        chart.show()
    load.set_labels(("maths", "code", "stories"))
    records = [
        TrainingProgress(
            "train", step, 40, step=step, loss=3.0 - 0.03 * step, expert_load=(0.6 - step / 200, 0.3, 0.1 + step / 200)
        )
        for step in range(1, 41)
    ]
    records += [TrainingProgress("validate", s, 40, step=s, val_loss=3.1 - 0.02 * s) for s in (10, 20, 30, 40)]
    for record in records:
        loss.add(record.step, record.loss, record.val_loss)
        load.add(record.expert_load)
    assert len(loss.train) == 40 and loss.validation == [(s, pytest.approx(3.1 - 0.02 * s)) for s in (10, 20, 30, 40)]
    assert load.start == pytest.approx((0.595, 0.3, 0.105)) and load.now == pytest.approx((0.4, 0.3, 0.3))
    loss.grab().save(str(SHOTS / "router-gui-loss-plot.png"))
    load.grab().save(str(SHOTS / "router-gui-load-chart.png"))
    loss.clear()
    load.clear()
    assert not loss.train and not load.now


def test_the_form_starts_from_the_core_defaults_and_reads_typed_values(qtbot) -> None:
    from app.core.training.settings import RouterTrainingSettings

    form = TrainingForm(device="cpu", dtype="float32")
    qtbot.addWidget(form)
    form.show()
    defaults = RouterTrainingSettings()
    assert form.settings() == defaults.model_copy(update={"device": "cpu", "dtype": "float32"})
    assert form.lr.text() == "0.001"  # written as people write it
    form.lr.lineEdit().selectAll()
    qtbot.keyClicks(form.lr.lineEdit(), "2e-05")
    form.budget_kind.setCurrentText("Tokens")
    form.budget.setValue(50_000)
    form.hub_datasets.setText("org/stories:en/train, org/code")
    settings, data = form.settings(), form.data()
    assert settings.lr == 2e-05 and settings.tokens == 50_000 and settings.steps is None
    assert data.hub_datasets == ("org/stories:en/train", "org/code") and not data.recipe_prompts
