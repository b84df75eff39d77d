"""How experts look everywhere in the chat: their colours and names, from the model's legend."""

from __future__ import annotations

from dataclasses import dataclass

from app.core.chat import ExpertLegend

SHARED_EXPERT_COLOR = "#999999"


@dataclass(frozen=True, slots=True)
class ExpertStyle:
    legend: ExpertLegend
    shared_expert: bool = False  # a Qwen2-MoE shared expert, run for every token

    def color(self, expert: int) -> str:
        colors = self.legend.colors or ExpertLegend.default(expert + 1).colors
        return colors[expert % len(colors)]

    def label(self, expert: int) -> str:
        return self.legend.labels[expert] if expert < len(self.legend.labels) else f"expert {expert}"

    def column_labels(self, num_experts: int) -> tuple[list[str], list[str]]:
        """Heatmap column labels and colours; the shared expert, if any, is the last column."""
        # Unnamed experts go by their number alone, which fits under a narrow column; the axis says "expert".
        labels = [self.label(e).removeprefix("expert ") for e in range(num_experts)]
        colors = [self.color(e) for e in range(num_experts)]
        if self.shared_expert:
            labels.append("shared")
            colors.append(SHARED_EXPERT_COLOR)
        return labels, colors
