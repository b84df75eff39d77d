"""A model with a LoRA adapter merged in, one tensor at a time, exactly as PEFT's merge_and_unload does it.

Each changed weight is computed when it is read, in float32: ``W + (B @ A) * scale`` for a linear
layer, ``W + (B @ A).T * scale`` for an embedding, DoRA's ``m / ||W + ΔW||_row * (W + ΔW)``, or the
adapter's own copy for a module it saves whole. The operations are PEFT's, in PEFT's order, so a
float32 result equals merge_and_unload() of a float32 model bit for bit. Nothing else is held in
memory: the merge streams as it does for a full model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from app.core.lora.adapter import AdapterInfo, ModuleDelta, read_adapter
from app.core.lora.checks import adapter_problems
from app.core.problems import FrankenMoEError
from app.core.recipe import ModelRef
from app.core.sources import ByteRange, ModelSource, TensorInfo

if TYPE_CHECKING:
    import torch


class AdaptedModelSource(ModelSource):
    """A ModelSource whose weights the adapter changes are read merged (float32 before any cast)."""

    def __init__(self, folder: Path, adapter: AdapterInfo, ref: ModelRef | None = None) -> None:
        super().__init__(folder, ref)
        self.adapter = adapter
        self._deltas = {delta.target: delta for delta in adapter.deltas}

    def has_delta(self, name: str) -> bool:
        return name in self._deltas

    def byte_range(self, name: str) -> ByteRange:
        if name in self._deltas:
            raise ValueError(f"{name} is merged with the adapter {self.adapter.folder}; read it, do not copy it")
        return super().byte_range(name)

    def read_tensor(self, name: str) -> torch.Tensor:
        """A changed weight in float32 (the merge's own precision); any other in its stored dtype."""
        delta = self._deltas.get(name)
        if delta is None:
            return super().read_tensor(name)
        return self._merged(delta)

    def read_tensor_into(self, name: str, target: torch.Tensor, staging: torch.Tensor | None = None) -> torch.Tensor:
        delta = self._deltas.get(name)
        if delta is None:
            return super().read_tensor_into(name, target, staging)
        merged = self._merged(delta)
        if tuple(target.shape) != tuple(merged.shape):
            raise ValueError(f"{name} is shaped {tuple(merged.shape)}, not {tuple(target.shape)}")
        return target.copy_(merged)

    def _read(self, info: TensorInfo) -> torch.Tensor:
        """A tensor widened to float32 as it is read (exactly, from any float dtype)."""
        import torch

        return self.read_info_into(info, torch.empty(info.shape, dtype=torch.float32))

    def _merged(self, delta: ModuleDelta) -> torch.Tensor:
        import torch

        if delta.kind == "replacement":
            assert delta.replacement is not None
            return self._read(delta.replacement)
        assert delta.a is not None and delta.b is not None
        # PEFT computes the delta in float32 on the CPU whatever the adapter's dtype (cast_to_fp32).
        a, b = self._read(delta.a), self._read(delta.b)
        change = b @ a
        if delta.kind == "embedding":
            change = change.T.contiguous()
        # In place, the same multiplication by the same Python float as PEFT's (B @ A) * scaling.
        change.mul_(delta.scale)
        # Read as float32 straight away: adding a float32 W is faster than adding a bfloat16 one.
        widened = self._read(delta.replacement or self.tensor_info(delta.target))
        if delta.magnitude is None:
            # W + ΔW, with ΔW's buffer reused: addition commutes exactly, so this is PEFT's W += ΔW.
            return change.add_(widened)
        # DoRA, as PEFT merges it: the row norms of W + ΔW (get_weight_norm with scaling 1), then
        # magnitude / norm times (W + ΔW).
        norm = torch.linalg.norm(widened + 1 * change, dim=1).to(widened.dtype)
        factor = self._read(delta.magnitude) / norm
        return factor.view(-1, 1) * (widened + change)


def open_adapted(ref: ModelRef, model_folder: Path, adapter_folder: Path) -> AdaptedModelSource:
    """The model with its adapter merged in; raises a FrankenMoEError for an adapter that cannot be applied."""
    info = read_adapter(adapter_folder)
    errors = [p for p in adapter_problems(info, model_folder, str(ref.model)) if p.is_error]
    if errors:
        raise FrankenMoEError(f"{ref}: {errors[0].message}", errors[0].hint)
    return AdaptedModelSource(model_folder, info, ref)
