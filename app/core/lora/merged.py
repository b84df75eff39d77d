"""A model with a LoRA adapter merged in, one tensor at a time, exactly as PEFT's merge_and_unload does it.

Each changed weight is computed when it is read, in float32: ``W + (B @ A) * scale`` for a linear
layer, ``W + (B @ A).T * scale`` for an embedding, DoRA's ``m / ||W + ΔW||_row * (W + ΔW)``, or the
adapter's own copy for a module it saves whole. The operations are PEFT's, in PEFT's order, so a
float32 result equals merge_and_unload() of a float32 model bit for bit. A linear weight cast to a
narrower dtype is computed a block of rows at a time (MergedRows), blocks the merge's workers
share out; each value is PEFT's float32 merge rounded once. Nothing else is held in memory: the
merge streams as it does for a full model.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace
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
        """A changed weight merged in float32, then cast, as the merge writes it, in fresh memory.

        A float32 LoRA linear weight (the MLP's) comes back in this thread's scratch buffer instead,
        valid until its next changed weight is read.
        """
        import torch

        delta = self._deltas.get(name)
        if delta is None:
            return super().read_tensor_as(name, dtype)
        target = getattr(torch, dtype)
        if delta.kind != "linear" or delta.magnitude is not None:
            return self._merged(delta).to(target)
        if target == torch.float32:
            return self._merged_linear_float32(delta, in_scratch=True)
        rows = MergedRows(self, delta, target)
        merged = torch.empty(rows.shape, dtype=target)
        for index, (start, end) in enumerate(rows.spans):
            merged[start:end].copy_(rows.compute(index))
        return merged

    def computes_in_blocks(self, name: str, dtype: str) -> bool:
        """A LoRA linear weight cast to a narrower dtype: the merge takes it as MergedRows."""
        delta = self._deltas.get(name)
        return delta is not None and delta.kind == "linear" and delta.magnitude is None and dtype != "float32"

    def merged_rows(self, name: str, dtype: str) -> MergedRows:
        """The weight, merged, as blocks of rows that threads compute side by side (see computes_in_blocks)."""
        import torch

        return MergedRows(self, self._deltas[name], getattr(torch, dtype))

    def read_tensor_into(self, name: str, target: torch.Tensor, staging: torch.Tensor | None = None) -> torch.Tensor:
        delta = self._deltas.get(name)
        if delta is None:
            return super().read_tensor_into(name, target, staging)
        merged = self._merged(delta, in_scratch=True)
        if tuple(target.shape) != tuple(merged.shape):
            raise ValueError(f"{name} is shaped {tuple(merged.shape)}, not {tuple(target.shape)}")
        return target.copy_(merged)

    def read_widened(self, info: TensorInfo) -> torch.Tensor:
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

    def _merged_linear_float32(self, delta: ModuleDelta, in_scratch: bool) -> torch.Tensor:
        """A LoRA linear weight, W + (B @ A) * scale in float32: PEFT's result bit for bit.

        B @ A is one product, exactly PEFT's; the widening of W, the scaling and the addition then go
        through it a block of rows at a time, while the block is in the cache. The result is in fresh
        memory, or (in_scratch) in this thread's buffer, valid until its next weight.
        """
        import torch

        assert delta.a is not None and delta.b is not None
        # PEFT computes the delta in float32 on the CPU whatever the adapter's dtype (cast_to_fp32).
        a, b = self.read_widened(delta.a), self.read_widened(delta.b)
        rows, columns = b.shape[0], a.shape[1]
        info = delta.replacement or self.tensor_info(delta.target)
        if in_scratch:
            # The same matrix product as b @ a, written into the kept buffer instead of fresh pages.
            merged = torch.matmul(b, a, out=_scratch("change", rows * columns, torch.float32).view(rows, columns))
        else:
            merged = b @ a
        blocks, most_rows = _blocks_of(rows, columns)
        widened = _scratch("widened", most_rows * columns, torch.float32)
        for start, end in blocks:
            _add_scaled(merged[start:end], self.read_rows(info, start, end), widened, delta.scale)
        return merged

    def read_rows(self, info: TensorInfo, start: int, end: int) -> torch.Tensor:
        """Rows start:end of a weight in its stored dtype, in this thread's scratch buffer (until its next read)."""
        import torch

        row_bytes = info.nbytes // info.shape[0]
        rows = replace(info, shape=(end - start, *info.shape[1:]), start=info.start + start * row_bytes)
        rows = replace(rows, end=rows.start + (end - start) * row_bytes)
        buffer = _scratch("stored", rows.nbytes, torch.uint8).view(getattr(torch, info.torch_dtype_name))
        return self.read_info_into(rows, buffer.view(rows.shape))

    def _merged(self, delta: ModuleDelta, in_scratch: bool = False) -> torch.Tensor:
        """The merged weight in float32, in fresh memory.

        With in_scratch, a LoRA linear weight comes in this thread's buffer instead, valid until its next.
        """
        import torch

        if delta.kind == "replacement":
            assert delta.replacement is not None
            return self.read_widened(delta.replacement)
        if delta.kind == "linear" and delta.magnitude is None:
            return self._merged_linear_float32(delta, in_scratch)
        assert delta.a is not None and delta.b is not None
        # PEFT computes the delta in float32 on the CPU whatever the adapter's dtype (cast_to_fp32).
        a, b = self.read_widened(delta.a), self.read_widened(delta.b)
        # An embedding's ΔW is (B @ A) transposed; DoRA's is a linear one.
        change = (b @ a).T.contiguous() if delta.kind == "embedding" else b @ a
        # In place, the same multiplication by the same Python float as PEFT's (B @ A) * scaling.
        change.mul_(delta.scale)
        widened = self._read_weight(delta.replacement or self.tensor_info(delta.target))
        if delta.magnitude is None:
            # W + ΔW, with ΔW's buffer reused: addition commutes exactly, so this is PEFT's W += ΔW.
            return change.add_(widened)
        # DoRA, as PEFT merges it: the row norms of W + ΔW (get_weight_norm with scaling 1), then
        # magnitude / norm times (W + ΔW).
        norm = torch.linalg.norm(widened + 1 * change, dim=1).to(widened.dtype)
        factor = self.read_widened(delta.magnitude) / norm
        return factor.view(-1, 1) * (widened + change)


class MergedRows:
    """A LoRA linear weight, W + (B @ A) * scale in float32 cast to dtype, in blocks of rows.

    Threads may compute different blocks at once (merge/ahead.py): A and B are read when this is
    made, and each block takes the calling thread's buffers. PEFT's float32 operations, in its order,
    on a block of rows while it is in the cache: W's rows are read and widened, B's rows times A,
    scaled and added, and the block is cast into the next of the thread's RESULT_BLOCKS result
    buffers. Nothing the size of the weight is held. With blocks of at least _MIN_BLOCK_ROWS rows
    the matrix library computes each value as it does in the whole product (checked on MKL and in
    the tests); where another library summed the rank's terms in another order, a value would move
    by float32 rounding, far below the output's step.
    """

    def __init__(self, source: AdaptedModelSource, delta: ModuleDelta, dtype: torch.dtype) -> None:
        assert delta.a is not None and delta.b is not None
        self._source, self._scale, self._dtype = source, delta.scale, dtype
        # PEFT computes the delta in float32 on the CPU whatever the adapter's dtype (cast_to_fp32).
        self._a, self._b = source.read_widened(delta.a), source.read_widened(delta.b)
        self.shape = (self._b.shape[0], self._a.shape[1])
        self._weight = delta.replacement or source.tensor_info(delta.target)
        self.spans, self._most_rows = _blocks_of(*self.shape)
        self.count = len(self.spans)
        self._one_product = _is_power_of_two(delta.scale)
        if self._one_product:
            # Scaling by a power of two changes exponents only, so B @ (A * scale) is (B @ A) * scale
            # exactly, and W + B @ (A * scale) in one product-and-add (the library adds its finished
            # sums to W, rounding once) is PEFT's W + (B @ A) * scale: a third less time.
            self._a.mul_(delta.scale)

    def compute(self, index: int) -> torch.Tensor:
        """Block ``index``, in one of this thread's result buffers: valid until it has computed RESULT_BLOCKS more."""
        import torch

        start, end = self.spans[index]
        shape = (end - start, self.shape[1])
        stored = self._source.read_rows(self._weight, start, end)
        widened = _scratch("widened", self._most_rows * self.shape[1], torch.float32)
        if self._one_product:
            block = widened[: stored.numel()].view(shape).copy_(stored)
            block.addmm_(self._b[start:end], self._a)
        else:
            change = _scratch("change", self._most_rows * self.shape[1], torch.float32)[: stored.numel()].view(shape)
            block = torch.matmul(self._b[start:end], self._a, out=change)
            _add_scaled(block, stored, widened, self._scale)
        return _next_result_buffer(block.numel(), self._dtype).view(shape).copy_(block)


# Buffers kept from one weight to the next, one set per thread (each of the merge's workers has its
# own, and the gates may read in another): allocating them afresh faults in new pages for every
# weight, which costs three times the arithmetic. Flat, so that the MLP's differently shaped weights
# share them.
_SCRATCH = threading.local()
# Values of a merged weight handled together: 2 MiB of float32 that stays in the cache from the
# product to the addition and the cast. On one thread, a 3072 x 1024 weight cast to bfloat16 takes
# 6.6 ms this way, reading included (the arithmetic alone 3.4 ms with a power-of-two scale, 5.7 ms
# without), against 12 ms for the whole product and then the blocks; 32 Ki-value blocks take twice
# as long (B @ A's per-call overhead on a few rows).
_BLOCK_ELEMENTS = 512 * 1024
# The fewest rows of B multiplied at once: MKL computes blocks of 1 to 3 rows by another route, whose
# float32 values differ from the whole product's in the last bit; from 4 rows on they are the same.
_MIN_BLOCK_ROWS = 16


# Result buffers per thread that take turns (merge/ahead.py lets a worker have as many blocks
# computed and not yet written): 8 blocks of 512 Ki values are a whole 3072 x 1024 weight, so a
# worker goes on with its next weight while the writer copies the tensors between.
RESULT_BLOCKS = 8


def _next_result_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    turn = (getattr(_SCRATCH, "result_turn", -1) + 1) % RESULT_BLOCKS
    _SCRATCH.result_turn = turn
    return _scratch(f"result{turn}", numel, dtype)


def _blocks_of(rows: int, columns: int) -> tuple[list[tuple[int, int]], int]:
    """A weight's blocks of rows, and the most rows one has (the remainder under _MIN_BLOCK_ROWS joins the last)."""
    step = max(_MIN_BLOCK_ROWS, _BLOCK_ELEMENTS // columns)
    return _row_blocks(rows, step), min(rows, step + _MIN_BLOCK_ROWS - 1)


def _row_blocks(rows: int, step: int) -> list[tuple[int, int]]:
    """(start, end) of blocks of step rows; a remainder under _MIN_BLOCK_ROWS joins the last block."""
    blocks = []
    start = 0
    while start < rows:
        end = rows if rows - (start + step) < _MIN_BLOCK_ROWS else start + step
        blocks.append((start, end))
        start = end
    return blocks


def _is_power_of_two(scale: float) -> bool:
    """1, 2, 0.5, 4, ...: the usual LoRA scales (lora_alpha = r, 2 r, r / 2, or rsLoRA with alpha = sqrt(r))."""
    return scale > 0 and math.frexp(scale)[0] == 0.5


def _add_scaled(change: torch.Tensor, stored: torch.Tensor, widened: torch.Tensor, scale: float) -> None:
    """change = change * scale + stored, in float32, in place: PEFT's (B @ A) * scaling, then W += ΔW."""
    import torch

    # The same multiplication by the same Python float as PEFT's; addition commutes exactly. W is
    # widened (exactly) into a kept buffer: adding it as it is stored would have torch allocate a
    # float32 copy for every block, and over 1 MiB each such copy faults in fresh pages
    # (return_freed_tensors_to_the_os).
    change.mul_(scale)
    change.add_(stored if stored.dtype == torch.float32 else widened[: stored.numel()].view(stored.shape).copy_(stored))


def forget_thread_buffers() -> None:
    """Free the calling thread's kept buffers: the merge's writer computes blocks too, and its thread goes on."""
    _SCRATCH.__dict__.clear()


def _scratch(kind: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    import torch

    buffers: dict[str, torch.Tensor] = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(kind)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        buffer = buffers[kind] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def open_adapted(ref: ModelRef, model_folder: Path, adapter_folder: Path) -> AdaptedModelSource:
    """The model with its adapter merged in; raises a FrankenMoEError for an adapter that cannot be applied."""
    info = read_adapter(adapter_folder, str(ref.lora))
    errors = [p for p in adapter_problems(info, model_folder, str(ref.model)) if p.is_error]
    if errors:
        raise FrankenMoEError(f"{ref}: {errors[0].message}", errors[0].hint)
    return AdaptedModelSource(model_folder, info, ref)
