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

from collections.abc import Sequence
from typing import TYPE_CHECKING

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
