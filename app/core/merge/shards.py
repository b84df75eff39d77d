"""Streaming safetensors writer: shards planned up front, tensors written as they are produced.

Because every tensor's name, dtype and shape are known before the first byte is written, each
shard's header is written first and each tensor goes straight to disk; memory holds one tensor at
a time, never a whole shard. The index is written last, on a clean exit only. Since every tensor's
place is known too, a later tensor copied from a file can be written into its place ahead of its
turn, while the one before it is not ready yet (write_ahead).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from app.core.problems import FrankenMoEError
from app.core.sources import SAFETENSORS_DTYPES, SAFETENSORS_INDEX, TORCH_TO_SAFETENSORS, ByteRange

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
        Shard(f"model-{index + 1:05d}-of-{count:05d}.safetensors", tuple(group)) for index, group in enumerate(groups)
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
    """Write planned shards in order into a folder. Tensors must arrive in plan order.

    Except that a tensor copied from a file may be written ahead of its turn (write_ahead), within
    the shard being written; its turn then passes it over (pass_written_ahead).
    """

    def __init__(self, folder: Path, shards: Sequence[Shard]) -> None:
        self.folder = folder
        self.shards = list(shards)
        self._queue = [(shard_index, tensor) for shard_index, s in enumerate(self.shards) for tensor in s.tensors]
        self._positions = {tensor.name: position for position, (_shard, tensor) in enumerate(self._queue)}
        self._headers = [_header_bytes(shard) for shard in self.shards]
        self._file_offsets = _file_offsets(self.shards, self._headers)
        self._written_ahead: set[int] = set()
        self._position = 0
        self._open_shard = -1
        self._handle: BinaryIO | None = None
        self.bytes_written = 0

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def next_name(self) -> str | None:
        return self._queue[self._position][1].name if self._position < len(self._queue) else None

    def write(self, name: str, data: torch.Tensor | ByteRange | Iterable[torch.Tensor]) -> None:
        """Write the next planned tensor: a tensor, a byte range copied file to file, or blocks of its rows in order."""
        if self._position >= len(self._queue):
            raise RuntimeError(f"tensor {name} was not planned")
        shard_index, planned = self._queue[self._position]
        if planned.name != name:
            raise RuntimeError(f"expected tensor {planned.name}, got {name}")
        if isinstance(data, ByteRange) and data.nbytes != planned.nbytes:
            raise RuntimeError(f"tensor {name} has {data.nbytes} bytes, {planned.nbytes} were planned")
        try:
            if shard_index != self._open_shard:
                self._start_shard(shard_index)
            assert self._handle is not None
            if isinstance(data, ByteRange):
                _copy_range(data, self._handle)
            elif _is_tensor(data):
                self._write_tensor(planned, data)
        except OSError as exc:
            raise write_error(self.folder, exc) from exc
        if not isinstance(data, ByteRange) and not _is_tensor(data):
            # Outside the try: a block's computation may fail reading its model, which is no write error.
            self._write_blocks(planned, data)
        self.bytes_written += planned.nbytes
        self._position += 1

    def write_ahead(self, name: str, data: ByteRange) -> bool:
        """Copy a later tensor into its place now; False, writing nothing, if it is not in the next tensor's shard.

        For the time the next tensor is not ready: the bytes land where they would in order, so
        the files are the same either way.
        """
        position = self._positions.get(name)
        if position is None or position <= self._position:
            raise RuntimeError(f"tensor {name} is not planned after {self.next_name()}")
        shard_index, planned = self._queue[position]
        if shard_index != self._queue[self._position][0]:
            return False
        if position in self._written_ahead:
            return True
        if data.nbytes != planned.nbytes:
            raise RuntimeError(f"tensor {name} has {data.nbytes} bytes, {planned.nbytes} were planned")
        try:
            if shard_index != self._open_shard:
                self._start_shard(shard_index)
            assert self._handle is not None
            _copy_range(data, self._handle, at=self._file_offsets[position])
        except OSError as exc:
            raise write_error(self.folder, exc) from exc
        self._written_ahead.add(position)
        self.bytes_written += planned.nbytes
        return True

    def pass_written_ahead(self) -> bool:
        """If the next planned tensor was written ahead, move past it and say so."""
        if self._position not in self._written_ahead:
            return False
        assert self._handle is not None
        self._handle.seek(self._queue[self._position][1].nbytes, os.SEEK_CUR)
        self._position += 1
        return True

    def _write_tensor(self, planned: PlannedTensor, tensor: torch.Tensor) -> None:
        name = planned.name
        if tuple(tensor.shape) != planned.shape or str(tensor.dtype).removeprefix("torch.") != planned.dtype:
            raise RuntimeError(
                f"tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"but {planned.shape} {planned.dtype} was planned"
            )
        self._write_bytes_of(tensor)

    def _write_blocks(self, planned: PlannedTensor, blocks: Iterable[torch.Tensor]) -> None:
        name, written = planned.name, 0
        for block in blocks:
            if tuple(block.shape[1:]) != planned.shape[1:] or str(block.dtype).removeprefix("torch.") != planned.dtype:
                raise RuntimeError(
                    f"tensor {name} came in a block of {tuple(block.shape)} {block.dtype}, "
                    f"but {planned.shape} {planned.dtype} was planned"
                )
            try:
                written += self._write_bytes_of(block)
            except OSError as exc:
                raise write_error(self.folder, exc) from exc
        if written != planned.nbytes:
            raise RuntimeError(f"tensor {name} came to {written} bytes, {planned.nbytes} were planned")

    def _write_bytes_of(self, tensor: torch.Tensor) -> int:
        import torch

        assert self._handle is not None
        data = tensor.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
        _write_all(self._handle, memoryview(data))
        return data.nbytes

    def _start_shard(self, shard_index: int) -> None:
        self._close_handle()
        self._open_shard = shard_index
        self._handle = (self.folder / self.shards[shard_index].filename).open("wb", buffering=0)
        _write_all(self._handle, memoryview(self._headers[shard_index]))

    def _close_handle(self) -> None:
        if self._handle is not None:
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
                "metadata": {
                    "total_size": self.total_bytes,
                    SAMPLE_HASHES_KEY: {s.filename: sample_sha256(self.folder / s.filename) for s in self.shards},
                },
                "weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
            }
            try:
                (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            except OSError as exc:
                raise write_error(self.folder, exc) from exc


def _file_offsets(shards: Sequence[Shard], headers: Sequence[bytes]) -> list[int]:
    """Where each planned tensor starts in its shard's file (after its header), in plan order."""
    offsets = []
    for shard, header in zip(shards, headers, strict=True):
        offset = len(header)
        for tensor in shard.tensors:
            offsets.append(offset)
            offset += tensor.nbytes
    return offsets


def _is_tensor(data: object) -> bool:
    import torch

    return isinstance(data, torch.Tensor)


# The index records a hash of each shard's first and last mebibyte: reading two mebibytes a shard is
# cheap even for a 100 GB model, and it tells a shard replaced or damaged since the merge from the one written.
SAMPLE_HASHES_KEY = "frankenmoe_sample_sha256"
SAMPLE_BYTES = 2**20


def sample_sha256(path: Path) -> str:
    """The sha256 of a file's first and last SAMPLE_BYTES (of the whole file, when it is smaller)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= 2 * SAMPLE_BYTES:
            digest.update(handle.read())
        else:
            digest.update(handle.read(SAMPLE_BYTES))
            handle.seek(size - SAMPLE_BYTES)
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


class WriteError(FrankenMoEError):
    """The merged model could not be written: a full disk, a lost drive, a read-only folder."""


def write_error(folder: Path, exc: OSError) -> WriteError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return WriteError(
            f"the disk filled up while writing the merged model into {folder.parent}",
            "free some space or choose an output folder on another disk, then merge again",
        )
    return WriteError(
        f"writing the merged model into {folder.parent} failed ({exc.strerror or exc})",
        "check that the output folder's disk is connected and writable, then merge again",
    )


_COPY_CHUNK = 16 * 2**20


def _copy_range(source: ByteRange, target: BinaryIO, at: int | None = None) -> None:
    """Copy a file's byte range to target: in the kernel where it can, through a buffer otherwise.

    Appended at target's position, or (at) written at that offset, leaving target's position as it was.
    """
    offset, left = source.start, source.nbytes
    with source.file.open("rb", buffering=0) as handle:
        if hasattr(os, "copy_file_range"):
            try:
                while left:
                    copied = os.copy_file_range(handle.fileno(), target.fileno(), left, offset, at)
                    if copied == 0:
                        raise OSError(errno.EIO, f"{source.file} ended early")
                    offset += copied
                    left -= copied
                    at = None if at is None else at + copied
            except OSError as exc:
                # Across file systems or where the kernel lacks it; the buffered copy goes on from here.
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        if not left:
            return
        buffer = bytearray(min(_COPY_CHUNK, left))
        handle.seek(offset)
        position = target.tell()
        if at is not None:
            target.seek(at)
        while left:
            read = handle.readinto(memoryview(buffer)[: min(left, len(buffer))])
            if not read:
                raise OSError(errno.EIO, f"{source.file} ended early")
            _write_all(target, memoryview(buffer)[:read])
            left -= read
        if at is not None:
            target.seek(position)


# Bytes handed to one write() call. In a LoRA merge, whose weights are computed on other threads as
# the writer writes, this decided the merge's speed: a 1.6 GB model took 3.4 s in 256 KiB writes and
# 4.4 s in 1 MiB writes (medians of 10, Linux, ext4, 2 cores); a whole 6 MiB weight in one write
# took twice as long as in 1 MiB writes even with nothing else running.
_WRITE_CHUNK = 256 * 2**10


def _write_all(target: BinaryIO, data: memoryview) -> None:
    """Write data in chunks of _WRITE_CHUNK; unbuffered writes may also take less than they are given."""
    data = data.cast("B")
    while data:
        written = target.write(data[:_WRITE_CHUNK])
        data = data[written:]
