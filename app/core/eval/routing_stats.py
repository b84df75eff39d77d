"""Routing statistics per dataset from the evaluation's own forward pass.

For each dataset: the share of (non-padding) tokens whose top-1 expert is each expert, per MoE
layer; the normalised entropy of that load per layer (1 = evenly spread, 0 = one expert takes all);
experts that are the top-1 choice of under 1 % of the tokens over all layers (flagged as dead);
and, across datasets, the dataset x expert confusion (mean top-1 share over layers), with the
dataset matched to an expert when it is named after one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEAD_SHARE = 0.01


@dataclass
class RoutingCounts:
    """Top-1 choices counted per layer and expert, accumulated batch by batch."""

    layers: tuple[int, ...]
    num_experts: int
    counts: np.ndarray = field(init=False)  # layers x experts
    tokens: int = 0

    def __post_init__(self) -> None:
        self.counts = np.zeros((len(self.layers), self.num_experts), dtype=np.int64)

    def add(self, top1: np.ndarray) -> None:
        """Add the top-1 expert of each token (tokens x layers)."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class DatasetRouting:
    dataset: str
    layers: tuple[int, ...]
    tokens: int
    top1_share: np.ndarray  # layers x experts
    entropy: tuple[float, ...]  # per layer, normalised to [0, 1]
    dead_experts: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError


def dataset_routing(dataset: str, counts: RoutingCounts) -> DatasetRouting:
    raise NotImplementedError


def confusion(routings: list[DatasetRouting], expert_labels: tuple[str, ...]) -> dict[str, Any]:
    """Dataset x expert mean top-1 share; datasets named after an expert label are marked as matched."""
    raise NotImplementedError
