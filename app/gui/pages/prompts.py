"""Prompts page: what each expert is for (positive and negative prompts), held-out test prompts,
and the router settings, each with a one-line explanation."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QApplication,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QInputDialog,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.core.merge.architectures import OUTPUT_ARCHITECTURES
from app.core.recipe import GATE_MODE_HELP, GATE_MODES, Expert, Recipe, validate_recipe
from app.gui import recipe_edits
from app.gui.document import RecipeDocument
from app.gui.widgets import MessageLabel, color_icon, explanation, heading

# A prompt's line breaks matter (code prompts); the list shows them as a visible mark.
NEWLINE_MARK = " ⏎ "
DTYPE_CHOICES = (
    ("", "Same as the base model"),
    ("bfloat16", "bfloat16"),
    ("float16", "float16"),
    ("float32", "float32"),
)
DTYPE_HELP = "Precision of the merged weights: bfloat16 halves the size of float32 and suits most GPUs."
SHARED_ROW_COLOR = "#8a8a8a"
SCALE_MERGE_ID = 1000
SHARED_ROW_HELP = (
    "Prompts for the shared expert give it a gate that opens for text like them; without prompts it runs "
    "for every token at full weight."
)
NOISE_HELP = "Gaussian noise added to this expert's weights (seeded), to make copies of one model differ."
RESIDUAL_HELP = "Scales this expert's down projection, and so what it adds to the residual stream."
TOP_K_HELP = "How many experts each token goes through: more is slower but blends more knowledge; 2 is usual."
# One line per choice of output architecture (recipe names, mergekit-moe's; "" chooses from the donors).
ARCHITECTURE_HELP = {
    "": "Chosen from the base model: Llama and Mistral give Mixtral, Qwen2 gives Qwen2-MoE, Qwen3 Qwen3-MoE.",
    "mixtral": "Routed experts only; takes Llama and Mistral donors and loads in most inference tools.",
    "qwen": "Routed experts plus one shared expert that runs for every token; takes Qwen2, Llama or Mistral donors.",
    "qwen3": "Routed experts only, with Qwen3's q/k norms; takes Qwen3 donors.",
}
# Architectures that can hold a shared expert; "" may become Qwen2-MoE, and validation says when it cannot.
SHARED_EXPERT_ARCHITECTURES = ("", "qwen")
SHARED_EXPERT_HELP = (
    "A Qwen2-MoE's shared expert: one more MLP that every token goes through, beside the routed ones. "
    "Without prompts it is always on."
)


def lines_to_prompts(text: str) -> list[str]:
    """One prompt per non-empty line, for pasting and importing many at once."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def scale_box(maximum: float, step: float, decimals: int) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(0.0, maximum)
    box.setSingleStep(step)
    box.setDecimals(decimals)
    box.setSpecialValueText("none")
    box.setMaximumWidth(140)
    return box


class PromptListEditor(QWidget):
    """A list of prompts with add, edit, delete, paste-many and import-from-file."""

    prompts_edited = Signal(tuple, str)

    def __init__(self, kind: str, help_text: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.kind = kind
        self.prompts: tuple[str, ...] = ()
        self.list = QListWidget()
        self.list.setWordWrap(True)
        self.list.setAlternatingRowColors(True)
        self.list.itemDoubleClicked.connect(lambda _item: self.edit_selected())
        self.list.currentRowChanged.connect(self._update_buttons)
        add = QPushButton("Add…")
        self.edit_button = QPushButton("Edit…")
        self.delete_button = QPushButton("Delete")
        paste = QPushButton("Paste lines")
        paste.setToolTip("Adds each line of the clipboard as a prompt")
        import_file = QPushButton("Import file…")
        import_file.setToolTip("Adds each line of a text file as a prompt")
        add.clicked.connect(self.add)
        self.edit_button.clicked.connect(self.edit_selected)
        self.delete_button.clicked.connect(self.delete_selected)
        paste.clicked.connect(self.paste_lines)
        import_file.clicked.connect(self.import_file)
        buttons = QHBoxLayout()
        for button in (add, self.edit_button, self.delete_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(paste)
        buttons.addWidget(import_file)
        layout = QVBoxLayout(self)
        layout.addWidget(explanation(help_text))
        layout.addWidget(self.list, 1)
        layout.addLayout(buttons)
        self._update_buttons()

    def set_prompts(self, prompts: tuple[str, ...]) -> None:
        if prompts == self.prompts and self.list.count() == len(prompts):
            return
        row = self.list.currentRow()
        self.prompts = prompts
        self.list.clear()
        for prompt in prompts:
            item = QListWidgetItem(prompt.replace("\n", NEWLINE_MARK))
            item.setToolTip(prompt)
            self.list.addItem(item)
        self.list.setCurrentRow(min(row, len(prompts) - 1))
        self._update_buttons()

    def _emit(self, prompts: list[str], text: str) -> None:
        self.prompts_edited.emit(tuple(prompts), text)

    def add(self) -> None:
        text, ok = QInputDialog.getMultiLineText(self, f"Add {self.kind} prompt", "Prompt:")
        if ok and text.strip():
            self._emit([*self.prompts, text.strip()], f"Add {self.kind} prompt")

    def edit_selected(self) -> None:
        row = self.list.currentRow()
        if row < 0:
            return
        text, ok = QInputDialog.getMultiLineText(self, f"Edit {self.kind} prompt", "Prompt:", self.prompts[row])
        if ok and text.strip():
            prompts = list(self.prompts)
            prompts[row] = text.strip()
            self._emit(prompts, f"Edit {self.kind} prompt")

    def delete_selected(self) -> None:
        row = self.list.currentRow()
        if row >= 0:
            prompts = list(self.prompts)
            del prompts[row]
            self._emit(prompts, f"Delete {self.kind} prompt")

    def add_many(self, text: str) -> int:
        new = lines_to_prompts(text)
        if new:
            self._emit([*self.prompts, *new], f"Add {len(new)} {self.kind} prompts")
        return len(new)

    def paste_lines(self) -> None:
        self.add_many(QApplication.clipboard().text())

    def import_file(self) -> None:
        name, _filter = QFileDialog.getOpenFileName(
            self, "Import prompts, one per line", "", "Text (*.txt);;All files (*)"
        )
        if not name:
            return
        try:
            text = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            QMessageBox.warning(self, "Cannot import prompts", f"{name} could not be read as UTF-8 text: {exc}")
            return
        self.add_many(text)

    def _update_buttons(self) -> None:
        has_row = self.list.currentRow() >= 0
        self.edit_button.setEnabled(has_row)
        self.delete_button.setEnabled(has_row)


class PromptsPage(QWidget):
    def __init__(self, document: RecipeDocument, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self._refreshing = False

        self.experts = QListWidget()
        self.experts.setMaximumWidth(200)
        self.experts.currentRowChanged.connect(self._expert_selected)
        self.positive = PromptListEditor(
            "positive", "Text this expert should handle: the router learns to send text like this here."
        )
        self.negative = PromptListEditor(
            "negative", "Text this expert should not get: it is subtracted from the expert's router vector."
        )
        self.test = PromptListEditor(
            "test",
            "Held-out examples of this expert's text, not used to build the router: Preview checks where they go.",
        )
        self.tabs = QTabWidget()
        self.tabs.addTab(self.positive, "Positive prompts")
        self.tabs.addTab(self.negative, "Negative prompts")
        self.tabs.addTab(self.test, "Test prompts")
        self.positive.prompts_edited.connect(lambda p, text: self._set_expert_prompts("positive_prompts", p, text))
        self.negative.prompts_edited.connect(lambda p, text: self._set_expert_prompts("negative_prompts", p, text))
        self.test.prompts_edited.connect(self._set_test_prompts)
        self.expert_problems = MessageLabel()
        self.shared_row_help = explanation(SHARED_ROW_HELP)
        # 0 reads "none": no noise, and the donor's down projection as it is (mergekit's unset value).
        self.noise_scale = scale_box(1.0, 0.005, 4)
        self.residual_scale = scale_box(10.0, 0.1, 3)
        self.noise_scale.setToolTip(NOISE_HELP)
        self.residual_scale.setToolTip(RESIDUAL_HELP)
        self.noise_scale.valueChanged.connect(lambda value: self._set_scale("noise_scale", value))
        self.residual_scale.valueChanged.connect(lambda value: self._set_scale("residual_scale", value))
        scales = QFormLayout()
        scales.addRow("Noise scale", self.noise_scale)
        scales.addRow("Residual scale", self.residual_scale)

        self.gate_mode = QComboBox()
        self.gate_mode.addItems(GATE_MODES)
        self.gate_help = explanation("")
        self.top_k = QSpinBox()
        self.top_k.setRange(1, 64)
        self.dtype = QComboBox()
        for value, text in DTYPE_CHOICES:
            self.dtype.addItem(text, value)
        self.architecture = QComboBox()
        self.architecture.addItem("Chosen from the donors", "")
        for architecture in OUTPUT_ARCHITECTURES:
            self.architecture.addItem(f"{architecture.title} ({architecture.name})", architecture.name)
        self.architecture_help = explanation("")
        # The shared expert's model: none, the base, or one of the experts' models (data: the reference).
        self.shared_expert = QComboBox()
        self.shared_expert_help = explanation(SHARED_EXPERT_HELP)
        self.gate_mode.currentTextChanged.connect(self._settings_edited)
        self.top_k.valueChanged.connect(self._settings_edited)
        self.dtype.currentIndexChanged.connect(self._settings_edited)
        self.architecture.currentIndexChanged.connect(self._settings_edited)
        self.shared_expert.currentIndexChanged.connect(self._shared_expert_edited)
        self.settings_problems = MessageLabel()

        settings = QGroupBox("Router and output")
        form = QFormLayout(settings)
        form.addRow("Gate mode", self.gate_mode)
        form.addRow("", self.gate_help)
        form.addRow("Experts per token", self.top_k)
        form.addRow("", explanation(TOP_K_HELP))
        form.addRow("Output dtype", self.dtype)
        form.addRow("", explanation(DTYPE_HELP))
        form.addRow("Output architecture", self.architecture)
        form.addRow("", self.architecture_help)
        form.addRow("Shared expert", self.shared_expert)
        form.addRow("", self.shared_expert_help)
        form.addRow(self.settings_problems)

        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.tabs, 1)
        right_layout.addWidget(self.shared_row_help)
        right_layout.addLayout(scales)
        right_layout.addWidget(self.expert_problems)
        settings.setMaximumWidth(380)
        splitter = QSplitter()
        splitter.addWidget(self.experts)
        splitter.addWidget(right)
        splitter.addWidget(settings)
        splitter.setStretchFactor(1, 1)
        splitter.setChildrenCollapsible(False)

        layout = QVBoxLayout(self)
        layout.addWidget(heading("2  Prompts"))
        layout.addWidget(
            explanation(
                "For each expert, show the router what it is for. Prompts that differ clearly between "
                "experts give a router that tells them apart; Preview shows how well it does."
            )
        )
        layout.addWidget(splitter, 1)
        document.changed.connect(self._refresh)
        self._refresh(document.recipe)

    @property
    def current_expert(self) -> int:
        """The selected routed expert's index, or -1 (none, or the shared expert's row)."""
        row = self.experts.currentRow()
        return row if row < len(self.document.recipe.experts) else -1

    @property
    def shared_selected(self) -> bool:
        recipe = self.document.recipe
        return bool(recipe.shared_experts) and self.experts.currentRow() == len(recipe.experts)

    def _selected(self, recipe: Recipe) -> Expert | None:
        row = self.experts.currentRow()
        if 0 <= row < len(recipe.experts):
            return recipe.experts[row]
        if recipe.shared_experts and row == len(recipe.experts):
            return recipe.shared_experts[0]
        return None

    def _expert_selected(self) -> None:
        # Rebuilding the list moves its selection; the refresh doing it shows the right expert itself.
        if not self._refreshing:
            self._refresh(self.document.recipe)

    def _refresh(self, recipe: Recipe) -> None:
        self._refreshing = True
        try:
            row = self.experts.currentRow()
            rows = len(recipe.experts) + (1 if recipe.shared_experts else 0)
            if self.experts.count() != rows:
                self.experts.clear()
                self.experts.addItems([""] * rows)
            for index in range(len(recipe.experts)):
                item = self.experts.item(index)
                item.setText(recipe.expert_label(index))
                item.setIcon(color_icon(recipe_edits.expert_color(recipe, index)))
            if recipe.shared_experts:
                shared_item = self.experts.item(len(recipe.experts))
                shared_item.setText("Shared expert")
                shared_item.setIcon(color_icon(SHARED_ROW_COLOR))
            if rows:
                self.experts.setCurrentRow(min(max(row, 0), rows - 1))
            index = self.current_expert
            selected = self._selected(recipe)
            self.tabs.setEnabled(selected is not None)
            self.tabs.setTabEnabled(2, index >= 0)  # test prompts belong to routed experts
            self.shared_row_help.setVisible(self.shared_selected)
            self.positive.set_prompts(selected.positive_prompts if selected else ())
            self.negative.set_prompts(selected.negative_prompts if selected else ())
            self.test.set_prompts(recipe.studio.experts[index].test_prompts if index >= 0 else ())
            for box, value in ((self.noise_scale, selected and selected.noise_scale),
                               (self.residual_scale, selected and selected.residual_scale)):
                box.setEnabled(selected is not None)
                box.setValue(value or 0.0)
            has_expert = index >= 0
            self.gate_mode.setCurrentText(recipe.gate_mode)
            self.gate_help.setText(GATE_MODE_HELP.get(recipe.gate_mode, "Unknown gate mode."))
            self.top_k.setValue(recipe.experts_per_token)
            self.dtype.setCurrentIndex(max(0, self.dtype.findData(recipe.canonical_dtype or "")))
            architecture = (recipe.architecture or "").lower()
            self.architecture.setCurrentIndex(max(0, self.architecture.findData(architecture)))
            self.architecture_help.setText(ARCHITECTURE_HELP.get(architecture, ""))
            self._refresh_shared_expert(recipe, architecture)
            problems = validate_recipe(recipe)
            mine = [p for p in problems if has_expert and p.field.startswith(f"experts.{index}.")]
            self.expert_problems.setText("\n".join(f"✗ {p.text}" for p in mine))
            settings_fields = ("gate_mode", "experts_per_token", "dtype", "architecture", "shared_experts")
            general = [p for p in problems if p.field in settings_fields or p.field == "experts"]
            self.settings_problems.setText("\n".join(f"✗ {p.text}" for p in general))
        finally:
            self._refreshing = False

    def _refresh_shared_expert(self, recipe: Recipe, architecture: str) -> None:
        self.shared_expert.clear()
        self.shared_expert.addItem("None", "")
        choices = {str(recipe.base_model): "The base model"}
        for index, expert in enumerate(recipe.experts):
            choices.setdefault(str(expert.source_model), f"{recipe.expert_label(index)}'s model")
        for reference, text in choices.items():
            if reference:
                self.shared_expert.addItem(f"{text}: {reference}", reference)
        current = str(recipe.shared_experts[0].source_model) if recipe.shared_experts else ""
        if current and self.shared_expert.findData(current) < 0:
            self.shared_expert.addItem(current, current)
        self.shared_expert.setCurrentIndex(max(0, self.shared_expert.findData(current)))
        # Offered where the architecture can hold one; a recipe that has one anyway keeps the choice to remove it.
        self.shared_expert.setEnabled(architecture in SHARED_EXPERT_ARCHITECTURES or bool(recipe.shared_experts))

    def _shared_expert_edited(self) -> None:
        if self._refreshing:
            return
        recipe = self.document.recipe
        reference = self.shared_expert.currentData() or ""
        current = recipe.shared_experts[0] if recipe.shared_experts else None
        if reference == (str(current.source_model) if current else ""):
            return
        # A new shared expert without prompts: always on, which is what a shared expert is mostly for.
        shared = (Expert(source_model=reference),) if reference else ()
        self.document.edit(recipe_edits.update_settings(recipe, shared_experts=shared), "Set the shared expert")

    def _edit_selected(self, text: str, merge_id: int = -1, **changes: object) -> None:
        """Apply changes to the selected routed expert or to the shared expert, as one undoable edit."""
        recipe = self.document.recipe
        index = self.current_expert
        if index >= 0:
            self.document.edit(recipe_edits.update_expert(recipe, index, **changes), text, merge_id)
        elif self.shared_selected:
            shared = recipe.shared_experts[0].model_copy(update=changes)
            self.document.edit(recipe_edits.update_settings(recipe, shared_experts=(shared,)), text, merge_id)

    def _set_expert_prompts(self, field: str, prompts: tuple[str, ...], text: str) -> None:
        self._edit_selected(text, **{field: prompts})

    def _set_scale(self, field: str, value: float) -> None:
        if self._refreshing:
            return
        selected = self._selected(self.document.recipe)
        scale = value or None
        if selected is not None and getattr(selected, field) != scale:
            # Steps of the spin box on one expert's scale undo as one edit.
            merge_id = SCALE_MERGE_ID + 2 * self.experts.currentRow() + (field == "residual_scale")
            self._edit_selected(f"Change the {field.replace('_', ' ')}", merge_id, **{field: scale})

    def _set_test_prompts(self, prompts: tuple[str, ...], text: str) -> None:
        index = self.current_expert
        if index >= 0:
            self.document.edit(recipe_edits.update_extras(self.document.recipe, index, test_prompts=prompts), text)

    def _settings_edited(self) -> None:
        if self._refreshing:
            return
        recipe = self.document.recipe
        dtype = self.dtype.currentData() or None
        if dtype == recipe.canonical_dtype:
            dtype = recipe.dtype  # keep the user's spelling (bf16) when the meaning is unchanged
        changed = recipe_edits.update_settings(
            recipe,
            gate_mode=self.gate_mode.currentText(),
            experts_per_token=self.top_k.value(),
            dtype=dtype,
            architecture=self.architecture.currentData() or None,
        )
        self.document.edit(changed, "Change router settings")
