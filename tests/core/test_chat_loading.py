"""Memory estimate, load plans with fallbacks, remote-code refusal, progress, cancel and unloading."""

from __future__ import annotations

import gc
import json
import shutil
import threading
import weakref

import pytest
import torch

from app.core.chat import LoadMode, LoadRequest, ModelDoesNotFit, SamplingSettings, load_chat_model, plan_load
from app.core.chat.loading import count_weights
from app.core.problems import FrankenMoEError
from app.core.progress import Cancelled, run_job
from app.core.sources import ModelSource
from tests.chat_models import make_tiny_moe


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return make_tiny_moe(tmp_path_factory.mktemp("load") / "mixtral", "mixtral", seed=3)


def option_named(plan, mode, device, dtype):
    return next(o for o in plan.options if (o.mode, o.device, o.dtype) == (mode, device, dtype))


def test_weights_are_counted_from_the_headers(moe):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe)
    with ModelSource(moe) as source:
        counts = count_weights(source)
        attention = sum(source.tensor_info(n).numel for n in source.tensor_names if ".self_attn." in n)
        experts = sum(source.tensor_info(n).numel for n in source.tensor_names if ".experts." in n)
    assert counts.float_elements == sum(p.numel() for p in model.parameters())
    # bitsandbytes quantises nn.Linear layers only; transformers 5 keeps experts as fused 3-D tensors.
    experts_are_linear = isinstance(model.model.layers[0].mlp.experts, torch.nn.ModuleList)
    assert counts.quantisable_elements == attention + (experts if experts_are_linear else 0)


def test_the_estimate_grows_with_the_context_by_the_kv_cache(moe):
    short = plan_load(LoadRequest(str(moe), device="cpu", context_tokens=100)).chosen.needed
    long = plan_load(LoadRequest(str(moe), device="cpu", context_tokens=1100)).chosen.needed
    # 2 layers x (K and V) x 2 KV heads x head dim 8 x float32, for 1000 more tokens, plus the margin.
    assert long - short == pytest.approx(2 * 2 * 2 * 8 * 4 * 1000 * 1.08, abs=2)


def test_a_model_that_does_not_fit_offers_what_does(moe):
    full = plan_load(LoadRequest(str(moe), device="cpu", dtype="float32"))
    half = option_named(full, LoadMode.FULL, "cpu", "bfloat16")
    assert full.fits and half.needed < full.chosen.needed
    limit = (half.needed + full.chosen.needed) // 2  # room for bfloat16 weights, not float32 ones
    request = LoadRequest(str(moe), device="cpu", dtype="float32", memory_limit=limit)

    with pytest.raises(ModelDoesNotFit) as caught:
        run_job(load_chat_model(request))
    plan = caught.value.plan
    assert not plan.fits and plan.chosen.available == limit
    assert [(o.mode, o.device, o.dtype) for o in plan.alternatives] == [(LoadMode.FULL, "cpu", "bfloat16")]
    assert "does not fit on cpu in float32" in caught.value.message
    assert "would fit on cpu in bfloat16" in caught.value.message
    # Quantised and spread loading are always considered, and say why they cannot be used here.
    for mode in (LoadMode.INT8, LoadMode.INT4, LoadMode.SPREAD):
        considered = next(o for o in plan.options if o.mode is mode)
        if not torch.cuda.is_available():
            assert considered.unavailable == "needs a CUDA GPU"

    chat = run_job(load_chat_model(plan.request_for(plan.alternatives[0])))
    try:
        assert chat.model.dtype == torch.bfloat16
        ids = chat.prompt_ids([{"role": "user", "content": "hi"}])
        result = run_job(chat.generate(ids, SamplingSettings(seed=0, max_new_tokens=3), stop_token_ids=()))
        assert len(result.generated) == 3
    finally:
        chat.unload()


def test_nothing_fits_in_too_little_memory(moe):
    with pytest.raises(ModelDoesNotFit) as caught:
        run_job(load_chat_model(LoadRequest(str(moe), device="cpu", memory_limit=1000)))
    assert caught.value.plan.alternatives == ()
    assert "no other way of loading it fits either" in caught.value.message
    assert "smaller model" in caught.value.hint


def test_remote_code_is_never_run_without_permission(moe, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(moe, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_own_moe", auto_map={"AutoModelForCausalLM": "modeling_mine.MyMoe"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (folder / "modeling_mine.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(FrankenMoEError) as caught:
        run_job(load_chat_model(LoadRequest(str(folder), device="cpu")))
    assert "never run without your permission" in caught.value.message
    assert "--trust-remote-code" in caught.value.hint
    assert not marker.exists()


@pytest.mark.parametrize("config_text", [None, "{not json", "[1, 2]"], ids=["missing", "broken", "not-an-object"])
def test_a_folder_without_a_readable_config_is_one_error_with_the_fix(moe, tmp_path, config_text):
    folder = tmp_path / "weights-only"
    shutil.copytree(moe, folder)
    if config_text is None:
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_text(config_text)
    with pytest.raises(FrankenMoEError) as caught:
        run_job(load_chat_model(LoadRequest(str(folder), device="cpu")))
    assert "config.json" in caught.value.message
    assert caught.value.hint


def test_loading_reports_byte_progress_and_can_be_cancelled(mistral_donors):
    folder = mistral_donors["expert0"]  # sharded into many small files
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    records = []
    chat = run_job(load_chat_model(LoadRequest(str(folder), device="cpu")), records.append)
    chat.unload()
    reading = [r for r in records if r.stage == "reading weights"]
    assert len(reading) > 3
    assert reading[-1].bytes_done == reading[-1].bytes_total == total
    assert [r.bytes_done for r in reading] == sorted(r.bytes_done for r in reading)

    cancel = threading.Event()
    job = load_chat_model(LoadRequest(str(folder), device="cpu"), cancel)
    for record in job:
        if record.stage == "reading weights":
            cancel.set()
            break
    with pytest.raises(Cancelled):
        run_job(job)
    assert record.bytes_done < total


def test_unloading_frees_the_model(moe):
    chat = run_job(load_chat_model(LoadRequest(str(moe), device="cpu")))
    model_ref = weakref.ref(chat.model)
    chat.unload()
    gc.collect()
    assert model_ref() is None  # nothing (hooks included) keeps the weights alive
    assert chat.model is None


def test_unloading_collects_only_where_python_collects_automatically(moe):
    # The app turns automatic collection off and collects in its GUI thread (app/gui/garbage.py);
    # unloading runs in a worker there, which must not free a cycle (it may hold a Qt object).
    collections: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(record)
    try:
        chat = run_job(load_chat_model(LoadRequest(str(moe), device="cpu")))
        weight_ref = weakref.ref(next(chat.model.parameters()))
        gc.disable()
        collections.clear()
        try:
            chat.unload()
        finally:
            gc.enable()
        assert collections == []
        assert weight_ref() is None  # the weights go with their last reference, with no collection

        chat = run_job(load_chat_model(LoadRequest(str(moe), device="cpu")))
        collections.clear()
        chat.unload()
        assert 2 in collections  # the CLI's unload still collects every generation
    finally:
        gc.callbacks.remove(record)
