"""Hub adapters: `MODEL+ADAPTER` downloads the model and only the adapter's config and weights."""

from __future__ import annotations

import pytest

from app.core.compat import check_recipe
from app.core.hub import NoSafetensorsError, download_model, ensure_recipe_models
from app.core.lora import read_adapter
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.problems import FrankenMoEError, ProblemsError
from app.core.progress import run_job
from app.core.recipe import ModelRef, parse_recipe
from app.core.sources import open_model
from tests.lora_adapters import make_adapter

pytest_plugins = ["tests.hubserver"]

MODEL = "acme/tiny-llama-instruct"
ADAPTER = "acme/tiny-llama-maths-lora"


@pytest.fixture
def adapter_files(tmp_path, hub, tiny_hub_files):
    model = tmp_path / "model"
    model.mkdir()
    for name, content in tiny_hub_files["llama-a"].items():
        (model / name).write_bytes(content)
    made = make_adapter(tmp_path / "adapter", model, r=4)
    files = {p.name: p.read_bytes() for p in made.folder.iterdir()}
    # What adapter repos carry besides: a pickle copy of the weights, a card, a training log.
    extras = {"adapter_model.bin": b"\x80\x04pickle", "training_args.json": b"{}", "README.md": b"# An adapter\n"}
    hub.add_model(ADAPTER, files | extras)
    hub.add_model("acme/pickle-only-lora", {"adapter_config.json": files["adapter_config.json"], **extras})
    return files


def test_model_plus_adapter_downloads_both_and_only_the_adapters_own_files(hub, hub_config, adapter_files):
    recipe = parse_recipe(f"base_model: {MODEL}\ngate_mode: random\nexperts:\n- source_model: {MODEL}+{ADAPTER}\n")
    folders = run_job(ensure_recipe_models(recipe, config=hub_config))
    adapter_folder = folders[ModelRef.parse(ADAPTER)]
    # Its config, weights and card (tokenizer files too when it has them; tests/core/test_hub_adapters.py).
    own_files = ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in adapter_folder.iterdir()) == own_files
    assert not hub.file_requests("adapter_model.bin") and not hub.file_requests("training_args.json")
    assert read_adapter(adapter_folder).r == 4
    # Offline from now on: the engine finds both parts in the cache.
    with open_model(ModelRef.parse(f"{MODEL}+{ADAPTER}"), hub_config.cache_dir) as source:
        assert source.has_delta("model.layers.0.mlp.up_proj.weight")
    # A plain `hub download` of an adapter repo fetches the same files.
    assert run_job(download_model(ADAPTER, config=hub_config)) == adapter_folder


def test_a_pickle_only_hub_adapter_is_refused_before_downloading(hub, hub_config, adapter_files):
    with pytest.raises(NoSafetensorsError, match=r"adapter_model\.bin"):
        run_job(download_model(f"{MODEL}+acme/pickle-only-lora", config=hub_config))
    assert not hub.file_requests("adapter_model.bin")


def test_problems_of_a_hub_adapter_name_it_by_its_id_not_its_cache_folder(hub, hub_config, tiny_hub_files, tmp_path):
    wide = tmp_path / "wide"
    wide.mkdir()
    for name, content in tiny_hub_files["llama-wide"].items():
        (wide / name).write_bytes(content)
    made = make_adapter(tmp_path / "adapter", wide, r=4)
    hub.add_model("acme/tiny-wide-lora", {p.name: p.read_bytes() for p in made.folder.iterdir()})
    expert = f"{MODEL}+acme/tiny-wide-lora"
    experts = f"experts:\n- source_model: {expert}\n- source_model: {MODEL}\n"
    recipe = parse_recipe(f"base_model: {MODEL}\ngate_mode: random\n{experts}")
    run_job(ensure_recipe_models(recipe, config=hub_config))

    problems = [p for p in check_recipe(recipe, hub_config.cache_dir) if p.is_error]
    assert len(problems) == 1
    out = tmp_path / "moe"
    with pytest.raises(ProblemsError) as raised:
        run_job(merge_moe(recipe, MergeOptions(out_dir=out, cache_dir=hub_config.cache_dir)))
    assert not out.exists()
    for problem in [*problems, *(p for p in raised.value.problems if p.is_error)]:
        assert "the adapter acme/tiny-wide-lora does not fit the weights" in problem.message
        assert str(hub_config.cache_dir) not in problem.message and "snapshots" not in problem.message
    # Opened directly (as the chat and evaluation open a model), the error names it the same way.
    with pytest.raises(FrankenMoEError, match="the adapter acme/tiny-wide-lora does not fit") as opened:
        open_model(ModelRef.parse(expert), hub_config.cache_dir)
    assert "snapshots" not in opened.value.message
