"""Device and dtype choice, and how much memory there is to use."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from app.core.problems import FrankenMoEError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def resolve_device(name: str = "auto") -> str:
    """The torch device to use: the best available for "auto", checked otherwise."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"
    kind = name.split(":", 1)[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise FrankenMoEError("CUDA was asked for, but no CUDA GPU is available", "use --device cpu or auto")
        if ":" in name and int(name.split(":", 1)[1]) >= torch.cuda.device_count():
            raise FrankenMoEError(
                f"{name} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)",
                "use cuda:0 or auto",
            )
        return name
    if kind == "mps":
        if not _mps_available():
            raise FrankenMoEError("Apple MPS was asked for, but it is not available", "use --device cpu or auto")
        return name
    if kind == "cpu":
        return "cpu"
    raise FrankenMoEError(f"unknown device {name!r}", f"use one of {', '.join(DEVICE_CHOICES)}")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def compute_dtype(device: str, requested: str | None = None) -> torch.dtype:
    """The dtype to run a model in: as requested, else bfloat16 (or float16) on GPUs, float32 on CPUs."""
    import torch

    if requested:
        from app.core.recipe import DTYPE_ALIASES

        canonical = DTYPE_ALIASES.get(requested.lower())
        if canonical is None:
            raise FrankenMoEError(f"unknown dtype {requested!r}", "use bfloat16, float16 or float32")
        return getattr(torch, canonical)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.float32


def available_memory(device: str) -> int:
    """Bytes free for new tensors on the device (system RAM for the CPU)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_freed_tensors_to_the_os() -> None:
    """Have glibc give every allocation over 1 MiB its own mapping, unmapped when freed.

    Streaming runs through a model layer by layer, allocating and freeing tensors of a few MB each.
    glibc's default threshold for that grows to 32 MiB after the first frees, so such tensors come
    from the heap instead, which fragments and keeps growing with the number of layers; with this,
    peak memory stays one layer's worth whatever the depth. A no-op where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 1 << 20)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch's arithmetic on the calling thread alone, for the duration.

    For short work beside other threads: split over torch's thread pool, a few milliseconds' work
    costs far more wherever the cores are busy (on 2 shared cores, 300 ms against 6 ms for a
    3072 x 1024 LoRA weight) as the pool's threads wait on each other. torch.set_num_threads applies
    to the calling thread, and to threads that start using torch meanwhile, so the count is put back
    as soon as the work is done.
    """
    import torch

    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def torch_is_loading() -> bool:
    """Whether a thread is importing torch at this moment; never imports it, never waits for it.

    importlib marks a module's spec _initializing while the module's code runs, and reads that
    mark itself to tell a module being imported from one already imported (_find_and_load).
    """
    module = sys.modules.get("torch")
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def free_device_memory() -> None:
    """Hand the memory of freed tensors back to the GPU's driver (CUDA, MPS), for other programs and models.

    Reference cycles are collected first only where Python collects automatically (the CLI). The
    app turns that off and collects in its GUI thread instead (app/gui/garbage.py): a cycle holding
    a Qt object must never be freed in a worker, and a model is unloaded in one. A model's weights
    need no collection: they go with their last reference (tests/core/test_chat_loading.py).
    """
    import torch

    if gc.isenabled():
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()
