"""The auxiliary router losses: Switch load balancing (as transformers computes it) and the router z-loss.

:func:`load_balancing_loss` is the loss of transformers' ``load_balancing_loss_func`` (Mixtral,
Qwen2-MoE, Qwen3-MoE modelling code, no attention mask: packed sequences have no padding):
with ``f_i`` the share of top-k choices that went to expert ``i`` and ``P_i`` its mean router
probability, both over the tokens of every MoE layer together, the loss is ``num_experts * sum_i f_i P_i``
(``f`` summing to top-k, as there). It also returns ``f / top_k``, each expert's share of the routed
tokens, which the trainer reports as the expert load, so no second pass over the logits is needed.
Nothing here syncs with the host.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Switch load-balancing loss, expert load) from each MoE layer's router logits (tokens x experts).

    The expert load is a float32 tensor of ``num_experts`` shares of the routed tokens that sums to 1.
    """
    import torch

    device = router_logits[0].device
    choices = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probability_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = 0
    for logits in router_logits:
        logits = logits.reshape(-1, num_experts).to(device)
        # As transformers: softmax in the logits' own dtype, top-k of that, probabilities summed in float32.
        probabilities = torch.nn.functional.softmax(logits, dim=-1)
        _, selected = torch.topk(probabilities, top_k, dim=-1)
        flat = selected.reshape(-1)
        # Counts of whole numbers are exact in float32, so the order of the additions does not matter.
        choices = choices.index_add(0, flat, torch.ones(flat.shape, dtype=torch.float32, device=device))
        probability_sum = probability_sum + probabilities.float().sum(dim=0)
        rows += logits.shape[0]
    tokens_per_expert = choices / rows
    loss = torch.sum(tokens_per_expert * (probability_sum / rows)) * num_experts
    return loss, tokens_per_expert / top_k


def router_z_loss(router_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over tokens of logsumexp(logits)^2, averaged over the layers.

    It keeps the logits small, which keeps the softmax out of the range where rounding dominates.
    """
    import torch

    device = router_logits[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    for logits in router_logits:
        total = total + torch.logsumexp(logits.float().to(device), dim=-1).square().mean()
    return total / len(router_logits)


# Logits of this many elements at most exist at once in :func:`causal_lm_loss` (float32: 128 MiB).
LOSS_CHUNK_ELEMENTS = 2**25


def supports_chunked_loss(model: Any) -> bool:
    """Whether the model's logits are just its output head applied to its body's last hidden state."""
    config = model.config
    softcapped = getattr(config, "final_logit_softcapping", None) is not None
    scaled = getattr(config, "logit_scale", None) is not None
    return not softcapped and not scaled and hasattr(model, "model") and model.get_output_embeddings() is not None


def causal_lm_loss(model: Any, input_ids: torch.Tensor, chunk_elements: int = LOSS_CHUNK_ELEMENTS) -> torch.Tensor:
    """The mean next-token loss of transformers' ``labels=input_ids`` (no padding), without the full logits.

    The body runs as usual; the frozen output head and the cross-entropy run over chunks of positions,
    and each chunk's gradient with respect to the hidden states is computed right away (softmax minus
    one-hot, through the head's weight: the same products the backward pass would compute), so only one
    chunk's logits ever exist. With a vocabulary of 150k, batch 4 and 256 tokens, the float32 logits and
    their gradient would take 1.2 GB; here one chunk's 128 MiB do, at no extra computation. Falls back to
    the model's own loss where the logits are not just the head applied to the last hidden state.
    """
    if not supports_chunked_loss(model):
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    # Position t predicts token t + 1, as transformers shifts the labels.
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1).to(states.device)
    chunk = max(1, chunk_elements // int(head.weight.shape[0]))
    return _head_cross_entropy().apply(states, head.weight, head.bias, targets, chunk)


@functools.cache
def _head_cross_entropy() -> Any:
    """The autograd function of :func:`causal_lm_loss` (built on first use: torch is imported lazily)."""
    import torch

    class HeadCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx: Any, states: torch.Tensor, weight: torch.Tensor, bias: Any, targets: torch.Tensor, chunk: int
        ) -> torch.Tensor:
            count = targets.numel()
            total = torch.zeros((), dtype=torch.float32, device=states.device)
            gradient = torch.empty_like(states) if states.requires_grad else None
            for start in range(0, count, chunk):
                rows = slice(start, start + chunk)
                # As transformers: the logits in the model's dtype, the loss in float32.
                logits = torch.nn.functional.linear(states[rows], weight, bias).float()
                total += torch.nn.functional.cross_entropy(logits, targets[rows], reduction="sum")
                if gradient is not None:
                    # d(mean loss)/d(logits) = (softmax - one-hot) / count, then back through the head.
                    probabilities = torch.softmax(logits, dim=-1)
                    probabilities[torch.arange(probabilities.shape[0], device=logits.device), targets[rows]] -= 1
                    gradient[rows] = (probabilities / count).to(weight.dtype) @ weight
            ctx.save_for_backward(gradient if gradient is not None else states.new_empty(0))
            return total / count

        @staticmethod
        def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
            (gradient,) = ctx.saved_tensors
            return gradient * grad_output.to(gradient.dtype), None, None, None, None

    return HeadCrossEntropy
