"""The `calibrated` gate mode: each layer's router fitted as a linear classifier on prompt tokens.

A frankenMoE router is never trained; `hidden` gives each expert one mean vector. Yet the router
is a linear map over the MLP input, and the prompts are labelled examples: every token of expert
i's positive prompts should prefer i, and the tokens of its negative prompts should not. So per
layer we fit regularised multinomial logistic regression (no bias: Mixtral and Qwen routers have
none) on unit-normalised token states, starting from and pulled towards the `hidden_avg` gates so
that a handful of prompts cannot overfit, then scale the weights so that the router's softmax on
the prompts is confident but not one-hot. Deterministic: full-batch L-BFGS in float64 on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from app.core.sources import ModelSource

# The scale makes the router's mean top-1 probability on the prompts' tokens match how often its
# top-1 is right there (temperature scaling), so that a layer that routes less reliably also weighs
# less where layers disagree; bounded so that no router is ever near one-hot or near flat.
MAX_CONFIDENCE = 0.95
# Pull towards the starting gates, per token fitted: the more tokens, the more the data decides.
L2_PER_TOKEN = 1e-2
INIT_SCALE = 4.0
NEGATIVE_WEIGHT = 0.5
MAX_ITERATIONS = 100


@dataclass(frozen=True, slots=True)
class LabelledTokens:
    """One layer's router inputs with their labels.

    ``positive[n]`` is the expert token n belongs to, or -1; ``negative[n]`` the expert it must
    not go to, or -1. Every token has exactly one of the two.
    """

    states: torch.Tensor  # tokens x hidden
    positive: torch.Tensor  # tokens, long
    negative: torch.Tensor  # tokens, long


@dataclass(frozen=True, slots=True)
class LayerFit:
    weight: torch.Tensor  # experts x hidden, float32: the router weight to write
    train_accuracy: float  # share of positive tokens whose top-1 is their expert
    confidence: float  # mean top-1 probability on the positive tokens


def _token_weights(labels: LabelledTokens, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's positive tokens together weigh the same, however long its prompts are."""
    import torch

    positive_weight = torch.zeros(labels.positive.shape, dtype=torch.float64)
    negative_weight = torch.zeros(labels.negative.shape, dtype=torch.float64)
    for expert in range(num_experts):
        mine = labels.positive == expert
        if mine.any():
            positive_weight[mine] = 1.0 / (num_experts * int(mine.sum()))
        avoid = labels.negative == expert
        if avoid.any():
            negative_weight[avoid] = NEGATIVE_WEIGHT / (num_experts * int(avoid.sum()))
    return positive_weight, negative_weight


def fit_layer(
    labels: LabelledTokens,
    init: torch.Tensor,
    *,
    l2: float | None = None,
    target_confidence: float | None = None,
) -> LayerFit:
    """Fit one layer's router from labelled token states, starting from the `init` gate vectors.

    ``l2`` defaults to L2_PER_TOKEN divided by the number of tokens; ``target_confidence`` to the
    fit's accuracy on the positive tokens, within (1 + 1/experts) / 2 and MAX_CONFIDENCE.
    """
    import torch

    if l2 is None:
        l2 = L2_PER_TOKEN / max(1, labels.states.shape[0])

    # Progressive calibration fits from inside the probe's inference-mode forward pass.
    with torch.inference_mode(False), torch.enable_grad():
        labels = LabelledTokens(labels.states.clone(), labels.positive.clone(), labels.negative.clone())
        return _fit_layer(labels, init.clone(), l2, target_confidence)


def _fit_layer(labels: LabelledTokens, init: torch.Tensor, l2: float, target_confidence: float | None) -> LayerFit:
    import torch

    num_experts = init.shape[0]
    raw = labels.states.to(torch.float64)
    unit = raw / raw.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    start = init.to(torch.float64)
    start = INIT_SCALE * start / start.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    positive_weight, negative_weight = _token_weights(labels, num_experts)
    is_positive = labels.positive >= 0
    is_negative = labels.negative >= 0
    weight = start.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([weight], max_iter=MAX_ITERATIONS, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def loss_fn() -> torch.Tensor:
        optimiser.zero_grad()
        log_probs = torch.log_softmax(unit @ weight.T, dim=-1)
        loss = l2 / 2 * (weight - start).pow(2).sum()
        if is_positive.any():
            chosen = log_probs[is_positive].gather(1, labels.positive[is_positive, None]).squeeze(1)
            loss = loss - (positive_weight[is_positive] * chosen).sum()
        if is_negative.any():
            avoided = log_probs[is_negative].gather(1, labels.negative[is_negative, None]).squeeze(1).exp()
            loss = loss - (negative_weight[is_negative] * torch.log1p(-avoided.clamp(max=1 - 1e-12))).sum()
        loss.backward()
        return loss

    optimiser.step(loss_fn)
    fitted = weight.detach()
    if target_confidence is None:
        accuracy = (
            float(((raw[is_positive] @ fitted.T).argmax(dim=-1) == labels.positive[is_positive]).double().mean())
            if is_positive.any()
            else 0.0
        )
        target_confidence = min(MAX_CONFIDENCE, max(accuracy, (1 + 1 / num_experts) / 2))
    scale = _scale_for_confidence(fitted, raw[is_positive] if is_positive.any() else raw, target_confidence)
    router = fitted * scale
    with torch.no_grad():
        probabilities = torch.softmax(raw @ router.T, dim=-1)
        top = probabilities[is_positive].argmax(dim=-1)
        accuracy = float((top == labels.positive[is_positive]).double().mean()) if is_positive.any() else 0.0
        confidence = float(probabilities[is_positive].max(dim=-1).values.mean()) if is_positive.any() else 0.0
    return LayerFit(weight=router.float(), train_accuracy=accuracy, confidence=confidence)


def _scale_for_confidence(weight: torch.Tensor, states: torch.Tensor, target: float) -> float:
    """The factor that makes the mean top-1 softmax probability on the raw states equal target."""
    import torch

    logits = states @ weight.T

    def confidence(log_scale: float) -> float:
        return float(torch.softmax(logits * (10.0**log_scale), dim=-1).max(dim=-1).values.mean())

    low, high = -12.0, 12.0
    if confidence(high) < target:  # cannot get that confident: as decisive as it gets
        return 10.0**high
    for _ in range(60):
        middle = (low + high) / 2
        if confidence(middle) < target:
            low = middle
        else:
            high = middle
    return 10.0 ** ((low + high) / 2)


def label_tokens(
    layer_states: Sequence[torch.Tensor], positive_of: Sequence[int], negative_of: Sequence[int]
) -> LabelledTokens:
    """Stack prompts' token states (each tokens x hidden) with each prompt's label."""
    import torch

    states = torch.cat(list(layer_states))
    lengths = [s.shape[0] for s in layer_states]
    positive = torch.cat(
        [torch.full((n,), label, dtype=torch.long) for n, label in zip(lengths, positive_of, strict=True)]
    )
    negative = torch.cat(
        [torch.full((n,), label, dtype=torch.long) for n, label in zip(lengths, negative_of, strict=True)]
    )
    return LabelledTokens(states=states, positive=positive, negative=negative)


@dataclass(frozen=True, slots=True)
class PromptLabel:
    positive: int  # the expert this prompt belongs to, or -1
    negative: int  # the expert this prompt must not go to, or -1


@dataclass(frozen=True, slots=True)
class ExpertWeights:
    """Where one expert's MLP comes from, and the scale on its down projection."""

    source: ModelSource
    residual_scale: float | None = None


class ProgressiveCalibration:
    """Fits each layer's router on the router inputs of the MoE being built, layer after layer.

    Fitting every layer on the *base* model's states leaves later layers mis-calibrated: in the
    MoE, a layer's input comes through the experts chosen before it, not through the base's MLPs.
    So the base model is run once with each MLP replaced, as the pass reaches it, by the MoE block
    the merge will write: the router fitted just now on that layer's inputs, top-k of the experts'
    MLPs with renormalised weights, plus the always-on shared expert where there is one.
    """

    def __init__(
        self,
        experts: Sequence[ExpertWeights],
        shared: ExpertWeights | None,
        labels: Sequence[PromptLabel],
        experts_per_token: int,
        skip_tokens: int,
    ) -> None:
        self.experts = list(experts)
        self.shared = shared
        self.labels = list(labels)
        self.top_k = experts_per_token
        self.skip_tokens = skip_tokens
        self.fits: dict[int, LayerFit] = {}
        self._rows: list[int] = []

    def start_batch(self, prompt_indices: Sequence[int]) -> None:
        self._rows = list(prompt_indices)

    def before_mlp(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        lengths = mask.sum(dim=1).tolist()
        states = [hidden[row, : lengths[row]].float().cpu() for row in range(len(self._rows))]
        labels = [self.labels[index] for index in self._rows]
        self.fits[layer] = fit_layer_on_prompts(states, labels, len(self.experts), self.skip_tokens)

    def mlp_output(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        import torch

        router = self.fits[layer].weight.to(hidden.device)
        probabilities = torch.softmax(hidden.float() @ router.T, dim=-1)
        weights, chosen = probabilities.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        output = torch.zeros_like(hidden, dtype=torch.float32)
        for expert, source in enumerate(self.experts):
            gate = (weights * (chosen == expert)).sum(dim=-1, keepdim=True)
            if gate.any():
                output += gate * _mlp(source, layer, hidden)
        if self.shared is not None:
            output += _mlp(self.shared, layer, hidden)
        return output.to(hidden.dtype)


def fit_layer_on_prompts(
    states: Sequence[torch.Tensor], labels: Sequence[PromptLabel], num_experts: int, skip_tokens: int
) -> LayerFit:
    """Fit one layer's router on prompts' token states (each tokens x hidden), from hidden_avg gates."""
    import torch

    def mean_of(expert: int, negative: bool) -> torch.Tensor | None:
        rows = [
            state.mean(dim=0)
            for state, label in zip(states, labels, strict=True)
            if (label.negative if negative else label.positive) == expert
        ]
        return torch.stack(rows).mean(dim=0) if rows else None

    init = []
    for expert in range(num_experts):
        vector, avoid = mean_of(expert, negative=False), mean_of(expert, negative=True)
        if vector is None:
            raise ValueError(f"expert {expert} has no positive prompts to calibrate on")
        if avoid is not None:
            vector = vector - avoid
        init.append(vector / vector.norm().clamp(min=1e-8))
    tokens = label_tokens(
        [state[skip_tokens:] for state in states],
        [label.positive for label in labels],
        [label.negative for label in labels],
    )
    return fit_layer(tokens, torch.stack(init))


def _mlp(expert: ExpertWeights, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """The donor's SwiGLU MLP of that layer, as the merged model will hold it."""
    import torch.nn.functional as F

    def weight(projection: str) -> torch.Tensor:
        tensor = expert.source.read_tensor(f"model.layers.{layer}.mlp.{projection}_proj.weight")
        return tensor.to(hidden.device, hidden.dtype)

    down = weight("down")
    if expert.residual_scale is not None:
        down = down * expert.residual_scale
    return (F.silu(hidden @ weight("gate").T) * (hidden @ weight("up").T) @ down.T).float()
