"""Routing quality: do held-out prompts go to the expert they belong to?

Works on router weights laid out as layers x tokens x experts, whoever computed them (the gate
preview before a merge, or a merged model run through transformers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class PromptRouting:
    text: str
    intended_expert: int
    weights: np.ndarray  # layers x tokens x experts, router softmax

    @property
    def layer_choices(self) -> np.ndarray:
        """The top-1 expert of each layer for each token: layers x tokens."""
        return self.weights.argmax(axis=-1)

    def token_choices(self) -> np.ndarray:
        """Each token's expert by majority over layers; a tie goes to the larger mean router weight."""
        num_experts = self.weights.shape[-1]
        votes = (self.layer_choices[..., None] == np.arange(num_experts)).sum(axis=0)  # tokens x experts
        # Mean weights lie in [0, 1], so they only ever decide between equal vote counts.
        return (votes + self.weights.mean(axis=0) / 2).argmax(axis=-1)

    def prompt_choice(self) -> int:
        """The expert most of the prompt's tokens chose; a tie goes to the larger mean router weight."""
        num_experts = self.weights.shape[-1]
        votes = np.bincount(self.token_choices(), minlength=num_experts)
        return int((votes + self.weights.mean(axis=(0, 1)) / 2).argmax())


@dataclass(frozen=True, slots=True)
class RoutingQuality:
    prompt_share: float
    token_share: float  # majority over layers
    layer_token_share: tuple[float, ...]  # per layer
    usage: tuple[float, ...]  # share of (token, layer) top-1 choices each expert received
    prompts: int
    tokens: int

    def summary(self) -> str:
        return (
            f"{self.prompt_share:.0%} of {self.prompts} test prompts and {self.token_share:.0%} of their "
            f"{self.tokens} tokens go to the intended expert"
        )


def evaluate_routing(routings: Sequence[PromptRouting], num_experts: int) -> RoutingQuality:
    if not routings:
        return RoutingQuality(0.0, 0.0, (), tuple(0.0 for _ in range(num_experts)), 0, 0)
    num_layers = routings[0].weights.shape[0]
    prompts_right = sum(r.prompt_choice() == r.intended_expert for r in routings)
    tokens = sum(r.weights.shape[1] for r in routings)
    tokens_right = sum(int((r.token_choices() == r.intended_expert).sum()) for r in routings)
    per_layer = [
        sum(int((r.layer_choices[layer] == r.intended_expert).sum()) for r in routings) / max(tokens, 1)
        for layer in range(num_layers)
    ]
    counts = np.zeros(num_experts)
    for routing in routings:
        counts += np.bincount(routing.layer_choices.ravel(), minlength=num_experts)[:num_experts]
    usage = counts / max(counts.sum(), 1)
    return RoutingQuality(
        prompt_share=prompts_right / len(routings),
        token_share=tokens_right / max(tokens, 1),
        layer_token_share=tuple(per_layer),
        usage=tuple(float(u) for u in usage),
        prompts=len(routings),
        tokens=tokens,
    )


@dataclass(frozen=True, slots=True)
class MisroutedPrompt:
    text: str
    intended_expert: int
    chosen_expert: int  # the expert the prompt went to (PromptRouting.prompt_choice)
    intended_weight: float  # the intended expert's mean router weight over layers and tokens
    chosen_weight: float  # the chosen expert's

    @property
    def margin(self) -> float:
        return self.chosen_weight - self.intended_weight


def misrouted_prompts(routings: Sequence[PromptRouting]) -> list[MisroutedPrompt]:
    """The prompts that went to another expert than intended, worst first.

    Worst means the lowest mean router weight for the intended expert; equal weights put the
    larger margin to the chosen expert first.
    """
    misrouted = []
    for routing in routings:
        chosen = routing.prompt_choice()
        if chosen == routing.intended_expert:
            continue
        mean = routing.weights.mean(axis=(0, 1))
        misrouted.append(
            MisroutedPrompt(
                routing.text, routing.intended_expert, chosen, float(mean[routing.intended_expert]), float(mean[chosen])
            )
        )
    return sorted(misrouted, key=lambda m: (m.intended_weight, -m.margin))
