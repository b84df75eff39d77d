"""A model with a LoRA adapter merged in, one tensor at a time, exactly as PEFT's merge_and_unload does it.

Each changed weight is computed when it is read, in float32: ``W + (B @ A) * scale`` for a linear
layer, ``W + (B @ A).T * scale`` for an embedding, DoRA's ``m / ||W + ΔW||_row * (W + ΔW)``, or the
adapter's own copy for a module it saves whole. The operations are PEFT's, in PEFT's order, so a
float32 result equals merge_and_unload() of a float32 model bit for bit. Nothing else is held in
memory: the merge streams as it does for a full model.
"""

from __future__ import annotations

import threading
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

    def read_tensor_as(self, name: str, dtype: str) -> torch.Tensor:
        """A changed weight merged in float32, then cast; the float32 work is done in scratch buffers."""
        import torch

        delta = self._deltas.get(name)
        if delta is None:
            return super().read_tensor_as(name, dtype)
        merged = self._merged(delta, in_scratch=True)
        converted = merged.to(getattr(torch, dtype))
        return converted.clone() if converted is merged else converted

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

    def _read_weight(self, info: TensorInfo) -> torch.Tensor:
        """A weight widened to float32 into this thread's scratch buffer: valid until its next weight."""
        import torch

        numel = 1
        for size in info.shape:
            numel *= size
        staging = _scratch("staging", info.nbytes, torch.uint8)
        return self.read_info_into(info, _scratch("weight", numel, torch.float32).view(info.shape), staging)

    def _merged(self, delta: ModuleDelta, in_scratch: bool = False) -> torch.Tensor:
        """The merged weight in float32: fresh memory, or (in_scratch) this thread's buffer, valid until its next."""
        import torch

        if delta.kind == "replacement":
            assert delta.replacement is not None
            return self._read(delta.replacement)
        assert delta.a is not None and delta.b is not None
        # PEFT computes the delta in float32 on the CPU whatever the adapter's dtype (cast_to_fp32).
        a, b = self._read(delta.a), self._read(delta.b)
        if delta.kind == "embedding":
            change = (b @ a).T.contiguous()
        elif in_scratch:
            # The same matrix product as b @ a, written into the kept buffer instead of fresh pages.
            buffer = _scratch("change", b.shape[0] * a.shape[1], torch.float32).view(b.shape[0], a.shape[1])
            change = torch.matmul(b, a, out=buffer)
        else:
            change = b @ a
        # In place, the same multiplication by the same Python float as PEFT's (B @ A) * scaling.
        change.mul_(delta.scale)
        # Read as float32 straight away: adding a float32 W is faster than adding a bfloat16 one.
        widened = self._read_weight(delta.replacement or self.tensor_info(delta.target))
        if delta.magnitude is None:
            # W + ΔW, with ΔW's buffer reused: addition commutes exactly, so this is PEFT's W += ΔW.
            return change.add_(widened)
        # DoRA, as PEFT merges it: the row norms of W + ΔW (get_weight_norm with scaling 1), then
        # magnitude / norm times (W + ΔW).
        norm = torch.linalg.norm(widened + 1 * change, dim=1).to(widened.dtype)
        factor = self._read(delta.magnitude) / norm
        return factor.view(-1, 1) * (widened + change)


# Buffers kept from one weight to the next, one set per thread (the merge writes in one, the gates
# may read in another): allocating them afresh faults in new pages for every weight, which costs
# three times the arithmetic. Flat, so that the MLP's differently shaped weights share them.
_SCRATCH = threading.local()


def _scratch(kind: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    import torch

    buffers: dict[str, torch.Tensor] = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(kind)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        buffer = buffers[kind] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def open_adapted(ref: ModelRef, model_folder: Path, adapter_folder: Path) -> AdaptedModelSource:
    """The model with its adapter merged in; raises a FrankenMoEError for an adapter that cannot be applied."""
    info = read_adapter(adapter_folder)
    errors = [p for p in adapter_problems(info, model_folder, str(ref.model)) if p.is_error]
    if errors:
        raise FrankenMoEError(f"{ref}: {errors[0].message}", errors[0].hint)
    return AdaptedModelSource(model_folder, info, ref)
