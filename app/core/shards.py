"""Streaming safetensors writer: shards planned up front, tensors written as they are produced.

Because every tensor's name, dtype and shape are known before the first byte is written, each
shard's header is written first and each tensor goes straight to disk; memory holds one tensor at
a time, never a whole shard. The index is written last, on a clean exit only.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from app.core.sources import SAFETENSORS_DTYPES, SAFETENSORS_INDEX, TORCH_TO_SAFETENSORS

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch name, e.g. "bfloat16"

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * SAFETENSORS_DTYPES[TORCH_TO_SAFETENSORS[self.dtype]][1]


@dataclass(frozen=True, slots=True)
class Shard:
    filename: str
    tensors: tuple[PlannedTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[Shard]:
    """Pack tensors in order into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return [Shard("model.safetensors", tuple(groups[0]))]
    count = len(groups)
    return [
        Shard(f"model-{index + 1:05d}-of-{count:05d}.safetensors", tuple(group))
        for index, group in enumerate(groups)
    ]


def _header_bytes(shard: Shard) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in shard.tensors:
        header[tensor.name] = {
            "dtype": TORCH_TO_SAFETENSORS[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data must start 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded


class ShardWriter:
    """Write planned shards in order into a folder. Tensors must arrive in plan order."""

    def __init__(self, folder: Path, shards: Sequence[Shard]) -> None:
        self.folder = folder
        self.shards = list(shards)
        self._queue = [
            (shard_index, tensor) for shard_index, s in enumerate(self.shards) for tensor in s.tensors
        ]
        self._position = 0
        self._open_shard = -1
        self._handle: BinaryIO | None = None
        self.bytes_written = 0

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def next_name(self) -> str | None:
        return self._queue[self._position][1].name if self._position < len(self._queue) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        if self._position >= len(self._queue):
            raise RuntimeError(f"tensor {name} was not planned")
        shard_index, planned = self._queue[self._position]
        if planned.name != name:
            raise RuntimeError(f"expected tensor {planned.name}, got {name}")
        if tuple(tensor.shape) != planned.shape or str(tensor.dtype).removeprefix("torch.") != planned.dtype:
            raise RuntimeError(
                f"tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"but {planned.shape} {planned.dtype} was planned"
            )
        if shard_index != self._open_shard:
            self._start_shard(shard_index)
        assert self._handle is not None
        data = tensor.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
        self._handle.write(memoryview(data))
        self.bytes_written += planned.nbytes
        self._position += 1

    def _start_shard(self, shard_index: int) -> None:
        self._close_handle()
        self._open_shard = shard_index
        self._handle = (self.folder / self.shards[shard_index].filename).open("wb")
        self._handle.write(_header_bytes(self.shards[shard_index]))

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            self._handle.close()
            self._handle = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._close_handle()
        if exc_type is not None:
            return
        if self._position != len(self._queue):
            raise RuntimeError(f"only {self._position} of {len(self._queue)} planned tensors were written")
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
            }
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
