"""Model sources: a local folder or a downloaded Hub snapshot, read lazily from safetensors.

Tensors are read by offset straight from the files (no memory map, nothing unpickled), so reading
one layer costs one layer's worth of memory however large the model is.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, BinaryIO

from app.core.problems import FrankenMoEError
from app.core.recipe import ModelRef

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# safetensors dtype names -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
TORCH_TO_SAFETENSORS = {torch_name: st for st, (torch_name, _) in SAFETENSORS_DTYPES.items()}


class ModelSourceError(FrankenMoEError):
    """A model folder that cannot be used as it is."""


class ModelNotDownloaded(ModelSourceError):
    """A Hub model that is not in the local Hugging Face cache yet."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def torch_dtype_name(self) -> str:
        return SAFETENSORS_DTYPES[self.dtype][0]


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Where a tensor's bytes lie in a file: copied as they are when no conversion is needed."""

    file: Path
    start: int
    nbytes: int


# The safetensors library refuses headers past 100 MB; no real model comes near it.
MAX_SAFETENSORS_HEADER_BYTES = 100 * 2**20
# JSON files read whole from a model folder or the Hub. Real config.json and tokenizer_config.json
# files are kilobytes (a long chat template makes the latter a few hundred); real tokenizer.json
# files reach about 30 MB. Far past either, a file is damaged or hostile, and reading it whole could
# take gigabytes of memory.
MAX_CONFIG_JSON_BYTES = 16 * 2**20
MAX_TOKENIZER_JSON_BYTES = 256 * 2**20
_DAMAGED_HINT = "download or convert the model again; the file may be damaged or incomplete"


def read_json_file(path: Path, max_bytes: int = MAX_CONFIG_JSON_BYTES) -> Any:
    """A JSON file's data, refused unread when it is larger than any real model's file of its kind.

    Raises OSError or ValueError (UnicodeDecodeError and JSONDecodeError are ValueErrors), as
    json.loads(path.read_text()) would, so callers keep their own wording.
    """
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(
            f"it is {size / 2**20:.0f} MB, past the {max_bytes / 2**20:.0f} MB limit for {path.name}; "
            "no real model's file is that large"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header. Raises ModelSourceError for a truncated, corrupt or hostile file.

    Every offset is checked before anything reads through it, as the safetensors library does: each
    tensor's bytes lie inside the data section, match its shape and dtype, and overlap no other's.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_SAFETENSORS_HEADER_BYTES:
                raise ValueError(
                    f"its header length {header_len} is past the {MAX_SAFETENSORS_HEADER_BYTES // 2**20} MB limit"
                )
            header = json.loads(handle.read(header_len))
        size = path.stat().st_size
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{path} is not a readable safetensors file ({exc})", _DAMAGED_HINT) from exc
    if not isinstance(header, dict):
        raise ModelSourceError(
            f"{path} is not a safetensors file: its header is a JSON {type(header).__name__}, not an object",
            _DAMAGED_HINT,
        )
    data_start = 8 + header_len
    data_size = size - data_start
    if data_size < 0:
        raise ModelSourceError(f"{path} is truncated: it ends inside its header", _DAMAGED_HINT)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end, dtype, shape = _checked_entry(path, name, entry, data_size)
        tensors[name] = TensorInfo(
            name=name, dtype=dtype, shape=shape, file=path, start=data_start + start, end=data_start + end
        )
    previous: TensorInfo | None = None
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if previous is not None and info.start < previous.end:
            raise ModelSourceError(
                f"{path} is corrupt: tensors {previous.name} and {info.name} share bytes (overlapping data_offsets)",
                _DAMAGED_HINT,
            )
        previous = info
    return tensors


def _checked_entry(path: Path, name: str, entry: object, data_size: int) -> tuple[int, int, str, tuple[int, ...]]:
    """A header entry's (start, end, dtype, shape), each checked; offsets relative to the data section."""

    def corrupt(what: str) -> ModelSourceError:
        return ModelSourceError(f"{path} is corrupt: tensor {name} {what}", _DAMAGED_HINT)

    if not isinstance(entry, dict):
        raise corrupt("has no dtype, shape and data_offsets")
    offsets, dtype, shape = entry.get("data_offsets"), entry.get("dtype"), entry.get("shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(v) for v in offsets)):
        raise corrupt(f"has data_offsets {offsets!r}, not two byte offsets [start, end]")
    if not (isinstance(shape, list) and all(_is_count(v) for v in shape)):
        raise corrupt(f"has shape {shape!r}, not a list of sizes")
    if dtype not in SAFETENSORS_DTYPES:
        raise ModelSourceError(
            f"{path} stores tensor {name} as {dtype!r}, a dtype FrankenMoE Studio cannot merge "
            f"(it reads {', '.join(SAFETENSORS_DTYPES)})",
            "use an unquantized version of the model (BF16, F16 or F32 weights)",
        )
    start, end = offsets
    if start > end:
        raise corrupt(f"has data_offsets [{start}, {end}] that end before they start")
    if end > data_size:
        raise ModelSourceError(
            f"{path} is truncated: tensor {name} ends past the end of the file",
            "download the model again; the file is incomplete",
        )
    numel = 1
    for dim in shape:
        numel *= dim
    needed = numel * SAFETENSORS_DTYPES[dtype][1]
    if end - start != needed:
        raise corrupt(f"holds {end - start} bytes, but shape {shape} of {dtype} needs {needed}")
    return start, end, dtype, tuple(shape)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def resolve_model_dir(ref: ModelRef, cache_dir: Path | None = None) -> Path:
    """The folder holding a model: the local folder itself, or the Hub snapshot in the cache.

    A ``MODEL+ADAPTER`` reference is refused: its folder alone is not the model it names (open_model
    merges the adapter in).
    """
    if ref.lora is not None:
        raise ModelSourceError(
            f"{ref} is a model with a LoRA adapter, which FrankenMoE Studio merges only into a MoE's experts",
            f"use {ref.model} alone here, or merge the adapter into it first (PEFT's merge_and_unload) and use "
            "the merged folder",
        )
    return _resolved_folder(ref, cache_dir, adapter=False)


class ModelSource:
    """A model's config, tokenizer files and tensors, read lazily. Use as a context manager."""

    def __init__(self, folder: Path, ref: ModelRef | None = None) -> None:
        self.path = folder
        self.ref = ref or ModelRef(path=str(folder))
        self.config = _read_config(folder)
        self._tensors = _index_tensors(folder)
        self._handles: dict[Path, BinaryIO] = {}
        self._reading = threading.Lock()

    # -- description

    @property
    def family(self) -> str:
        return str(self.config.get("model_type", "unknown"))

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    @property
    def parameter_count(self) -> int:
        return sum(t.numel for t in self._tensors.values())

    @property
    def size_bytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())

    @property
    def dtype(self) -> str:
        """The dtype most of the weights are stored in, as a torch name."""
        by_bytes: Counter[str] = Counter()
        for info in self._tensors.values():
            by_bytes[info.torch_dtype_name] += info.nbytes
        return by_bytes.most_common(1)[0][0] if by_bytes else "unknown"

    def tokenizer_files(self) -> list[Path]:
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelSourceError(
                f"{self.ref} has no tensor {name}",
                "check that the model is complete and of the family its config.json names",
            ) from None

    # -- reading

    def byte_range(self, name: str) -> ByteRange:
        info = self.tensor_info(name)
        return ByteRange(info.file, info.start, info.nbytes)

    def read_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh CPU memory, in its stored dtype."""
        import torch

        info = self.tensor_info(name)
        return self.read_tensor_into(name, torch.empty(info.shape, dtype=getattr(torch, info.torch_dtype_name)))

    def read_tensor_into(self, name: str, target: torch.Tensor, staging: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into an existing one of its shape, converting to target's dtype and device.

        Reusing target (and, when the dtypes differ, a staging buffer of at least the stored size)
        layer after layer saves allocating and faulting in fresh pages for every layer's weights.
        """
        return self.read_info_into(self.tensor_info(name), target, staging)

    def read_tensor_as(self, name: str, dtype: str) -> torch.Tensor:
        """One tensor in fresh CPU memory, converted to a torch dtype (by name) as a merge writes it."""
        import torch

        return self.read_tensor(name).to(getattr(torch, dtype))

    def computes_in_blocks(self, name: str, dtype: str) -> bool:
        """Whether the merge takes the tensor in blocks of rows (a merged LoRA weight: lora/merged.py)."""
        return False

    def has_delta(self, name: str) -> bool:
        """Whether the tensor is computed (a LoRA adapter merged in) rather than stored as it is read."""
        return False

    def read_info_into(
        self, info: TensorInfo, target: torch.Tensor, staging: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Read the tensor ``info`` describes (in this model's files or another's) into target; see read_tensor_into."""
        import torch

        name = info.name
        if tuple(target.shape) != info.shape:
            raise ValueError(f"{name} is shaped {info.shape}, not {tuple(target.shape)}")
        stored = getattr(torch, info.torch_dtype_name)
        direct = target.dtype == stored and target.device.type == "cpu" and target.is_contiguous()
        if direct:
            raw = target.view(-1).view(torch.uint8)
        else:
            if staging is None or staging.numel() < info.nbytes:
                staging = torch.empty(info.nbytes, dtype=torch.uint8)
            raw = staging[: info.nbytes]
        with self._reading:  # the merge's workers and the gates may read one model at once
            handle = self._handle(info.file)
            handle.seek(info.start)
            complete = handle.readinto(raw.numpy()) == info.nbytes
        if not complete:
            raise ModelSourceError(f"{info.file} ended early while reading {name}", "download the model again")
        if not direct:
            target.copy_(raw.view(stored).reshape(info.shape))
        return target

    def _handle(self, file: Path) -> BinaryIO:
        if file not in self._handles:
            self._handles[file] = file.open("rb", buffering=0)
        return self._handles[file]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> ModelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelSource({self.ref}, family={self.family}, tensors={len(self._tensors)})"


def open_model(ref: ModelRef, cache_dir: Path | None = None) -> ModelSource:
    """The model a reference names; with an adapter (``MODEL+ADAPTER``), the model with it merged in.

    Raises a FrankenMoEError naming the first error of the adapter's checks (adapter_problems).
    """
    if ref.lora is None:
        return ModelSource(resolve_model_dir(ref, cache_dir), ref)
    from app.core.lora.merged import open_adapted

    return open_adapted(ref, resolve_model_dir(ref.model, cache_dir), resolve_adapter_dir(ref.lora, cache_dir))


def resolve_adapter_dir(ref: ModelRef, cache_dir: Path | None = None) -> Path:
    """The folder holding an adapter: the local folder itself, or its Hub snapshot in the cache."""
    return _resolved_folder(ref, cache_dir, adapter=True)


def _resolved_folder(ref: ModelRef, cache_dir: Path | None, *, adapter: bool) -> Path:
    what = "adapter" if adapter else "model"
    if ref.is_local:
        folder = Path(os.path.expanduser(ref.path))
        if not folder.is_dir():
            raise ModelSourceError(
                f"the {what} folder {folder} does not exist",
                "check the path after the '+', or give a Hub id such as org/adapter"
                if adapter
                else "check the path, or give a Hub id such as org/name",
            )
        return folder
    from dataclasses import replace

    from app.core.hub.config import HubConfig
    from app.core.hub.files import cached_adapter_snapshot, cached_snapshot

    config = HubConfig.current()
    if cache_dir is not None:
        config = replace(config, cache_dir=Path(cache_dir))
    try:
        snapshot = (cached_adapter_snapshot if adapter else cached_snapshot)(ref, config)
    except ValueError as exc:  # malformed repo id
        raise ModelSourceError(
            f"{ref.path!r} is neither a local {'adapter ' if adapter else ''}folder nor a Hub id ({exc})",
            "give an existing folder, or a Hub id written as org/name",
        ) from exc
    if snapshot is None:
        raise ModelNotDownloaded(
            f"the Hub {what} {ref} is not downloaded yet",
            f"download it first: frankenmoe hub download {ref}",
        )
    return snapshot


def _read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(
            f"{folder} has no config.json, so it is not a transformers model folder",
            "point at the folder that holds config.json and the .safetensors files",
        )
    try:
        config = read_json_file(config_path)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{config_path} is not valid JSON ({exc})", "repair or re-download it") from exc
    if not isinstance(config, Mapping):
        raise ModelSourceError(f"{config_path} is not a JSON object", "repair or re-download it")
    return dict(config)


def _index_tensors(folder: Path) -> dict[str, TensorInfo]:
    index_path = folder / SAFETENSORS_INDEX
    if index_path.is_file():
        try:
            weight_map = read_json_file(index_path)["weight_map"]
            if not isinstance(weight_map, Mapping) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("its weight_map is not a mapping of tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelSourceError(f"{index_path} is malformed ({exc})", "re-download the model") from exc
        outside = sorted({name for name in weight_map.values() if not _names_a_file_inside(name)})
        if outside:
            raise ModelSourceError(
                f"{index_path} names weight file(s) outside the model folder ({', '.join(outside[:3])}), "
                "which are not read",
                "use a model whose index lists only its own .safetensors files; re-download it from a source you trust",
            )
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelSourceError(
                f"{folder} is missing shard(s) {', '.join(missing)} listed in {SAFETENSORS_INDEX}",
                "finish the download, or download the model again",
            )
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise ModelSourceError(
                f"{folder} has only pickle checkpoints ({', '.join(pickled[:3])}); loading them could run "
                "arbitrary code, so FrankenMoE Studio never unpickles files",
                "use a safetensors version of the model (many Hub repos have one), or convert it yourself "
                "with a trusted tool and save it with safe_serialization=True",
            )
        raise ModelSourceError(
            f"{folder} has no .safetensors weights",
            "point at a folder that holds the model's .safetensors files",
        )
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        tensors.update(read_safetensors_header(file))
    return tensors


def _names_a_file_inside(name: str) -> bool:
    """Whether an index's file name stays inside the model folder, judged by the name alone.

    Judged by name, not by resolving: the Hugging Face cache makes every snapshot file a symlink
    into its blobs folder, so resolved shards always lie outside the snapshot.
    """
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    return bool(name) and not (
        posix.is_absolute() or windows.anchor or ".." in posix.parts or ".." in windows.parts or "\0" in name
    )


def iter_layer_tensors(source: ModelSource, layer: int) -> Iterator[TensorInfo]:
    prefix = f"model.layers.{layer}."
    for name in source.tensor_names:
        if name.startswith(prefix):
            yield source.tensor_info(name)
