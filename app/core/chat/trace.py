"""The routing trace: per token, the experts every MoE layer chose, and what the live panel shows.

The JSON Lines format (one object per token, in sequence order, prompt tokens included) is read by
other tools; README.md documents it, and :data:`TRACE_FIELDS` must only ever grow.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.core.problems import FrankenMoEError

TRACE_FIELDS = ("position", "token_id", "token", "generated", "layers", "experts", "weights", "probs")

# Distinct on light and dark backgrounds; used for experts a recipe gives no colour.
DEFAULT_COLORS = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#b07aa1",
    "#76b7b2",
    "#edc948",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)


@dataclass(frozen=True, slots=True)
class TokenRouting:
    """One token of a sequence and, for each MoE layer in order, its top-k experts and weights."""

    position: int
    token_id: int
    token: str
    generated: bool
    layers: tuple[int, ...]  # decoder layer index of each routed layer
    experts: tuple[tuple[int, ...], ...]  # per routed layer, top-k expert indices, best first
    weights: tuple[tuple[float, ...], ...]  # per routed layer, their weights
    probs: tuple[tuple[float, ...], ...]  # per routed layer, the full router distribution

    def top_expert(self, layer_slot: int | None = None) -> int:
        """The expert chosen first at one routed layer, or (None) the one most layers chose first.

        Ties go to the lower expert index, so the colour of a token never flickers.
        """
        if layer_slot is not None:
            return self.experts[layer_slot][0]
        firsts = [choice[0] for choice in self.experts]
        return int(np.bincount(firsts).argmax())

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "token_id": self.token_id,
            "token": self.token,
            "generated": self.generated,
            "layers": list(self.layers),
            "experts": [list(choice) for choice in self.experts],
            "weights": [[round(w, 6) for w in row] for row in self.weights],
            "probs": [[round(p, 6) for p in row] for row in self.probs],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenRouting:
        return cls(
            position=int(data["position"]),
            token_id=int(data["token_id"]),
            token=str(data["token"]),
            generated=bool(data["generated"]),
            layers=tuple(int(layer) for layer in data.get("layers", range(len(data["experts"])))),
            experts=tuple(tuple(int(e) for e in row) for row in data["experts"]),
            weights=tuple(tuple(float(w) for w in row) for row in data["weights"]),
            probs=tuple(tuple(float(p) for p in row) for row in data.get("probs", ())),
        )


def token_routings(
    first_position: int,
    token_ids: Sequence[int],
    token_texts: Sequence[str],
    generated: bool,
    layers: Sequence[int],
    probs: np.ndarray,
    experts: np.ndarray,
    weights: np.ndarray,
) -> list[TokenRouting]:
    """TokenRouting records from one step's arrays (tokens x layers x ...)."""
    layer_tuple = tuple(layers)
    probs_list, experts_list, weights_list = probs.tolist(), experts.tolist(), weights.tolist()
    return [
        TokenRouting(
            position=first_position + row,
            token_id=int(token_id),
            token=text,
            generated=generated,
            layers=layer_tuple,
            experts=tuple(tuple(choice) for choice in experts_list[row]),
            weights=tuple(tuple(choice) for choice in weights_list[row]),
            probs=tuple(tuple(dist) for dist in probs_list[row]),
        )
        for row, (token_id, text) in enumerate(zip(token_ids, token_texts, strict=True))
    ]


# --------------------------------------------------------------------------- files


def write_trace(tokens: Iterable[TokenRouting], path: Path) -> None:
    """The routing trace as JSON Lines, one token per line in sequence order."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for token in tokens:
            handle.write(json.dumps(token.to_json(), ensure_ascii=False) + "\n")


def read_trace(path: Path) -> list[TokenRouting]:
    tokens = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                tokens.append(TokenRouting.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                raise FrankenMoEError(
                    f"{path} line {number} is not a routing trace record ({exc})",
                    "open a .jsonl file written by FrankenMoE Studio",
                ) from exc
    return tokens


def trace_csv(tokens: Iterable[TokenRouting]) -> str:
    """One row per token and routed layer, one column per top-k rank: for spreadsheets."""
    rows = list(tokens)
    top_k = max((len(t.experts[0]) for t in rows if t.experts), default=0)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    ranks = [f"{name}_{rank + 1}" for rank in range(top_k) for name in ("expert", "weight")]
    writer.writerow(["position", "token_id", "token", "generated", "layer", *ranks])
    for token in rows:
        for layer, experts, weights in zip(token.layers, token.experts, token.weights, strict=True):
            pairs = [value for pair in zip(experts, weights, strict=True) for value in (pair[0], f"{pair[1]:.6f}")]
            writer.writerow([token.position, token.token_id, token.token, int(token.generated), layer, *pairs])
    return out.getvalue()


# --------------------------------------------------------------------------- the live panel's data


@dataclass(frozen=True, slots=True)
class ExpertLegend:
    labels: tuple[str, ...]
    colors: tuple[str, ...]

    @classmethod
    def default(cls, num_experts: int) -> ExpertLegend:
        return cls(
            labels=tuple(f"expert {i}" for i in range(num_experts)),
            colors=tuple(DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(num_experts)),
        )


def read_legend(folder: Path, num_experts: int) -> ExpertLegend:
    """Labels and colours from the merged folder's recipe, "expert i" and a palette where it has none."""
    from app.core.merge.pipeline import RECIPE_FILENAME
    from app.core.recipe import load_recipe

    legend = ExpertLegend.default(num_experts)
    recipe_path = Path(folder) / RECIPE_FILENAME
    if not recipe_path.is_file():
        return legend
    try:
        recipe = load_recipe(recipe_path)
    except FrankenMoEError:
        return legend  # a recipe we cannot read only costs the legend its names
    extras = recipe.studio.experts
    return ExpertLegend(
        labels=tuple(
            recipe.expert_label(i) if i < len(recipe.experts) else legend.labels[i] for i in range(num_experts)
        ),
        colors=tuple(
            (extras[i].color if i < len(extras) and extras[i].color else None) or legend.colors[i]
            for i in range(num_experts)
        ),
    )


def token_heatmap(token: TokenRouting, num_experts: int) -> np.ndarray:
    """Layers x experts: the weight each routed layer gave each expert it chose (0 for the others)."""
    grid = np.zeros((len(token.layers), num_experts))
    for slot, (experts, weights) in enumerate(zip(token.experts, token.weights, strict=True)):
        grid[slot, list(experts)] = weights
    return grid


class ExpertUsage:
    """Running expert usage, updated a token at a time while an answer streams in."""

    def __init__(self, layers: Sequence[int], num_experts: int) -> None:
        self.layers = tuple(layers)
        self.num_experts = num_experts
        self.selections = np.zeros((len(self.layers), num_experts), dtype=np.int64)  # top-k picks
        self.first_choices = np.zeros((len(self.layers), num_experts), dtype=np.int64)  # top-1 picks
        self.majority = np.zeros(num_experts, dtype=np.int64)  # tokens by the expert most layers chose
        self.tokens = 0

    def add(self, token: TokenRouting) -> None:
        for slot, experts in enumerate(token.experts):
            self.selections[slot, list(experts)] += 1
            self.first_choices[slot, experts[0]] += 1
        self.majority[token.top_expert()] += 1
        self.tokens += 1

    def add_all(self, tokens: Iterable[TokenRouting]) -> None:
        for token in tokens:
            self.add(token)

    def layer_shares(self) -> np.ndarray:
        """Layers x experts: the share of each layer's top-k picks that went to each expert."""
        totals = self.selections.sum(axis=1, keepdims=True)
        return np.divide(self.selections, totals, out=np.zeros(self.selections.shape), where=totals > 0)

    def token_shares(self) -> np.ndarray:
        """Per expert, the share of tokens whose most-chosen expert (over layers) it was."""
        return self.majority / self.tokens if self.tokens else np.zeros(self.num_experts)

    def to_csv(self, legend: ExpertLegend | None = None) -> str:
        """The usage table: one row per routed layer, then a row for the share of tokens."""
        legend = legend or ExpertLegend.default(self.num_experts)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["layer", *legend.labels])
        for layer, shares in zip(self.layers, self.layer_shares(), strict=True):
            writer.writerow([layer, *(f"{share:.6f}" for share in shares)])
        writer.writerow(["tokens", *(f"{share:.6f}" for share in self.token_shares())])
        return out.getvalue()
