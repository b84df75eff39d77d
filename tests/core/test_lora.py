"""LoRA adapters as experts: the merge equals PEFT's own merge_and_unload(), warnings and refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.core.compat import check_recipe
from app.core.lora import adapter_problems, read_adapter
from app.core.lora import merged as lora_merged
from app.core.merge.gates import compute_gates
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.problems import FrankenMoEError, ProblemsError
from app.core.progress import Cancelled, run_job
from app.core.recipe import ModelRef, parse_recipe
from app.core.sources import open_model
from tests.lora_adapters import MLP_MODULES, make_adapter
from tests.models import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
SLOTS = (("gate", "w1"), ("down", "w2"), ("up", "w3"))
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTERS = {
    "rank_and_alpha": dict(r=4, lora_alpha=16),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True),
    "patterns": dict(
        r=4, lora_alpha=8, rank_pattern={"layers.1.mlp.down_proj": 2, "up_proj": 6}, alpha_pattern={"gate_proj": 3}
    ),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "mlp_and_attention": dict(r=4, lora_alpha=8, target_modules=[*MLP_MODULES, *ATTENTION]),
}


@pytest.fixture(scope="module")
def adapters(llama_donors, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    made = {
        name: make_adapter(root / name, llama_donors["base"], seed=index, **settings)
        for index, (name, settings) in enumerate(ADAPTERS.items())
    }
    made["attention_only"] = make_adapter(
        root / "attention_only", llama_donors["base"], seed=9, save_merged=True, r=4, lora_alpha=8,
        target_modules=ATTENTION,
    )
    made["on_base"] = make_adapter(
        root / "on_base", llama_donors["base"], seed=10, r=4, lora_alpha=8,
        target_modules=["embed_tokens", "q_proj", "v_proj", "up_proj"], modules_to_save=["lm_head"],
    )
    made["on_expert"] = make_adapter(root / "on_expert", llama_donors["expert1"], seed=11, save_merged=True, r=4)
    return made


def recipe_text(base: str, experts: list[str], gate_mode: str = "cheap_embed", dtype: str = "float32") -> str:
    topics = ["maths and sums", "python code", "stories and prose", "french words"]
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}", f"dtype: {dtype}", "experts_per_token: 2", "experts:"]
    for index, source in enumerate(experts):
        lines += [f"  - source_model: {source}", f"    positive_prompts: [{json.dumps(topics[index])}]"]
    return "\n".join(lines) + "\n"


def with_adapter(donors: dict[str, Path], adapter: Path, **settings: str) -> str:
    """A recipe whose first expert is the base with the adapter, the second a plain fine-tune."""
    return recipe_text(str(donors["base"]), [f"{donors['base']}+{adapter}", str(donors["expert0"])], **settings)


def merge(text: str, out: Path) -> dict[str, torch.Tensor]:
    run_job(merge_moe(parse_recipe(text), MergeOptions(out_dir=out)))
    tensors: dict[str, torch.Tensor] = {}
    for file in out.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


def expert_tensor(written: dict[str, torch.Tensor], layer: int, expert: int, slot: str) -> torch.Tensor:
    return written[f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{slot}.weight"]


def within_one_bf16_ulp(ours: torch.Tensor, reference: torch.Tensor) -> bool:
    """Each value of ours at most one bfloat16 step (at the reference's magnitude) from the reference."""
    reference = reference.float()
    exponent = torch.floor(torch.log2(reference.abs().clamp(min=2.0**-126)))
    ulp = torch.pow(2.0, exponent - 7)
    return bool(((ours.float() - reference).abs() <= ulp).all())


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_float32_experts_equal_peft_merge_and_unload_bit_for_bit(name, adapters, llama_donors, tmp_path):
    adapter = adapters[name]
    text = with_adapter(llama_donors, adapter.folder)
    written = merge(text, tmp_path / "moe")
    base = load_file(llama_donors["base"] / "model.safetensors")
    for layer in range(2):
        for projection, slot in SLOTS:
            name_in_model = f"model.layers.{layer}.mlp.{projection}_proj.weight"
            reference = adapter.merged[name_in_model]
            assert not torch.equal(reference, base[name_in_model])  # the adapter does change it
            assert torch.equal(expert_tensor(written, layer, 0, slot), reference), name_in_model
    # The attention is the base's, whatever the adapter does to the expert's own.
    query = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(written[query], base[query])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_merged_a_few_rows_at_a_time_have_peft_merges_bits(
    dtype, adapters, llama_donors, tmp_path, monkeypatch
):
    # The merge multiplies (for bfloat16 output), scales, adds and casts a block of rows at a time;
    # blocks that do not divide the weights (17, 17 and 30 rows of the 64 x 32 ones, the remainder
    # joining the last block) must give the whole-matrix merge's bits, and the bfloat16 output must be
    # PEFT's float32 merge rounded once.
    monkeypatch.setattr(lora_merged, "_BLOCK_ELEMENTS", 17 * 32 + 1)
    adapter = adapters["patterns"]
    written = merge(with_adapter(llama_donors, adapter.folder, dtype=dtype), tmp_path / "moe")
    for layer in range(2):
        for projection, slot in SLOTS:
            reference = adapter.merged[f"model.layers.{layer}.mlp.{projection}_proj.weight"]
            ours = expert_tensor(written, layer, 0, slot)
            assert torch.equal(ours, reference.to(getattr(torch, dtype))), (layer, projection)


def test_row_blocks_cover_the_rows_and_none_has_fewer_than_the_least():
    # Blocks of a few rows of B are multiplied by another route, whose last bits differ.
    least = lora_merged._MIN_BLOCK_ROWS
    for rows in (1, least - 1, least, 64, 100, 3072, 11008):
        for step in (least, least + 1, 40, 512):
            blocks = lora_merged._row_blocks(rows, step)
            assert [start for start, _ in blocks] == [0, *(end for _, end in blocks[:-1])]
            assert blocks[-1][1] == rows
            assert all(end - start >= min(rows, least) for start, end in blocks), (rows, step, blocks)
            assert all(end - start <= step + least - 1 for start, end in blocks)
    assert lora_merged._row_blocks(64, 17) == [(0, 17), (17, 34), (34, 64)]


def test_an_adapter_on_a_fine_tune_equals_its_merge_too(adapters, llama_donors, tmp_path):
    adapter = adapters["on_expert"]
    experts = [str(llama_donors["expert0"]), f"{llama_donors['expert1']}+{adapter.folder}"]
    text = recipe_text(str(llama_donors["base"]), experts)
    written = merge(text, tmp_path / "moe")
    for layer in range(2):
        for projection, slot in SLOTS:
            reference = adapter.merged[f"model.layers.{layer}.mlp.{projection}_proj.weight"]
            assert torch.equal(expert_tensor(written, layer, 1, slot), reference)


def test_bfloat16_experts_are_within_one_ulp_of_peft_on_a_bfloat16_model(mistral_donors, tmp_path):
    # PEFT merges a bfloat16 model in bfloat16 (the delta rounded, then the sum); we round once.
    adapter = make_adapter(tmp_path / "adapter", mistral_donors["base"], seed=3, dtype="bfloat16", r=4, lora_alpha=32)
    text = with_adapter(mistral_donors, adapter.folder, dtype="bfloat16")
    written = merge(text, tmp_path / "moe")
    for layer in range(2):
        for projection, slot in SLOTS:
            ours = expert_tensor(written, layer, 0, slot)
            reference = adapter.merged[f"model.layers.{layer}.mlp.{projection}_proj.weight"]
            assert ours.dtype == torch.bfloat16
            assert within_one_bf16_ulp(ours, reference)


@pytest.mark.parametrize("lora_alpha", [16, 12])  # scales 4 (a power of two: one product-and-add) and 3
def test_bfloat16_weights_merged_over_their_own_buffer_are_the_float32_merge_rounded_once(
    lora_alpha, mistral_donors, tmp_path, monkeypatch
):
    # A bfloat16 W merged into bfloat16 output takes the result in W's own buffer, a block at a time:
    # with blocks that do not divide the weights, every value must still be PEFT's float32 merge of
    # the (exactly widened) W, rounded once, so no block may read values already merged over.
    monkeypatch.setattr(lora_merged, "_BLOCK_ELEMENTS", 17 * 32 + 1)
    adapter = make_adapter(tmp_path / "adapter", mistral_donors["base"], seed=4, r=4, lora_alpha=lora_alpha)
    text = with_adapter(mistral_donors, adapter.folder, dtype="bfloat16")
    written = merge(text, tmp_path / "moe")
    for layer in range(2):
        for projection, slot in SLOTS:
            reference = adapter.merged[f"model.layers.{layer}.mlp.{projection}_proj.weight"]
            assert reference.dtype == torch.float32
            assert torch.equal(expert_tensor(written, layer, 0, slot), reference.to(torch.bfloat16))


def test_bfloat16_output_of_float32_models_is_the_float32_merge_rounded(adapters, llama_donors, tmp_path):
    adapter = adapters["rank_and_alpha"]
    text = with_adapter(llama_donors, adapter.folder, dtype="bfloat16")
    written = merge(text, tmp_path / "moe")
    for projection, slot in SLOTS:
        reference = adapter.merged[f"model.layers.1.mlp.{projection}_proj.weight"]
        assert within_one_bf16_ulp(expert_tensor(written, 1, 0, slot), reference)


def test_the_merges_thread_keeps_no_buffers_after_it(adapters, llama_donors, tmp_path):
    # The writer's thread computes blocks as the workers do (merge/ahead.py), and in the app it goes
    # on after the merge: the buffers it kept for them, for a big model a few tens of MiB, are freed.
    adapter = adapters["rank_and_alpha"]
    with open_model(ModelRef.parse(f"{llama_donors['base']}+{adapter.folder}")) as source:
        source.read_tensor_as("model.layers.0.mlp.up_proj.weight", "bfloat16")
    assert lora_merged._SCRATCH.buffers
    merge(with_adapter(llama_donors, adapter.folder, dtype="bfloat16"), tmp_path / "moe")
    assert not getattr(lora_merged._SCRATCH, "buffers", None)


# Run in a fresh process, where `import torch` is held until the merge has reported the last
# tensor it could copy without torch (lm_head.weight): prints the progress messages in order, and
# whether torch was reported loading before, during and after.
HELD_TORCH_MERGE = textwrap.dedent(
    """
    import importlib.abc, importlib.util, json, sys, threading
    from app.core.devices import torch_is_loading

    release = threading.Event()

    class HoldTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "torch":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec("torch")
            loader = spec.loader

            class Held(importlib.abc.Loader):
                def create_module(self, spec):
                    return loader.create_module(spec)

                def exec_module(self, module):
                    release.wait(20)
                    loader.exec_module(module)

            spec.loader = Held()
            return spec

    sys.meta_path.insert(0, HoldTorch())
    from app.core.merge.pipeline import MergeOptions, merge_moe
    from app.core.recipe import load_recipe

    loading = [torch_is_loading()]
    messages = []
    for record in merge_moe(load_recipe(sys.argv[1]), MergeOptions(out_dir=sys.argv[2])):
        if record.stage == "writing":
            messages.append(record.message)
        if record.message == "lm_head.weight" and not release.is_set():
            loading.append(torch_is_loading())
            release.set()
    loading.append(torch_is_loading())
    print(json.dumps({"messages": messages, "loading": loading}))
    """
)


def test_while_torch_loads_the_merge_copies_the_tensors_after_a_lora_weight(adapters, llama_donors, tmp_path):
    # A fresh `frankenmoe merge` process reaches its first LoRA weight before `import torch` ends
    # (1.4 s on two cores): meanwhile the writer copies the attention and embeddings of later
    # layers into their places. The files are the same as a merge in order writes.
    text = with_adapter(llama_donors, adapters["rank_and_alpha"].folder)
    (tmp_path / "recipe.yml").write_text(text)
    out = tmp_path / "held" / "moe"
    done = subprocess.run(
        [sys.executable, "-c", HELD_TORCH_MERGE, str(tmp_path / "recipe.yml"), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["loading"] == [False, True, False]
    messages = report["messages"]
    first_lora_weight = messages.index("model.layers.0.block_sparse_moe.experts.0.w1.weight")
    copied_ahead = {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.input_layernorm.weight", "lm_head.weight"}
    assert copied_ahead <= set(messages[:first_lora_weight])

    merge(text, tmp_path / "in_order" / "moe")
    for file in (tmp_path / "in_order" / "moe").iterdir():
        if file.suffix == ".safetensors":
            assert (out / file.name).read_bytes() == file.read_bytes(), file.name


def compute_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("frankenmoe-compute") and t.is_alive()]


def test_an_adapter_that_cannot_be_read_mid_merge_fails_the_merge_with_nothing_written(llama_donors, tmp_path):
    # The adapter's weights are read by the merge's workers: cut the file short once the merge is
    # under way, and the error reaches the merge's caller, with no model and no worker left behind.
    adapter = make_adapter(tmp_path / "adapter", llama_donors["base"], seed=5, r=4)
    weights = adapter.folder / "adapter_model.safetensors"
    header_length = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    text = with_adapter(llama_donors, adapter.folder)
    out = tmp_path / "out" / "moe"
    job = merge_moe(parse_recipe(text), MergeOptions(out_dir=out))
    with pytest.raises(FrankenMoEError, match="ended early"):
        for record in job:
            if record.stage == "writing" and record.done == 1:
                with weights.open("r+b") as handle:
                    handle.truncate(header_length)
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert not compute_threads()


def test_a_cancelled_lora_merge_leaves_no_model_and_no_worker(adapters, llama_donors, tmp_path):
    cancel = threading.Event()
    out = tmp_path / "out" / "moe"
    recipe = parse_recipe(with_adapter(llama_donors, adapters["rslora"].folder))
    job = merge_moe(recipe, MergeOptions(out_dir=out), cancel)
    with pytest.raises(Cancelled):
        for record in job:
            if record.stage == "writing" and record.done == 4:
                cancel.set()
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert not compute_threads()


# --------------------------------------------------------------------------- what an adapter holds


def test_read_adapter_describes_settings_and_counts_parameters(adapters):
    info = read_adapter(adapters["mlp_and_attention"].folder)
    stored = load_file(adapters["mlp_and_attention"].folder / "adapter_model.safetensors")
    mlp = sum(t.numel() for key, t in stored.items() if ".mlp." in key)
    assert (info.r, info.lora_alpha, info.use_rslora, info.use_dora) == (4, 8.0, False, False)
    assert info.parameter_count == sum(t.numel() for t in stored.values())
    assert info.mlp_parameter_count == mlp
    assert info.dropped_modules == ("attention",)
    assert info.summary() == f"r=4, alpha=8, MLP part {round(100 * mlp / info.parameter_count)} % of the adapter"
    patterns = read_adapter(adapters["patterns"].folder)
    assert patterns.rank_pattern == {"layers.1.mlp.down_proj": 2, "up_proj": 6}
    ranks = {d.module: (d.rank, d.scale) for d in patterns.deltas}
    # PEFT's matching: a key matches the end of the module name at a dot; the first matching key wins.
    assert ranks["model.layers.1.mlp.down_proj"] == (2, 8 / 2)
    assert ranks["model.layers.0.mlp.down_proj"] == (4, 8 / 4)
    assert ranks["model.layers.0.mlp.up_proj"] == (6, 8 / 6)
    assert ranks["model.layers.0.mlp.gate_proj"] == (4, 3 / 4)
    rslora = read_adapter(adapters["rslora"].folder)
    assert {d.scale for d in rslora.deltas} == {4 / math.sqrt(8)}
    assert "rsLoRA" in rslora.summary() and "DoRA" in read_adapter(adapters["dora"].folder).summary()


def test_dropped_parts_are_warned_with_their_share_before_the_merge(adapters, llama_donors):
    info = read_adapter(adapters["mlp_and_attention"].folder)
    stored = load_file(adapters["mlp_and_attention"].folder / "adapter_model.safetensors")
    dropped = sum(t.numel() for key, t in stored.items() if ".self_attn." in key) / info.parameter_count
    recipe = parse_recipe(
        with_adapter(llama_donors, info.folder)
    )
    problems = check_recipe(recipe)
    assert not [p for p in problems if p.is_error]
    (warning,) = [p for p in problems if "dropped" in p.message]
    assert warning.field == "experts.0.source_model"
    assert "attention" in warning.message and f"{dropped * 100:.0f} % of its parameters" in warning.message

    only = read_adapter(adapters["attention_only"].folder)
    (warning,) = [p for p in adapter_problems(only, llama_donors["base"], "the base") if not p.is_error]
    assert "all of it (100 % of its parameters) is dropped" in warning.message


def test_an_attention_only_expert_is_its_model_unchanged(adapters, llama_donors, tmp_path):
    adapter = adapters["attention_only"]
    written = merge(
        with_adapter(llama_donors, adapter.folder),
        tmp_path / "moe",
    )
    base = load_file(llama_donors["base"] / "model.safetensors")
    for projection, slot in SLOTS:
        assert torch.equal(expert_tensor(written, 0, 0, slot), base[f"model.layers.0.mlp.{projection}_proj.weight"])


def test_an_adapter_on_the_base_model_changes_the_attention_as_peft_does(adapters, llama_donors, tmp_path):
    adapter = adapters["attention_only"]
    written = merge(
        recipe_text(f"{llama_donors['base']}+{adapter.folder}", [str(llama_donors[f"expert{i}"]) for i in (0, 1)]),
        tmp_path / "moe",
    )
    for layer in range(2):
        for projection in "qkvo":
            name = f"model.layers.{layer}.self_attn.{projection}_proj.weight"
            assert torch.equal(written[name], adapter.merged[name])


def test_an_adapter_on_the_base_applies_every_part_embeddings_and_saved_modules_included(
    adapters, llama_donors, tmp_path
):
    adapter = adapters["on_base"]
    info = read_adapter(adapter.folder)
    # PEFT saves the targeted embedding's own weight beside its A and B, and lm_head whole.
    assert {d.module: d.kind for d in info.deltas if d.replacement is not None} == {
        "model.embed_tokens": "embedding",
        "lm_head": "replacement",
    }
    assert not [p for p in adapter_problems(info, llama_donors["base"], "base", role="base")]
    written = merge(
        recipe_text(f"{llama_donors['base']}+{adapter.folder}", [str(llama_donors[f"expert{i}"]) for i in (0, 1)]),
        tmp_path / "moe",
    )
    base = load_file(llama_donors["base"] / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.v_proj.weight"):
        assert not torch.equal(adapter.merged[name], base[name])
        assert torch.equal(written[name], adapter.merged[name]), name


# --------------------------------------------------------------------------- the gates see the adapted model


def test_calibrated_gates_run_the_adapted_expert(adapters, llama_donors):
    adapter = adapters["on_expert"]
    expert1 = str(llama_donors["expert1"])

    def gates(second: str) -> torch.Tensor:
        text = recipe_text(str(llama_donors["base"]), [str(llama_donors["expert0"]), second], "calibrated")
        return run_job(compute_gates(parse_recipe(text), device="cpu", dtype="float32")).router

    adapted = gates(f"{expert1}+{adapter.folder}")
    assert torch.equal(adapted, gates(str(adapter.merged_folder)))
    assert not torch.equal(adapted, gates(expert1))


@pytest.mark.parametrize("gate_mode", ["hidden", "hidden_avg"])
def test_hidden_gates_run_an_adapted_base(gate_mode, adapters, llama_donors):
    # hidden and hidden_avg read the base model's MLP inputs (as mergekit-moe does): an adapter on the
    # base is what they see, and they equal those of PEFT's merged model.
    adapter = adapters["attention_only"]
    experts = [str(llama_donors["expert0"]), str(llama_donors["expert1"])]

    def gates(base: str) -> torch.Tensor:
        return run_job(compute_gates(parse_recipe(recipe_text(base, experts, gate_mode)), device="cpu")).router

    adapted = gates(f"{llama_donors['base']}+{adapter.folder}")
    assert torch.equal(adapted, gates(str(adapter.merged_folder)))
    assert not torch.allclose(adapted, gates(str(llama_donors["base"])))


# --------------------------------------------------------------------------- refusals


def refusal(text: str, tmp_path: Path) -> str:
    out = tmp_path / "moe"
    with pytest.raises(ProblemsError) as raised:
        run_job(merge_moe(parse_recipe(text), MergeOptions(out_dir=out)))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".moe")]
    errors = [p for p in raised.value.problems if p.is_error]
    assert len(errors) == 1, errors
    return errors[0].message


def test_a_pickle_only_adapter_is_refused_unread(llama_donors, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(FrankenMoEError, match="never unpickles"):
        read_adapter(folder)
    message = refusal(with_adapter(llama_donors, folder), tmp_path)
    assert "pickle" in message


def test_a_folder_without_adapter_config_is_refused(llama_donors, tmp_path):
    # A full model after the '+': not an adapter.
    message = refusal(
        with_adapter(llama_donors, llama_donors["expert1"]),
        tmp_path,
    )
    assert "has no adapter_config.json" in message


def test_an_adapter_for_another_size_names_the_shapes(llama_donors, tmp_path):
    wide = make_tiny_model(tmp_path / "wide", "llama", seed=5, hidden_size=64, intermediate_size=128)
    adapter = make_adapter(tmp_path / "adapter", wide, r=4)
    message = refusal(with_adapter(llama_donors, adapter.folder), tmp_path)
    assert "trained on a model of another size" in message
    assert "model.layers.0.mlp.down_proj makes a 64x128 change" in message and "weight of 32x64" in message


def test_an_adapter_for_another_architecture_names_the_missing_modules(llama_donors, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=320, n_positions=64)).save_pretrained(gpt2)
    adapter = make_adapter(tmp_path / "adapter", gpt2, r=4, target_modules=["c_fc"], fan_in_fan_out=True)
    info = read_adapter(adapter.folder)
    errors = [p for p in adapter_problems(info, llama_donors["base"], "the base") if p.is_error]
    assert any("targets module(s) c_fc, which the base (llama) does not have" in p.message for p in errors)
    assert any("does not have, e.g. transformer.h.0.mlp.c_fc.weight" in p.message for p in errors)
    assert any("fan_in_fan_out" in p.message for p in errors)


def test_a_rank_mismatch_between_a_and_b_is_named(adapters, llama_donors, tmp_path):
    folder = tmp_path / "damaged"
    folder.mkdir()
    source = adapters["rank_and_alpha"].folder
    (folder / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    tensors = load_file(source / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key] = tensors[key][:, :3].contiguous()
    save_file(tensors, folder / "adapter_model.safetensors")
    message = refusal(with_adapter(llama_donors, folder), tmp_path)
    assert "A and B matrices of different ranks: model.layers.1.mlp.up_proj has rank 4 in A but 3 in B" in message


def test_a_different_base_model_name_is_a_warning(adapters, llama_donors, tmp_path):
    folder = tmp_path / "renamed"
    folder.mkdir()
    source = adapters["rank_and_alpha"].folder
    config = json.loads((source / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/other-model"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    problems = adapter_problems(read_adapter(folder), llama_donors["base"], str(llama_donors["base"]))
    (warning,) = problems
    assert not warning.is_error and "was trained on someone/other-model" in warning.message
