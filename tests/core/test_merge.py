from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

from app.core.merge.gates import compute_gates
from app.core.merge.leftovers import LEFTOVERS_STAGE
from app.core.merge.modelcard import ModelCardFields
from app.core.merge.pipeline import PARTIAL_MARK, MergeOptions, merge_moe
from app.core.problems import FrankenMoEError, ProblemsError
from app.core.progress import Cancelled, format_bytes, run_job
from app.core.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[2]


def recipe_for(donors, experts=3, top_k=2, gate_mode="cheap_embed", dtype="float32", extra_expert_lines=None):
    lines = [
        f"base_model: {donors['base']}",
        f"gate_mode: {gate_mode}",
        f"dtype: {dtype}",
        f"experts_per_token: {top_k}",
        "experts:",
    ]
    topics = ["maths and sums", "python code", "stories and prose", "french words", "lists of numbers"]
    for index in range(experts):
        lines.append(f"  - source_model: {donors[f'expert{index}']}")
        lines.append(f"    positive_prompts: [{json.dumps(topics[index])}]")
        lines.extend((extra_expert_lines or {}).get(index, []))
    return parse_recipe("\n".join(lines))


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in folder.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


def merge(recipe, out, **options):
    return run_job(merge_moe(recipe, MergeOptions(out_dir=out, **options)))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if PARTIAL_MARK in p.name or ".frankenmoe-" in p.name)


@pytest.fixture(scope="module")
def merged(llama_donors, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "moe"
    recipe = recipe_for(llama_donors, gate_mode="hidden")
    result = merge(recipe, out, shard_size=40_000, card=ModelCardFields(name="Tiny MoE", description="A test."))
    return recipe, result, out


def test_merged_model_loads_and_generates(merged):
    _recipe, result, out = merged
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 3
    assert model.config.num_experts_per_tok == 2
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 2?"}], add_generation_prompt=True, return_tensors="pt"
    )
    inputs = inputs if isinstance(inputs, torch.Tensor) else inputs["input_ids"]
    output = model.generate(inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] == inputs.shape[1] + 5
    assert len(result.shard_files) > 1
    assert (out / "model.safetensors.index.json").is_file()


def test_tensors_come_bit_for_bit_from_their_donors(merged, llama_donors):
    recipe, result, out = merged
    written = load_all(out)
    base = load_file(llama_donors["base"] / "model.safetensors")
    for name, tensor in base.items():
        if ".mlp." in name:
            assert name not in written
        else:
            assert torch.equal(written[name], tensor), name
    for expert in range(3):
        donor = load_file(llama_donors[f"expert{expert}"] / "model.safetensors")
        for layer in range(2):
            for projection, slot in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
                ours = written[f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{slot}.weight"]
                assert torch.equal(ours, donor[f"model.layers.{layer}.mlp.{projection}_proj.weight"])
    for layer in range(2):
        assert torch.equal(written[f"model.layers.{layer}.block_sparse_moe.gate.weight"], result.gates.router[layer])
    # The routers are the gate formula's: recompute them independently of the merge.
    torch.testing.assert_close(run_job(compute_gates(recipe, device="cpu")).router, result.gates.router)


def test_layout_and_config_match_transformers_save_pretrained(merged, tmp_path):
    _recipe, _result, out = merged
    ours_config = json.loads((out / "config.json").read_text())
    reference = MixtralForCausalLM(MixtralConfig(**{k: v for k, v in ours_config.items() if k != "architectures"}))
    reference.save_pretrained(tmp_path / "reference")
    expected = load_all(tmp_path / "reference")
    written = load_all(out)
    assert {k: tuple(v.shape) for k, v in written.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    reference_config = json.loads((tmp_path / "reference" / "config.json").read_text())
    for key, value in reference_config.items():
        assert ours_config[key] == value, key
    # transformers 4 reads these legacy keys; without rope_theta it would use Mixtral's 1e6.
    assert ours_config["rope_theta"] == 10000.0
    assert ours_config["torch_dtype"] == "float32"


def test_side_files(merged, llama_donors):
    recipe, _result, out = merged
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (llama_donors["base"] / name).read_bytes()
    ours, base = (json.loads((folder / "tokenizer_config.json").read_text()) for folder in (out, llama_donors["base"]))
    assert {**ours, "tokenizer_class": None} == {**base, "tokenizer_class": None}
    assert parse_recipe((out / "frankenmoe-recipe.yml").read_text()) == recipe
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: other\n")
    assert "- moe\n" in card and "- frankenmoe\n" in card
    assert "# Tiny MoE\n\nA test." in card
    assert "python code" in card
    assert "AutoModelForCausalLM.from_pretrained" in card


def test_a_transformers_5_tokenizer_class_becomes_one_transformers_4_loads_too(llama_donors, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(llama_donors["base"], base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "TokenizersBackend"  # what transformers 5's save_pretrained writes
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "moe"
    merge(recipe_for({**llama_donors, "base": base}), out)
    written = json.loads((out / "tokenizer_config.json").read_text())
    # transformers 4 knows PreTrainedTokenizerFast (and loads it from tokenizer.json); 5 has it as an alias.
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert {**written, "tokenizer_class": None} == {**config, "tokenizer_class": None}
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(llama_donors["base"])
    text = "What is 12 plus 30?"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    messages = [{"role": "user", "content": text}]
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)
    assert (ours.eos_token, ours.pad_token, ours.bos_token) == ("</s>", "<pad>", "<s>")


def read_header(file: Path) -> dict[str, dict]:
    """A safetensors file's header, read here byte by byte rather than through our own reader."""
    with file.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def test_shard_index_maps_every_tensor_to_the_shard_that_holds_it(merged):
    _recipe, result, out = merged
    index = json.loads((out / "model.safetensors.index.json").read_text())
    holders = {name: file.name for file in out.glob("*.safetensors") for name in read_header(file)}
    assert len(set(holders.values())) == len(result.shard_files) > 1
    assert index["weight_map"] == holders
    sizes = [
        end - start
        for file in out.glob("*.safetensors")
        for start, end in (info["data_offsets"] for info in read_header(file).values())
    ]
    assert (
        index["metadata"]["total_size"]
        == sum(sizes)
        == sum(t.numel() * t.element_size() for t in load_all(out).values())
    )


@pytest.mark.parametrize(("experts", "top_k"), [(3, 1), (3, 2), (3, 3), (5, 1), (5, 2), (5, 3)])
def test_any_number_of_experts_and_top_k(llama_donors, tmp_path, experts, top_k):
    out = tmp_path / "moe"
    merge(recipe_for(llama_donors, experts=experts, top_k=top_k), out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (experts, top_k)
    with torch.no_grad():
        output = model(torch.tensor([[1, 5, 9, 14]]), output_router_logits=True)
    assert torch.isfinite(output.logits).all()
    assert output.router_logits[0].shape[-1] == experts


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_output_dtype_whatever_the_donors(mistral_donors, tmp_path, dtype):
    out = tmp_path / "moe"
    merge(recipe_for(mistral_donors, dtype=dtype), out)
    written = load_all(out)
    assert {str(t.dtype) for t in written.values()} == {f"torch.{dtype}"}
    donor = load_all(mistral_donors["expert1"])
    ours = written["model.layers.1.block_sparse_moe.experts.1.w2.weight"]
    assert torch.equal(ours, donor["model.layers.1.mlp.down_proj.weight"].to(getattr(torch, dtype)))
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] == 4096  # carried over from the Mistral base
    assert AutoModelForCausalLM.from_pretrained(out).dtype == getattr(torch, dtype)


def test_noise_and_residual_scale(llama_donors, tmp_path):
    extra = {0: ["    residual_scale: 0.5"], 1: ["    noise_scale: 0.01"]}
    out = tmp_path / "moe"
    merge(recipe_for(llama_donors, extra_expert_lines=extra), out)
    written = load_all(out)
    first = load_file(llama_donors["expert0"] / "model.safetensors")
    second = load_file(llama_donors["expert1"] / "model.safetensors")
    prefix = "model.layers.0.block_sparse_moe.experts"
    assert torch.equal(written[f"{prefix}.0.w2.weight"], first["model.layers.0.mlp.down_proj.weight"] * 0.5)
    assert torch.equal(written[f"{prefix}.0.w1.weight"], first["model.layers.0.mlp.gate_proj.weight"])
    noise = written[f"{prefix}.1.w1.weight"] - second["model.layers.0.mlp.gate_proj.weight"]
    assert 0.008 < noise.std() < 0.012
    again = tmp_path / "again"
    merge(recipe_for(llama_donors, extra_expert_lines=extra), again)
    assert torch.equal(load_all(again)[f"{prefix}.1.w1.weight"], written[f"{prefix}.1.w1.weight"])  # seeded


def test_existing_output_is_refused_then_replaced_on_request(llama_donors, tmp_path):
    out = tmp_path / "moe"
    recipe = recipe_for(llama_donors)
    merge(recipe, out)
    marker = out / "config.json"
    before = marker.read_text()
    with pytest.raises(FrankenMoEError) as caught:
        merge(recipe, out)
    assert "already exists" in caught.value.message
    assert "--overwrite" in caught.value.hint
    assert marker.read_text() == before
    merge(recipe_for(llama_donors, top_k=1), out, overwrite=True)
    assert json.loads(marker.read_text())["num_experts_per_tok"] == 1
    assert leftovers(tmp_path) == []


def test_a_folder_that_is_not_a_model_is_never_replaced(llama_donors, tmp_path):
    out = tmp_path / "documents"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    with pytest.raises(FrankenMoEError, match="does not look like a model folder"):
        merge(recipe_for(llama_donors), out, overwrite=True)
    assert (out / "thesis.txt").read_text() == "years of work"


def test_output_inside_an_input_model_is_refused(llama_donors):
    with pytest.raises(FrankenMoEError, match="holds an input model"):
        merge(recipe_for(llama_donors), llama_donors["base"].parent, overwrite=True)


def test_invalid_recipe_is_refused_before_anything_is_written(llama_donors, tmp_path):
    recipe = recipe_for(llama_donors).model_copy(update={"experts_per_token": 9})
    with pytest.raises(ProblemsError) as caught:
        merge(recipe, tmp_path / "moe")
    assert caught.value.problems[0].field == "experts_per_token"
    assert list(tmp_path.iterdir()) == []


def test_cancel_mid_merge_leaves_nothing(llama_donors, tmp_path):
    cancel = threading.Event()
    job = merge_moe(recipe_for(llama_donors), MergeOptions(out_dir=tmp_path / "moe"), cancel=cancel)
    for record in job:
        if record.stage == "writing" and record.done == 10:
            cancel.set()
            break
    with pytest.raises(Cancelled):
        run_job(job)
    assert list(tmp_path.iterdir()) == []


KILLED_MERGE = """
import os, sys, time
from pathlib import Path
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.recipe import load_recipe
job = merge_moe(load_recipe(sys.argv[1]), MergeOptions(out_dir=Path(sys.argv[2])))
for record in job:
    if record.stage == "writing" and record.done == 10:
        print("halfway", flush=True)
        time.sleep(60)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")
def test_killed_merge_leaves_no_model_and_the_next_merge_into_its_folder_cleans_up(llama_donors, tmp_path):
    from app.core.recipe import save_recipe

    recipe_path = tmp_path / "recipe.yml"
    save_recipe(recipe_for(llama_donors), recipe_path)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "moe"
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_MERGE), str(recipe_path), str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert process.stdout.readline().strip() == "halfway"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    assert len(leftovers(work)) == 1  # the partial folder of the dead process, hidden and marked
    partial = work / leftovers(work)[0]
    size = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
    assert size > 0
    # A merge into another target of the same folder removes it, and says how much that freed.
    records = []
    run_job(merge_moe(recipe_for(llama_donors), MergeOptions(out_dir=work / "other")), records.append)
    assert (work / "other").is_dir() and not out.exists()
    assert leftovers(work) == []
    cleaned = [r for r in records if r.stage == LEFTOVERS_STAGE]
    assert [r.bytes_done for r in cleaned] == [size]
    assert f"freed {format_bytes(size)}" in cleaned[0].message and str(work) in cleaned[0].message


@pytest.mark.parametrize("gate_mode", ["cheap_embed", "hidden"])
def test_a_merge_of_llama_donors_imports_nothing_from_transformers(llama_donors, tmp_path, gate_mode):
    """Importing transformers takes longer than merging a small model; the merge does not need it."""
    from app.core.recipe import save_recipe

    recipe_path = tmp_path / "recipe.yml"
    save_recipe(recipe_for(llama_donors, gate_mode=gate_mode), recipe_path)
    done = subprocess.run(
        [sys.executable, "-m", "app", "merge", str(recipe_path), str(tmp_path / "moe"), "--quiet", "--device", "cpu"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONVERBOSE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Python's verbose mode names every module it imports on stderr.
    imported = [line for line in done.stderr.splitlines() if line.startswith("import ") and "transformers" in line]
    assert imported == []
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["num_local_experts"] == 3
