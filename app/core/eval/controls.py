"""Runtime routing controls: experts per token (top-k) and switching experts off, without rewriting weights.

The override is a forward hook on each router, placed ahead of any other hook (the chat's capture
included, so that it sees the routing actually used). It masks the disabled experts' router logits
to -inf and recomputes the top-k choice and weights with the model's own rule (softmax in float32,
top-k, renormalised where the model renormalises). Leaving the context removes the hooks and puts
back every attribute it changed, so the model is exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.core.problems import FrankenMoEError

if TYPE_CHECKING:
    from app.core.chat.capture import RoutingRule


@dataclass(frozen=True, slots=True)
class RoutingOverride:
    """How to route instead of the model's config: ``top_k`` experts per token, ``disabled`` experts off.

    ``top_k=None`` keeps the model's own number of experts per token; an empty ``disabled`` keeps all.
    """

    top_k: int | None = None
    disabled: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        # Callers pass lists and sets too; a frozenset keeps the override hashable (a dict key in sweeps).
        object.__setattr__(self, "disabled", frozenset(int(i) for i in self.disabled))

    @property
    def is_default(self) -> bool:
        return self.top_k is None and not self.disabled

    def label(self) -> str:
        """A short name for tables and JSON keys, e.g. ``k=1, off: 0,2`` or ``default``."""
        parts = []
        if self.top_k is not None:
            parts.append(f"k={self.top_k}")
        if self.disabled:
            parts.append("off: " + ",".join(str(i) for i in sorted(self.disabled)))
        return ", ".join(parts) or "default"

    def to_json(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "disabled": sorted(self.disabled)}


def validate_override(override: RoutingOverride, num_experts: int) -> None:
    """Raise a FrankenMoEError naming the problem when the override cannot apply to a model with ``num_experts``."""
    if num_experts < 1:
        if override.is_default:
            return
        raise FrankenMoEError(
            "this model has no experts to route, so experts per token and switched-off experts do not apply",
            "evaluate it without --top-k and --disable-expert, or choose a mixture-of-experts model",
        )
    bad = sorted(i for i in override.disabled if not 0 <= i < num_experts)
    if bad:
        raise FrankenMoEError(
            f"expert {', '.join(str(i) for i in bad)} does not exist: this model has {num_experts} experts",
            f"switch off experts numbered 0 to {num_experts - 1}",
        )
    enabled = num_experts - len(override.disabled)
    if enabled < 1:
        raise FrankenMoEError(
            f"every one of the {num_experts} experts is switched off, so no expert is left to route tokens to",
            "leave at least one expert on",
        )
    if override.top_k is not None:
        if not 1 <= override.top_k <= num_experts:
            raise FrankenMoEError(
                f"{override.top_k} experts per token is not possible: this model has {num_experts} experts",
                f"choose between 1 and {num_experts} experts per token",
            )
        if override.top_k > enabled:
            raise FrankenMoEError(
                f"{override.top_k} experts per token is more than the {enabled} experts left switched on",
                f"choose at most {enabled} experts per token, or switch fewer experts off",
            )


def k_sweep(num_experts: int, disabled: frozenset[int] = frozenset()) -> tuple[RoutingOverride, ...]:
    """Overrides for every possible experts-per-token count, 1 up to the experts left switched on."""
    validate_override(RoutingOverride(disabled=disabled), num_experts)
    enabled = num_experts - len(disabled)
    return tuple(RoutingOverride(top_k=k, disabled=disabled) for k in range(1, enabled + 1))


def model_num_experts(model: Any) -> int:
    """The number of routed experts of a loaded model (0 for a dense model)."""
    from app.core.chat.capture import find_routers

    routers = find_routers(model)
    first = next(iter(routers.values()), None)
    return int(first.weight.shape[0]) if first is not None else 0


def overridden_rule(rule: RoutingRule, override: RoutingOverride) -> RoutingRule:
    """A RoutingRule (app.core.chat.capture) with the override's experts per token, for the chat's capture.

    The capture sees the masked logits already (the override's hook runs first); only its top-k
    count comes from the config, so a chat that changes k swaps its capture's rule for this one.
    """
    from dataclasses import replace

    return replace(rule, top_k=override.top_k) if override.top_k is not None else rule


@contextmanager
def routing_override(model: Any, override: RoutingOverride) -> Iterator[None]:
    """Route a loaded transformers MoE (Mixtral, Qwen2-MoE, Qwen3-MoE) as ``override`` says, in place.

    Validates first (FrankenMoEError for k < 1, k > experts, every expert off, an unknown expert).
    A default override changes nothing. Works under transformers 4 (the router is a Linear returning
    logits; the block's ``top_k`` decides) and 5 (the router returns logits, weights, indices).
    """
    num_experts = model_num_experts(model)
    validate_override(override, num_experts)
    if override.is_default:
        yield
        return
    from app.core.chat.capture import find_routers, routing_rule

    rule = routing_rule(model.config, num_experts)
    top_k = override.top_k if override.top_k is not None else rule.top_k
    disabled = sorted(override.disabled)
    handles = []
    restore: list[tuple[Any, str, Any]] = []
    try:
        for router in find_routers(model).values():
            hook = _override_hook(disabled, top_k, rule.renormalise)
            handles.append(router.register_forward_hook(hook, prepend=True))
            # transformers 4 takes k from the block around the router; 5 from the router itself.
            for owner in (router, *_blocks_of(model, router)):
                if hasattr(owner, "top_k"):
                    restore.append((owner, "top_k", owner.top_k))
                    owner.top_k = top_k
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, name, value in reversed(restore):
            setattr(owner, name, value)


def _blocks_of(model: Any, router: Any) -> list[Any]:
    return [module for module in model.modules() if getattr(module, "gate", None) is router]


def _override_hook(disabled: list[int], top_k: int, renormalise: bool) -> Any:
    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        import torch

        logits = output[0] if isinstance(output, tuple) else output
        masked = logits.clone()
        if disabled:
            masked[..., disabled] = float("-inf")
        if not isinstance(output, tuple):
            return masked  # transformers 4: the block does softmax and top-k with its (overridden) top_k
        probs = torch.softmax(masked.float(), dim=-1)
        weights, indices = torch.topk(probs, top_k, dim=-1)
        if renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (masked, weights.to(output[1].dtype), indices.to(output[2].dtype), *output[3:])

    return hook
