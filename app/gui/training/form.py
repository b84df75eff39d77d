"""The Train routers page's choices: what text to train on, and the main settings with their defaults.

The defaults are those of :class:`app.core.training.settings.RouterTrainingSettings`, read from the
class itself so the page and the CLI can never disagree. Values the core refuses (a learning rate of 0,
say) go through unchanged: the core's checks word the message, the same one the CLI prints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtGui import QValidator
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.core.problems import FrankenMoEError
from app.gui.widgets import FileList, explanation

if TYPE_CHECKING:
    from app.core.training.settings import RouterTrainingSettings, TrainingData

DATA_FILTER = "Training text (*.txt *.jsonl *.parquet);;All files (*)"
BUDGET_STEPS, BUDGET_TOKENS = "Steps", "Tokens"
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOADS = ("full", "8bit", "4bit")
MAX_COUNT = 2_000_000_000


class RateSpinBox(QDoubleSpinBox):
    """A learning rate as people write it (0.001, 2e-05): no row of trailing zeros, any precision kept."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.setDecimals(12)  # what the box keeps; the text shows only the digits that matter
        self.setRange(0.0, 10.0)  # 0 is allowed, so that the core's check says why it cannot work
        self.setSingleStep(1e-4)
        self.setValue(value)

    def textFromValue(self, value: float) -> str:
        return f"{value:g}"

    def valueFromText(self, text: str) -> float:
        try:
            return float(text)
        except ValueError:
            return self.value()

    def validate(self, text: str, position: int) -> tuple[QValidator.State, str, int]:
        try:
            value = float(text)
        except ValueError:
            # Half-typed numbers ("1e-", "0.") may still become one.
            partial = text == "" or text.rstrip("eE-+.") != text
            return (QValidator.State.Intermediate if partial else QValidator.State.Invalid), text, position
        state = QValidator.State.Acceptable if 0 <= value <= self.maximum() else QValidator.State.Intermediate
        return state, text, position


def _spin(low: int, high: int, value: int, special: str = "") -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setValue(value)
    box.setSpecialValueText(special)
    return box


def _double(low: float, high: float, value: float, decimals: int, step: float) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setDecimals(decimals)
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setValue(value)
    return box


def _combo(choices: tuple[str, ...], value: str) -> QComboBox:
    box = QComboBox()
    box.addItems(list(choices))
    box.setCurrentText(value)
    return box


class TrainingForm(QWidget):
    """The data box and the settings box; :meth:`settings` and :meth:`data` read them for the core."""

    def __init__(self, device: str = "auto", dtype: str = "auto", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from app.core.training.settings import RouterTrainingSettings

        defaults = RouterTrainingSettings()

        self.data_files = FileList("Training text", DATA_FILTER)
        self.recipe_prompts = QCheckBox("Use the recipe's prompts")
        self.recipe_prompts.setToolTip("Each expert's positive prompts from the recipe saved beside the model.")
        self.hub_datasets = QLineEdit()
        self.hub_datasets.setPlaceholderText("Hub datasets, e.g. org/name:config/train (comma-separated)")
        self.held_out = FileList("Held-out text for the before/after loss", DATA_FILTER)

        self.budget_kind = _combo((BUDGET_STEPS, BUDGET_TOKENS), BUDGET_TOKENS if defaults.tokens else BUDGET_STEPS)
        self.budget = _spin(0, MAX_COUNT, defaults.steps or defaults.tokens or 0, "auto")
        self.budget.setToolTip("auto: a budget that trains a tiny model in about a minute on a laptop CPU.")
        self.seq_len = _spin(2, 1_048_576, defaults.seq_len)
        self.batch_size = _spin(1, 4096, defaults.batch_size)
        self.lr = RateSpinBox(defaults.lr)
        self.balance_coef = _double(0.0, 100.0, defaults.balance_coef, 4, 0.01)
        self.z_coef = _double(0.0, 100.0, defaults.z_coef, 4, 0.001)
        self.val_fraction = _double(0.0, 0.9, defaults.val_fraction, 2, 0.05)
        self.eval_every = _spin(1, MAX_COUNT, defaults.eval_every)
        self.checkpoint_every = _spin(0, MAX_COUNT, defaults.checkpoint_every, "off")
        self.checkpoint_every.setToolTip("Steps between checkpoints a stopped run can continue from.")
        self.seed = _spin(0, 2**31 - 1, defaults.seed)
        self.device = _combo(DEVICES, device if device in DEVICES else defaults.device)
        self.dtype = _combo(DTYPES, dtype if dtype in DTYPES else defaults.dtype)
        self.load = _combo(LOADS, defaults.load)
        self.load.setToolTip("8-bit and 4-bit loads need a CUDA GPU and bitsandbytes; the routers stay in float32.")

        data_box = QGroupBox("Training text")
        data_layout = QVBoxLayout(data_box)
        data_layout.addWidget(self.data_files)
        data_layout.addWidget(self.recipe_prompts)
        data_layout.addWidget(self.hub_datasets)
        data_layout.addWidget(
            explanation(
                "Text (a record per blank-line-separated block), JSONL (text, or messages through the chat template) "
                "or Parquet; records are packed into sequences with an end-of-text token between them."
            )
        )
        held_box = QGroupBox("Held-out text (optional)")
        held_layout = QVBoxLayout(held_box)
        held_layout.addWidget(self.held_out)
        held_layout.addWidget(
            explanation(
                "Scored under the old and the new routers after training, beside the recipe's test prompts. "
                "Keep it apart from the training text."
            )
        )

        settings_box = QGroupBox("Settings")
        form = QFormLayout(settings_box)
        budget_row = QHBoxLayout()
        budget_row.addWidget(self.budget_kind)
        budget_row.addWidget(self.budget, 1)
        form.addRow("Budget", budget_row)
        form.addRow("Sequence length", self.seq_len)
        form.addRow("Batch size", self.batch_size)
        form.addRow("Learning rate", self.lr)
        form.addRow("Balance loss weight", self.balance_coef)
        form.addRow("Router z-loss weight", self.z_coef)
        form.addRow("Validation share", self.val_fraction)
        form.addRow("Validate every", self.eval_every)
        form.addRow("Checkpoint every", self.checkpoint_every)
        form.addRow("Seed", self.seed)
        form.addRow("Device", self.device)
        form.addRow("Precision", self.dtype)
        form.addRow("Load", self.load)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for box in (data_box, settings_box, held_box):
            layout.addWidget(box)

    def set_recipe_available(self, available: bool) -> None:
        """A model with a recipe beside it starts with its prompts ticked; one without cannot use them."""
        if available != self.recipe_prompts.isEnabled():
            self.recipe_prompts.setChecked(available)
        self.recipe_prompts.setEnabled(available)

    def hub_dataset_ids(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.hub_datasets.text().replace(" ", ",").split(",") if part.strip())

    def data(self) -> TrainingData:
        from app.core.training.settings import TrainingData

        return TrainingData(
            files=tuple(self.data_files.paths()),
            recipe_prompts=self.recipe_prompts.isEnabled() and self.recipe_prompts.isChecked(),
            hub_datasets=self.hub_dataset_ids(),
        )

    def settings(self) -> RouterTrainingSettings:
        """The settings as the core takes them; raises FrankenMoEError for values its model refuses."""
        from pydantic import ValidationError

        from app.core.training.settings import RouterTrainingSettings

        budget = self.budget.value() or None
        by_tokens = self.budget_kind.currentText() == BUDGET_TOKENS
        try:
            return RouterTrainingSettings(
                steps=None if by_tokens else budget,
                tokens=budget if by_tokens else None,
                seq_len=self.seq_len.value(),
                batch_size=self.batch_size.value(),
                lr=self.lr.value(),
                balance_coef=self.balance_coef.value(),
                z_coef=self.z_coef.value(),
                val_fraction=self.val_fraction.value(),
                eval_every=self.eval_every.value(),
                checkpoint_every=self.checkpoint_every.value(),
                seed=self.seed.value(),
                device=self.device.currentText(),
                dtype=self.dtype.currentText(),
                load=self.load.currentText(),
            )
        except ValidationError as error:
            first = error.errors()[0]
            field = " ".join(str(part) for part in first["loc"]).replace("_", " ")
            raise FrankenMoEError(
                f"the {field} setting is not possible: {first['msg']}", "change it in the Settings box and start again"
            ) from None
