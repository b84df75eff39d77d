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
        for slot in range(top1.shape[1]):
            self.counts[slot] += np.bincount(top1[:, slot], minlength=self.num_experts)[: self.num_experts]
        self.tokens += int(top1.shape[0])


@dataclass(frozen=True, slots=True)
class DatasetRouting:
    dataset: str
    layers: tuple[int, ...]
    tokens: int
    top1_share: np.ndarray  # layers x experts
    entropy: tuple[float, ...]  # per layer, normalised to [0, 1]
    dead_experts: tuple[int, ...]

    @property
    def expert_share(self) -> np.ndarray:
        """Each expert's top-1 share over all layers together."""
        return self.top1_share.mean(axis=0) if len(self.layers) else np.zeros(self.top1_share.shape[-1])

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "layers": list(self.layers),
            "top1_share": [[float(v) for v in row] for row in self.top1_share],
            "expert_share": [float(v) for v in self.expert_share],
            "entropy": list(self.entropy),
            "dead_experts": list(self.dead_experts),
        }


def dataset_routing(dataset: str, counts: RoutingCounts) -> DatasetRouting:
    totals = counts.counts.sum(axis=1, keepdims=True)
    share = counts.counts / np.maximum(totals, 1)
    entropy = []
    for row in share:
        nonzero = row[row > 0]
        raw = float(-(nonzero * np.log(nonzero)).sum())
        entropy.append(raw / float(np.log(counts.num_experts)) if counts.num_experts > 1 else 0.0)
    overall = share.mean(axis=0) if len(counts.layers) else np.zeros(counts.num_experts)
    dead = tuple(int(i) for i in np.flatnonzero(overall < DEAD_SHARE)) if counts.tokens else ()
    return DatasetRouting(
        dataset=dataset,
        layers=counts.layers,
        tokens=counts.tokens,
        top1_share=share,
        entropy=tuple(entropy),
        dead_experts=dead,
    )


def confusion(routings: list[DatasetRouting], expert_labels: tuple[str, ...]) -> dict[str, Any]:
    """Dataset x expert mean top-1 share; datasets named after an expert label are marked as matched.

    ``matched`` maps a dataset to its expert's index; ``accuracy`` is the mean share the matched
    datasets give their own expert (None when no dataset is named after an expert).
    """
    wanted = {label.casefold(): index for index, label in enumerate(expert_labels)}
    matched = {r.dataset: wanted[r.dataset.casefold()] for r in routings if r.dataset.casefold() in wanted}
    own = [float(r.expert_share[matched[r.dataset]]) for r in routings if r.dataset in matched]
    return {
        "datasets": [r.dataset for r in routings],
        "experts": list(expert_labels),
        "shares": [[float(v) for v in r.expert_share] for r in routings],
        "matched": matched,
        "accuracy": sum(own) / len(own) if own else None,
    }
