"""Device and dtype choice on machines this one is not: CUDA and Apple MPS, present or absent."""

from __future__ import annotations

import pytest
import torch

from app.core.devices import compute_dtype, resolve_device
from app.core.problems import FrankenMoEError


@pytest.fixture
def machine(monkeypatch):
    """Pretend hardware: set cuda (a GPU count), bf16 and mps."""

    def pretend(cuda: int = 0, bf16: bool = True, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return pretend


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"), [(1, False, "cuda"), (2, True, "cuda"), (0, True, "mps"), (0, False, "cpu")]
)
def test_auto_takes_the_best_device_there_is(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert resolve_device("auto") == expected
    assert resolve_device("") == expected


def test_devices_asked_for_by_name(machine):
    machine(cuda=2, mps=True)
    assert resolve_device("CUDA") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("mps") == "mps"
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize(
    ("cuda", "name", "message", "hint"),
    [
        (0, "cuda", "CUDA was asked for, but no CUDA GPU is available", "use --device cpu or auto"),
        (0, "cuda:0", "CUDA was asked for, but no CUDA GPU is available", "use --device cpu or auto"),
        (2, "cuda:2", "cuda:2 does not exist; this machine has 2 CUDA device(s)", "use cuda:0 or auto"),
        (0, "mps", "Apple MPS was asked for, but it is not available", "use --device cpu or auto"),
        (0, "tpu", "unknown device 'tpu'", "use one of auto, cuda, mps, cpu"),
    ],
)
def test_a_device_that_is_not_there_is_one_clear_error(machine, cuda, name, message, hint):
    machine(cuda=cuda)
    with pytest.raises(FrankenMoEError) as caught:
        resolve_device(name)
    assert caught.value.message == message
    assert caught.value.hint == hint


@pytest.mark.parametrize(
    ("device", "bf16", "expected"),
    [
        ("cuda", True, torch.bfloat16),
        ("cuda:1", False, torch.float16),
        ("mps", True, torch.float16),
        ("cpu", True, torch.float32),
    ],
)
def test_compute_dtype_suits_the_device(machine, device, bf16, expected):
    machine(cuda=2, bf16=bf16, mps=True)
    assert compute_dtype(device) == expected


def test_a_requested_dtype_wins_and_an_unknown_one_is_refused(machine):
    machine(cuda=1)
    assert compute_dtype("cuda", "float32") == torch.float32
    assert compute_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(FrankenMoEError, match="unknown dtype 'int3'"):
        compute_dtype("cpu", "int3")
