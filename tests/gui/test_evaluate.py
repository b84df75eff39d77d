"""The Evaluate page with a real merged tiny MoE and its real donors: MoE vs base vs experts, the chart,
routing, the k sweep, exports, the model card, bad input; and the chat's routing controls."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import QCoreApplication

from app.core.chat import LoadRequest
from app.core.eval.card import SECTION_HEADING
from app.core.eval.controls import RoutingOverride
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.progress import run_job
from app.core.recipe import parse_recipe
from app.gui.context import AppContext
from app.gui.main_window import Step
from app.gui.pages.chat import ChatPage, PageState
from app.gui.pages.evaluate import EvaluatePage
from app.gui.settings import AppSettings
from tests.core.test_chat_capture import MERGED_RECIPE
from tests.gui.conftest import screenshot

TIMEOUT_MS = 120_000
CARD_INTRO = "# merged\n\nA model card the user wrote.\n"
CARD_TAIL = "## Licence\n\nApache-2.0, kept as it was.\n"


@pytest.fixture(scope="module")
def merged(llama_donors: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    recipe = parse_recipe(MERGED_RECIPE.format(**llama_donors))
    out = tmp_path_factory.mktemp("evaluate-gui") / "merged"
    run_job(merge_moe(recipe, MergeOptions(out_dir=out)))
    return out


@pytest.fixture
def page(qtbot, settings: AppSettings) -> Iterator[EvaluatePage]:
    evaluate = EvaluatePage(AppContext(settings))
    qtbot.addWidget(evaluate)
    evaluate.resize(1180, 760)
    evaluate.show()
    yield evaluate
    evaluate.shutdown()
    if evaluate.job is not None:
        evaluate.job.wait()


def run(qtbot, page: EvaluatePage) -> None:
    page.run_button.click()
    # Cancel is on while the job runs; a job that fails on its input may be over before the check.
    assert page.job is not None and (page.cancel_button.isEnabled() or not page.job.is_running)
    with qtbot.waitSignal(page.job.finished, timeout=TIMEOUT_MS):
        pass
    QCoreApplication.processEvents()


def table_cells(page: EvaluatePage) -> dict[tuple[str, str], str]:
    table = page.results.table
    return {
        (table.verticalHeaderItem(r).text(), table.horizontalHeaderItem(c).text()): table.item(r, c).text()
        for r in range(table.rowCount())
        for c in range(table.columnCount())
    }


def test_compares_the_moe_with_its_base_and_experts(qtbot, page: EvaluatePage, merged: Path, tmp_path: Path) -> None:
    data = tmp_path / "stories.txt"
    data.write_text("Once upon a time there was a fox.\n\nThe fox ran into the woods and slept.\n", encoding="utf-8")
    page.set_model(merged)
    assert page.recipe_prompts.isChecked() and page.compare_donors.isEnabled()
    page.compare_donors.setChecked(True)
    page.data_files.add([data])
    page.sweep.setText("1, 3")
    run(qtbot, page)

    assert page.outcome is not None, page.stage.text()
    report = page.outcome.report
    assert page.stage.text().startswith("✓")
    # The recipe's prompts per expert (named by the expert's label) and the data file, for MoE, base and experts.
    assert report["datasets"] == ["maths", "code", "expert 2", "stories"]
    assert len(report["models"]) == 5 and report["models"][:2] == ["moe", "base"]
    cells = table_cells(page)
    columns = [page.results.table.horizontalHeaderItem(c).text() for c in range(5)]
    assert columns == ["MoE", "base", "expert0", "expert1", "expert2"]
    for dataset in report["datasets"]:
        default = {
            r["model"]: r["ppl"]
            for r in report["results"]
            if r["dataset"] == dataset and r["override"]["top_k"] is None
        }
        best = min(default, key=default.get)
        starred = [c for c in columns if cells[(dataset, c)].startswith("★")]
        assert starred == [columns[report["models"].index(best)]]
        assert cells[(dataset, "MoE")].removeprefix("★ ") == f"{default['moe']:.3f}"
    assert page.results.bars.best_series() == [
        report["models"].index(
            min(
                (r for r in report["results"] if r["dataset"] == d and r["override"]["top_k"] is None),
                key=lambda r: r["ppl"],
            )["model"]
        )
        for d in report["datasets"]
    ]

    # Routing per dataset: one heatmap row per MoE layer, one column per expert, named by the recipe.
    routing = page.results
    assert routing.routing_dataset.count() == 5  # each dataset, then all of them against the experts
    heatmap = routing.heatmap.data
    assert (
        heatmap is not None
        and len(heatmap.values) == 2
        and list(heatmap.column_labels) == ["maths", "code", "expert 2"]
    )
    assert all(abs(sum(row) - 1.0) < 1e-6 for row in heatmap.values)
    # The k sweep: the MoE at k = 1 and 3 on every dataset, and at its own k (2) with its own routing.
    ks, per_dataset = routing.sweep_points()
    assert ks == [1, 2, 3] and set(per_dataset) == set(report["datasets"])
    own = {r["dataset"]: r["ppl"] for r in report["results"] if r["model"] == "moe" and r["override"]["top_k"] is None}
    assert {dataset: points[2] for dataset, points in per_dataset.items()} == own
    assert routing.sweep.data is not None

    routing.routing_dataset.setCurrentIndex(4)
    confusion = routing.heatmap.data
    assert confusion is not None and list(confusion.row_labels) == report["datasets"]
    # The recipe's datasets are named after their experts: each outlines its own.
    assert list(confusion.outlined) == [0, 1, 2, None]
    assert "on average" in routing.routing_note.text()
    for index, name in ((1, "evaluate-chart"), (2, "evaluate-routing"), (3, "evaluate-k-sweep"), (0, "evaluate-table")):
        routing.setCurrentIndex(index)
        screenshot(page, name)

    page.export_json(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    page.export_csv(tmp_path / "report.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report.csv").read_text())))
    assert len(rows) == len(report["results"])
    assert {(r["model"], r["dataset"], r["top_k"]) for r in rows} == {
        (r["model"], r["dataset"], "" if r["override"]["top_k"] is None else str(r["override"]["top_k"]))
        for r in report["results"]
    }

    readme = merged / "README.md"
    readme.write_text(f"{CARD_INTRO}\n{SECTION_HEADING}\n\nAn old table.\n\n{CARD_TAIL}", encoding="utf-8")
    page.card_button.click()
    page.card_button.click()  # twice: still one Evaluation section
    card = readme.read_text(encoding="utf-8")
    assert card.count(SECTION_HEADING) == 1 and "An old table." not in card
    assert card.startswith(CARD_INTRO) and card.endswith(CARD_TAIL)
    moe_maths = next(
        r["ppl"]
        for r in report["results"]
        if (r["model"], r["dataset"]) == ("moe", "maths") and r["override"]["top_k"] is None
    )
    assert f"{moe_maths:.3f}" in card and str(merged.parent) not in card  # donors by folder name, never local paths
    assert not list(merged.glob(".README.md*"))


def test_cancel_stops_the_evaluation_and_keeps_the_page(qtbot, page: EvaluatePage, merged: Path) -> None:
    page.set_model(merged)
    page.compare_donors.setChecked(True)
    page.run_button.click()
    assert page.job is not None
    stages: list[str] = []
    page.job.progress.connect(lambda record: stages.append(record.stage))
    page.job.progress.connect(lambda _record: page.cancel_button.click())
    with qtbot.waitSignal(page.job.cancelled, timeout=TIMEOUT_MS):
        pass
    qtbot.waitUntil(lambda: not page.is_running, timeout=TIMEOUT_MS)
    QCoreApplication.processEvents()
    assert stages and page.stage.text() == "Evaluation cancelled." and page.outcome is None
    assert page.run_button.isEnabled() and not page.cancel_button.isEnabled()
    assert page.progress.value() == 0


def test_bad_input_gets_a_message_and_keeps_the_page(
    qtbot, page: EvaluatePage, merged: Path, llama_donors: dict[str, Path], tmp_path: Path
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café crème\n".encode("latin-1"))
    page.set_model(merged)
    page.recipe_prompts.setChecked(False)

    for bad, words in ((empty, "no records"), (latin, "UTF-8")):
        page.data_files.clear()
        page.data_files.add([bad])
        run(qtbot, page)
        message = page.stage.text()
        assert message.startswith("✗") and bad.name in message and words in message and "Fix:" in message, message
        assert page.outcome is None and page.run_button.isEnabled() and not page.cancel_button.isEnabled()

    page.sweep.setText("0")
    page.run_button.click()
    assert page.job is None or not page.job.is_running
    assert "✗" in page.stage.text() and "Fix:" in page.stage.text()

    dense = llama_donors["base"]  # a dense model: no experts to sweep over
    page.set_model(dense)
    page.sweep.setText("1-2")
    page.data_files.clear()
    page.data_files.add([Path(__file__)])  # a .py file: a suffix the app does not read
    run(qtbot, page)
    assert page.stage.text().startswith("✗") and ".py" in page.stage.text()
    page.data_files.clear()
    (tmp_path / "ok.txt").write_text("A few words to score here.\n", encoding="utf-8")
    page.data_files.add([tmp_path / "ok.txt"])
    run(qtbot, page)
    assert "has no experts" in page.stage.text() and "Fix: Clear Experts per token" in page.stage.text()

    page.sweep.clear()
    good = tmp_path / "good.txt"
    good.write_text("Some text to score.\n", encoding="utf-8")
    page.set_model(tmp_path)  # a folder that holds no model at all
    page.data_files.clear()
    page.data_files.add([good])
    run(qtbot, page)
    assert page.stage.text().startswith("✗") and page.outcome is None and page.run_button.isEnabled()


def test_without_lm_eval_the_tasks_are_off_with_a_note(qtbot, settings: AppSettings, monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real_find_spec(name, *a)
    )
    page = EvaluatePage(AppContext(settings))
    qtbot.addWidget(page)
    page.show()
    assert not page.tasks.isEnabled() and page.tasks_note.isVisible() and "not installed" in page.tasks_note.text()
    page.model_path.setText("/some/model")
    page.tasks.setText("arc_easy")  # typed before it was disabled, say
    page.run_button.click()
    assert page.job is None and "lm-eval package is not installed" in page.stage.text() and "Fix:" in page.stage.text()


def test_the_evaluate_step_follows_merge_and_needs_no_recipe(window, merged: Path) -> None:
    assert window.steps.item(Step.EVALUATE).text() == "6  Evaluate"
    assert window.step_actions[Step.EVALUATE].isEnabled()
    window.start_page.evaluate_button.click()
    assert window.pages.currentWidget() is window.evaluate_page
    window.merge_page.merged_folder = merged
    window.merge_page.evaluate_button.click()
    assert window.pages.currentWidget() is window.evaluate_page
    assert window.evaluate_page.model_path.text() == str(merged)


# ---------------------------------------------------------------------- the chat's routing controls


@pytest.fixture
def chat(qtbot, settings: AppSettings) -> Iterator[ChatPage]:
    page = ChatPage(AppContext(settings))
    qtbot.addWidget(page)
    page.resize(1180, 720)
    page.show()
    yield page
    assert page.shutdown()


def chat_answer(qtbot, page: ChatPage, text: str) -> list:
    page.send(text)
    qtbot.waitUntil(lambda: page.state is PageState.READY, timeout=TIMEOUT_MS)
    return list(page.conversation.path()[-1].generation.generated)


def test_chat_routing_controls_apply_from_the_next_token(qtbot, chat: ChatPage, merged: Path) -> None:
    chat.load_model(LoadRequest(str(merged), device="cpu"))
    qtbot.waitUntil(lambda: chat.state is PageState.READY, timeout=TIMEOUT_MS)
    controls = chat.experts
    assert [box.text() for box in controls.expert_boxes] == ["maths", "code", "expert 2"]
    assert controls.top_k.value() == 2 and controls.top_k.maximum() == 3
    chat.sampling.max_new_tokens.setValue(6)
    chat.sampling.seed.setValue(2)

    controls.top_k.setValue(1)
    controls.expert_boxes[0].setChecked(False)
    assert chat.backend.worker.routing == RoutingOverride(top_k=1, disabled=frozenset({0}))
    tokens = chat_answer(qtbot, chat, "Add two and two")
    assert tokens and all(len(layer) == 1 and layer[0] != 0 for token in tokens for layer in token.experts)
    # After the answer the model routes as it was built to, until the next token asks otherwise.
    assert chat.backend.worker._model.capture.rule.top_k == 2

    # Every expert off cannot route: the last one is refused and stays on.
    controls.top_k.setValue(2)
    controls.expert_boxes[1].setChecked(False)
    assert "✗ Not applied" in controls.message.text()  # two experts per token with one left is refused
    assert controls.expert_boxes[1].isChecked() and controls.top_k.value() == 2
    controls.top_k.setValue(1)
    controls.expert_boxes[1].setChecked(False)
    controls.expert_boxes[2].setChecked(False)
    assert controls.expert_boxes[2].isChecked() and "every one of the 3 experts" in controls.message.text().lower()
    assert chat.backend.worker.routing == RoutingOverride(top_k=1, disabled=frozenset({0, 1}))
    tokens = chat_answer(qtbot, chat, "Tell me a story")
    assert all(token.experts[0] == (2,) and token.experts[1] == (2,) for token in tokens)
    chat.side_tabs.setCurrentWidget(controls)
    screenshot(chat, "chat-expert-controls")


def test_chat_routing_change_reaches_an_answer_being_written(qtbot, chat: ChatPage, merged: Path) -> None:
    chat.load_model(LoadRequest(str(merged), device="cpu"))
    qtbot.waitUntil(lambda: chat.state is PageState.READY, timeout=TIMEOUT_MS)
    chat.sampling.max_new_tokens.setValue(5000)
    chat.sampling.seed.setValue(3)
    batches = []

    def first_batch_changes_k_then_stop(events: list) -> None:
        # k changes while the answer is being written; it stops once a token shows the change.
        batches.append(events)
        if len(batches) == 1:
            chat.experts.top_k.setValue(1)
        elif any(len(event.token.experts[0]) == 1 for event in events):
            chat.controls.stop_button.click()

    chat.backend.worker.tokens_generated.connect(first_batch_changes_k_then_stop)
    tokens = chat_answer(qtbot, chat, "Count to a thousand")
    assert chat.conversation.path()[-1].generation.stop_reason == "stopped"
    ks = [len(token.experts[0]) for token in tokens]
    switched = ks.index(1)
    assert switched > 0 and set(ks[:switched]) == {2} and set(ks[switched:]) == {1}


@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install 'frankenmoe-studio[eval]')",
)
def test_runs_a_local_lm_eval_task_on_the_moe(
    qtbot, page: EvaluatePage, merged: Path, tmp_path: Path, monkeypatch
) -> None:
    from tests.eval_tasks import write_eval_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = write_eval_tasks(tmp_path / "tasks")
    page.set_model(merged)
    page.tasks.setText("tiny_choice")
    page.include_path.setText(str(tasks))
    page.limit.setValue(4)
    run(qtbot, page)
    assert page.outcome is not None, page.stage.text()
    entries = page.outcome.report["lm_eval"]["results"]
    accuracy = next(e["metrics"]["acc"] for e in entries if e["model"] == "moe" and e["task"] == "tiny_choice")
    benchmarks = page.results.benchmarks
    assert page.results.isTabEnabled(page.results.indexOf(benchmarks))
    row = next(
        r for r in range(benchmarks.rowCount()) if benchmarks.verticalHeaderItem(r).text() == "tiny_choice · acc"
    )
    assert benchmarks.item(row, 0).text() == f"{accuracy:.4f}"
    page.card_button.click()
    assert "| tiny_choice | acc |" in (merged / "README.md").read_text(encoding="utf-8")
    page.export_json(tmp_path / "report.json")
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["lm_eval"]["file"] == "report.lm-eval.json"
    runs = json.loads((tmp_path / "report.lm-eval.json").read_text())["runs"]
    assert runs[0]["model"] == "moe" and "tiny_choice" in runs[0]["results"]["results"]

    page.tasks.setText("no_such_task")
    run(qtbot, page)
    assert page.stage.text().startswith("✗") and "no_such_task" in page.stage.text() and "Fix:" in page.stage.text()
