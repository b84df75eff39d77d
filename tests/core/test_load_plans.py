"""Load plans on a machine with a CUDA GPU, pretended: 8-bit, 4-bit and spread loading, what each
needs and why it cannot be used; and the CLI's --load turned into that plan."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from app.cli.main import run_cli
from app.core.chat import LoadMode, LoadRequest, plan_load

GPU_FREE = 6 * 10**9


@pytest.fixture(scope="module")
def moe(tiny_mixtral):
    return tiny_mixtral


@pytest.fixture
def one_gpu(monkeypatch):
    """One CUDA GPU with GPU_FREE bytes free and bfloat16 support, as torch would report it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (GPU_FREE, 2 * GPU_FREE))


def missing(*modules: str) -> str:
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"needs {' and '.join(absent)}, which is not installed" if absent else ""


def test_quantised_and_spread_plans_on_a_gpu(moe, one_gpu):
    full = plan_load(LoadRequest(str(moe), device="auto"))
    assert (full.chosen.mode, full.chosen.device, full.chosen.dtype) == (LoadMode.FULL, "cuda", "bfloat16")
    assert full.chosen.available == GPU_FREE and full.fits

    eight = plan_load(LoadRequest(str(moe), mode=LoadMode.INT8))
    four = plan_load(LoadRequest(str(moe), mode=LoadMode.INT4))
    spread = plan_load(LoadRequest(str(moe), mode=LoadMode.SPREAD))
    for plan, mode in ((eight, LoadMode.INT8), (four, LoadMode.INT4)):
        assert (plan.chosen.mode, plan.chosen.device, plan.chosen.dtype) == (mode, "cuda", "bfloat16")
        assert plan.chosen.available == GPU_FREE
        assert plan.chosen.unavailable == missing("bitsandbytes", "accelerate")
    # Fewer bits, less memory: the quantised layers shrink, everything else stays in bfloat16.
    assert four.chosen.needed < eight.chosen.needed < full.chosen.needed
    assert (spread.chosen.mode, spread.chosen.device, spread.chosen.dtype) == (LoadMode.SPREAD, "auto", "bfloat16")
    assert spread.chosen.available > GPU_FREE  # the GPU's free memory and the CPU's
    assert spread.chosen.unavailable == missing("accelerate")
    assert "in 8 bits on cuda" in eight.message() and "in 4 bits on cuda" in four.message()
    assert "spread over the GPUs and the CPU in bfloat16" in spread.message()


def test_a_gpu_too_small_for_the_model_offers_the_cpu(moe, one_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**6, 2 * GPU_FREE))
    plan = plan_load(LoadRequest(str(moe), device="cuda"))
    assert not plan.fits and plan.chosen.available == 10**6
    fitting = [(o.mode, o.device, o.dtype) for o in plan.alternatives]
    on_the_cpu = [option for option in fitting if option[1] == "cpu"]
    assert on_the_cpu[:2] == [(LoadMode.FULL, "cpu", "float32"), (LoadMode.FULL, "cpu", "bfloat16")]
    # Spreading over the GPU and the CPU fits too, where accelerate is installed to do it.
    assert ((LoadMode.SPREAD, "auto", "bfloat16") in fitting) == (not missing("accelerate"))
    assert plan.message().startswith("the model does not fit on cuda in bfloat16")
    assert "on cpu in float32: needs" in plan.message()


@pytest.mark.parametrize(("mode", "described"), [("8bit", "in 8 bits on cuda"), ("4bit", "in 4 bits on cuda")])
def test_the_cli_load_flag_becomes_the_plan(moe, one_gpu, capsys, mode, described):
    if not missing("bitsandbytes", "accelerate"):
        pytest.skip("bitsandbytes is installed: the load would really try the pretended GPU")
    assert run_cli(["generate", str(moe), "--prompt", "hi", "--load", mode, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"error: the model does not fit {described}" in err
    assert missing("bitsandbytes", "accelerate") in err
    assert "Traceback" not in err
