"""The chat's routing controls: how many experts each token gets, and which experts are on.

Changes go to the chat worker at once and apply from the next token on, even mid-answer. A setting
that cannot route (every expert off, more experts per token than are on) is refused: the control
goes back and a message says why and what to do instead.
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QCheckBox, QFormLayout, QLabel, QSpinBox, QVBoxLayout, QWidget

from app.core.eval.controls import RoutingOverride, validate_override
from app.core.problems import FrankenMoEError
from app.gui.chat.style import ExpertStyle
from app.gui.context import describe_error
from app.gui.widgets import MessageLabel, color_icon, explanation


class ExpertControls(QWidget):
    override_changed = Signal(object)  # RoutingOverride, already validated

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.num_experts = 0
        self.model_top_k = 0
        self.override = RoutingOverride()
        self.top_k = QSpinBox()
        self.top_k.setRange(1, 1)
        self.top_k.valueChanged.connect(self._changed)
        self.model_default = explanation("")
        self.expert_boxes: list[QCheckBox] = []
        self.experts_layout = QVBoxLayout()
        self.message = MessageLabel()
        self.unavailable = explanation("Load a mixture-of-experts model to change its routing.")

        form = QFormLayout()
        form.addRow("Experts per token", self.top_k)
        form.addRow("", self.model_default)
        layout = QVBoxLayout(self)
        layout.addWidget(self.unavailable)
        layout.addLayout(form)
        layout.addWidget(QLabel("Experts on"))
        layout.addLayout(self.experts_layout)
        layout.addWidget(
            explanation(
                "Applied from the next token on, also to an answer being written; a switched-off expert's router "
                "score is masked, so its tokens go to the others. The weights are never changed."
            )
        )
        layout.addWidget(self.message)
        layout.addStretch(1)
        self.set_model(0, 0, None)

    def set_model(self, num_experts: int, top_k: int, style: ExpertStyle | None) -> None:
        """Controls for a newly loaded model (0 experts: none), back at the model's own routing."""
        self.num_experts, self.model_top_k = num_experts, top_k
        self.override = RoutingOverride()
        for box in self.expert_boxes:
            box.deleteLater()
        self.expert_boxes = []
        for expert in range(num_experts):
            box = QCheckBox(style.label(expert) if style is not None else f"expert {expert}")
            if style is not None:
                box.setIcon(color_icon(style.color(expert)))
            box.setChecked(True)
            box.toggled.connect(lambda _checked, box=box: self._changed(box))
            self.experts_layout.addWidget(box)
            self.expert_boxes.append(box)
        self.top_k.blockSignals(True)
        self.top_k.setRange(1, max(1, num_experts))
        self.top_k.setValue(max(1, top_k))
        self.top_k.blockSignals(False)
        self.top_k.setEnabled(num_experts > 0)
        self.unavailable.setVisible(num_experts == 0)
        self.model_default.setText(f"The model's own: {top_k}." if num_experts else "")
        self.message.clear()

    def wanted(self) -> RoutingOverride:
        disabled = frozenset(i for i, box in enumerate(self.expert_boxes) if not box.isChecked())
        k = self.top_k.value()
        return RoutingOverride(top_k=None if k == self.model_top_k else k, disabled=disabled)

    def _changed(self, changed: object = None) -> None:
        wanted = self.wanted()
        try:
            # With the model's own k spelled out: it too must not exceed the experts left on.
            validate_override(RoutingOverride(self.top_k.value(), wanted.disabled), self.num_experts)
        except FrankenMoEError as error:
            self._revert(changed)
            self.message.setText(
                f"✗ Not applied: {describe_error(error)}\nRouting stays: {self.describe(self.override)}."
            )
            return
        self.override = wanted
        self.message.setText("" if wanted.is_default else f"Routing now: {self.describe(wanted)}.")
        self.override_changed.emit(wanted)

    def _revert(self, changed: object) -> None:
        """Put back the control that asked for what cannot route."""
        if isinstance(changed, QCheckBox):
            changed.blockSignals(True)
            changed.setChecked(not changed.isChecked())
            changed.blockSignals(False)
        else:
            self.top_k.blockSignals(True)
            self.top_k.setValue(self.override.top_k or self.model_top_k)
            self.top_k.blockSignals(False)

    def describe(self, override: RoutingOverride) -> str:
        k = override.top_k or self.model_top_k
        parts = [f"{k} expert{'s' if k != 1 else ''} per token"]
        if override.disabled:
            names = [self.expert_boxes[i].text() for i in sorted(override.disabled)]
            parts.append("off: " + ", ".join(names))
        return "; ".join(parts)
