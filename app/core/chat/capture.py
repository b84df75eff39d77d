"""Router capture: which experts every MoE layer chose for each token, and with what weight.

Forward hooks on each decoder layer's router keep a reference to its logits (no copy, no sync);
at the end of a forward step the logits of all layers are stacked, brought to the host with a single
device-to-host copy, and turned there into the router distribution, top-k experts and weights. The
rule is the model's own: softmax in float32, top-k, and the top-k weights renormalised when the
config says so (Mixtral always; Qwen-MoE per ``norm_topk_prob``).

Routers are found generically, by module path, so Mixtral, Qwen2-MoE (with its shared expert) and
Qwen3-MoE work alike, under transformers 4 (the router is an ``nn.Linear`` returning logits) and 5
(a router module returning ``(logits, top-k weights, top-k indices)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# Where each architecture keeps a decoder layer's router, relative to the layer.
ROUTER_PATHS = ("block_sparse_moe.gate", "mlp.gate")


@dataclass(frozen=True, slots=True)
class RoutingRule:
    """How router logits become expert choices, as the model itself computes them."""

    num_experts: int
    top_k: int
    renormalise: bool


@dataclass(frozen=True, slots=True)
class StepRouting:
    """Routing of the tokens of one forward step, on the host.

    Arrays are tokens x layers x ...: ``probs`` the full router softmax (experts), ``experts`` the
    top-k indices and ``weights`` their (renormalised where the model does) weights.
    """

    probs: np.ndarray
    experts: np.ndarray
    weights: np.ndarray


def decoder_layers(model: Any) -> Sequence[Any]:
    """The decoder layers of a causal LM, whatever the wrapper around them."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(body, "layers", None)
    if layers is None:
        return ()
    return list(layers)


def _router_of(layer: Any, hidden_size: int) -> Any | None:
    for path in ROUTER_PATHS:
        block_name, router_name = path.split(".")
        block = getattr(layer, block_name, None)
        router = getattr(block, router_name, None) if block is not None else None
        weight = getattr(router, "weight", None)
        # A router sits beside its experts and maps the hidden state to one logit per expert;
        # the experts check keeps a dense MLP's gate projection from passing for one.
        if hasattr(block, "experts") and weight is not None and weight.dim() == 2 and weight.shape[1] == hidden_size:
            return router
    return None


def find_routers(model: Any) -> dict[int, Any]:
    """Each MoE decoder layer's router module, by layer index (dense layers are absent)."""
    hidden = int(model.config.hidden_size)
    routers = {}
    for index, layer in enumerate(decoder_layers(model)):
        router = _router_of(layer, hidden)
        if router is not None:
            routers[index] = router
    return routers


def routing_rule(config: Any, num_experts: int) -> RoutingRule:
    top_k = int(getattr(config, "num_experts_per_tok", 0) or getattr(config, "moe_top_k", 0) or 1)
    # Mixtral has no such setting and always renormalises; Qwen-MoE models say which they do.
    renormalise = bool(getattr(config, "norm_topk_prob", True))
    return RoutingRule(num_experts=num_experts, top_k=min(top_k, num_experts), renormalise=renormalise)


def route_logits(logits: np.ndarray, rule: RoutingRule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Router distribution, top-k weights and top-k expert indices from float32 logits (... x experts)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = shifted / shifted.sum(axis=-1, keepdims=True)
    experts = np.argsort(-probs, axis=-1, kind="stable")[..., : rule.top_k]
    weights = np.take_along_axis(probs, experts, axis=-1)
    if rule.renormalise:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return probs, weights, experts


class RouterCapture:
    """Hooks on every router of a loaded model; collects one :class:`StepRouting` per forward step.

    Attach once per loaded model and leave attached: while ``enabled`` is false the hooks return at
    once. Not thread-safe: one generation at a time, which is how the chat worker runs.
    """

    def __init__(self, model: Any) -> None:
        routers = find_routers(model)
        self.layers: tuple[int, ...] = tuple(routers)
        first = next(iter(routers.values()), None)
        num_experts = int(first.weight.shape[0]) if first is not None else 0
        self.rule = routing_rule(model.config, num_experts)
        self.enabled = False
        self._logits: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = [
            router.register_forward_hook(self._make_hook(slot)) for slot, router in enumerate(routers.values())
        ]

    @property
    def is_moe(self) -> bool:
        return bool(self.layers)

    def _make_hook(self, slot: int) -> Any:
        def record(_module: Any, _inputs: Any, output: Any) -> None:
            if self.enabled:
                # transformers 5 routers return (logits, top-k weights, indices); 4's are nn.Linear.
                self._logits[slot] = output[0] if isinstance(output, tuple) else output

        return record

    def begin_step(self) -> None:
        self._logits = [None] * len(self.layers)

    def finish_step(self) -> StepRouting:
        """The routing of the step just run, brought to the host in one copy."""
        import torch

        missing = [self.layers[slot] for slot, logits in enumerate(self._logits) if logits is None]
        if missing:
            raise RuntimeError(f"router hooks of layers {missing} did not fire; capture was not enabled")
        experts = self.rule.num_experts
        # With device_map="auto" the layers may sit on different devices; gather them on the first.
        device = self._logits[0].device  # type: ignore[union-attr]
        stacked = torch.stack([t.reshape(-1, experts).to(device) for t in self._logits])  # type: ignore[union-attr]
        # The one device-to-host copy of the step. The few small operations after it run on the host,
        # where they cost microseconds, rather than as several more kernel launches on the device.
        logits = stacked.float().cpu().numpy().transpose(1, 0, 2)  # tokens x layers x experts
        self._logits = [None] * len(self.layers)
        probs, weights, top_experts = route_logits(logits, self.rule)
        return StepRouting(probs=probs, experts=top_experts, weights=weights)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
