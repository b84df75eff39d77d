"""Mean next-token loss (NLL) and perplexity of models on datasets, one model in memory at a time.

Scoring rule (stated in every report, see :data:`SCORING`): each record is scored on its own, with no
packing across records, exactly as transformers computes the loss with ``labels=input_ids`` on the
tokenizer's default encoding (its BOS included, the BOS itself not predicted); chat records are the
model's chat template rendered to text and encoded without adding special tokens again; padding is
masked (left or right, positions counted from each record's first token); a record longer than the
model's context is cut to it. A dataset's figure is token-weighted: the summed NLL of all predicted
tokens over their count; perplexity is exp of that.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.core.eval.controls import RoutingOverride
from app.core.eval.data import EvalDataset
from app.core.progress import Job

SCORING = (
    "mean next-token negative log-likelihood per predicted token (nats), each record scored on its own "
    "(no packing) as transformers computes the loss with labels=input_ids on the tokenizer's default "
    "encoding (BOS included, BOS itself not predicted), chat records rendered with the model's chat "
    "template, padding masked, records cut to the model's context; dataset figures are token-weighted; "
    "ppl = exp(nll)"
)


@dataclass(frozen=True, slots=True)
class EvalModel:
    """A model to evaluate: ``name`` is "moe", "base" or the donor's source as written in the recipe."""

    name: str
    path: str  # a local folder or a Hub id already in the cache


@dataclass(frozen=True, slots=True)
class EvalRequest:
    """What to evaluate. Several overrides make a k sweep; they apply to MoE models only (dense models
    are scored once, with the default override)."""

    models: tuple[EvalModel, ...]
    datasets: tuple[EvalDataset, ...]
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    padding_side: str = "right"
    overrides: tuple[RoutingOverride, ...] = (RoutingOverride(),)
    trust_remote_code: bool = False


@dataclass(frozen=True, slots=True)
class NllResult:
    model: str
    dataset: str
    override: RoutingOverride
    nll: float
    ppl: float
    tokens: int

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dataset": self.dataset,
            "override": self.override.to_json(),
            "nll": self.nll,
            "ppl": self.ppl,
            "tokens": self.tokens,
        }


@dataclass
class EvalReport:
    scoring: str
    results: list[NllResult]
    # model name -> override label -> {"experts": labels, "datasets": {name: stats}, "confusion": {...}}
    routing: dict[str, Any] = field(default_factory=dict)
    lm_eval: dict[str, Any] | None = None
    models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The CLI's ``--json`` layout: scoring, models, datasets, results, routing, lm_eval."""
        return {
            "scoring": self.scoring,
            "models": list(self.models),
            "datasets": list(self.datasets),
            "results": [result.to_json() for result in self.results],
            "routing": self.routing,
            "lm_eval": self.lm_eval,
        }


@dataclass
class ModelScores:
    """What scoring one loaded model gives: a result per (dataset, override), and routing for an MoE."""

    results: list[NllResult]
    routing: dict[str, Any]  # override label -> routing section (empty for a dense model)


def score_loaded_model(
    model: Any,
    tokenizer: Any,
    datasets: Sequence[EvalDataset],
    *,
    model_name: str = "model",
    overrides: Sequence[RoutingOverride] = (RoutingOverride(),),
    batch_size: int = 8,
    padding_side: str = "right",
    expert_labels: tuple[str, ...] | None = None,
    cancel: threading.Event | None = None,
) -> Job[ModelScores]:
    """Score a model the app already has loaded (the chat's, for instance) on every dataset.

    A generator of Progress records (stage "scoring") returning :class:`ModelScores`; checks
    ``cancel`` between batches. Routing statistics come from the same forward pass.
    """
    raise NotImplementedError
    yield


def evaluate(request: EvalRequest, cancel: threading.Event | None = None) -> Job[EvalReport]:
    """Load each model in turn, score it on every dataset, free it; returns the :class:`EvalReport`.

    Yields Progress records like the merge ("loading <model>", "scoring <model>") and raises
    Cancelled between batches once ``cancel`` is set. Bad input raises FrankenMoEError before any
    model is loaded where it can be told beforehand (overrides on the first MoE found, empty datasets).
    """
    raise NotImplementedError
    yield
