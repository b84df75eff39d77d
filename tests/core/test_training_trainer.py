"""Router training end to end on tiny merged models: what changes, what does not, resume, cancel, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from app.core.merge.pipeline import RECIPE_FILENAME, MergeOptions, merge_moe
from app.core.problems import FrankenMoEError, ProblemsError
from app.core.progress import Cancelled, run_job
from app.core.recipe import load_recipe, parse_recipe
from app.core.training.output import router_key
from app.core.training.settings import RouterTrainingSettings, TrainingData
from app.core.training.trainer import checkpoint_dir, train_routers
from tests.chat_models import make_tiny_moe
from tests.models import make_tiny_model

TOPICS = ["maths and sums", "python code", "stories and prose"]
SENTENCES = [
    "The cat sat on the mat and looked at the moon.",
    "def add(a, b): return a + b",
    "Twelve plus thirty is forty two, and seven times six is forty two too.",
    "Le chat dort sur le rebord de la fenetre.",
    "A storm rolled in over the grey sea at dusk.",
]
FAST = dict(seq_len=16, batch_size=2, eval_every=3, checkpoint_every=0, lr=0.02)


def write_text(path: Path, paragraphs: int = 60, offset: int = 0) -> Path:
    path.write_text(
        "\n\n".join(f"{SENTENCES[(i + offset) % len(SENTENCES)]} Number {i}." for i in range(paragraphs)),
        encoding="utf-8",
    )
    return path


def merge_donors(donors: dict[str, Path], out: Path, gate_mode: str, shared: bool = False, shard_size: int = 10**9):
    lines = [f"base_model: {donors['base']}", f"gate_mode: {gate_mode}", "dtype: float32", "experts_per_token: 2"]
    lines.append("experts:")
    for index, topic in enumerate(TOPICS):
        lines += [f"  - source_model: {donors[f'expert{index}']}", f"    positive_prompts: [{json.dumps(topic)}]"]
    if shared:
        lines += ["shared_experts:", f"  - source_model: {donors['shared']}", "    positive_prompts: ['The answer']"]
    run_job(merge_moe(parse_recipe("\n".join(lines)), MergeOptions(out_dir=out, shard_size=shard_size)))
    return out


def tensors_of(folder: Path) -> dict[str, bytes]:
    """Every tensor's raw bytes (with dtype and shape), read independently of our own reader."""
    result = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no iterator
                tensor = handle.get_tensor(name)
                raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
                result[name] = (str(tensor.dtype), tuple(tensor.shape), raw)
    return result


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def train(model: Path, out: Path, data: TrainingData, cancel=None, resume=False, records=None, **settings):
    job = train_routers(model, out, RouterTrainingSettings(**(FAST | settings)), data, cancel=cancel, resume=resume)
    return run_job(job, records.append if records is not None else None)


@pytest.fixture(scope="module")
def sharded_moe(llama_donors, tmp_path_factory):
    """A Mixtral merged with hidden gates, in shards small enough that some hold no router."""
    return merge_donors(llama_donors, tmp_path_factory.mktemp("sharded") / "moe", "hidden", shard_size=60_000)


@pytest.fixture(scope="module")
def trained(sharded_moe, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    data = TrainingData(files=(write_text(root / "train.txt"),))
    before = folder_digest(sharded_moe)
    records = []
    result = train(sharded_moe, root / "out", data, records=records, steps=6)
    return sharded_moe, result, records, before


def test_only_router_tensors_change(trained):
    model, result, _records, _before = trained
    original, written = tensors_of(model), tensors_of(result.out_dir)
    assert written.keys() == original.keys()
    routers = {name for name in original if router_key(name) is not None}
    assert len(routers) == 2  # one per layer of the two-layer donors
    for name in original:
        if name in routers:
            assert written[name][:2] == original[name][:2]  # same dtype and shape
        else:
            assert written[name] == original[name], name
    assert any(written[name] != original[name] for name in routers)
    assert sorted(result.report["trained_tensors"]) == sorted(routers)


def test_shards_without_routers_are_hard_links_and_the_input_is_untouched(trained):
    model, result, _records, before = trained
    assert folder_digest(model) == before
    linked = rewritten = 0
    for shard in model.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            holds_router = any(router_key(name) is not None for name in handle.keys())  # noqa: SIM118
        same_file = os.stat(shard).st_ino == os.stat(result.out_dir / shard.name).st_ino
        assert same_file != holds_router, shard.name
        linked += same_file
        rewritten += holds_router
    assert linked and rewritten
    assert (result.out_dir / "model.safetensors.index.json").read_bytes() == (
        model / "model.safetensors.index.json"
    ).read_bytes()


def test_output_loads_with_transformers_and_holds_the_trained_routers(trained):
    from transformers import AutoModelForCausalLM

    _model, result, _records, _before = trained
    loaded = AutoModelForCausalLM.from_pretrained(result.out_dir)
    for index, layer in enumerate(loaded.model.layers):
        stored = tensors_of(result.out_dir)[f"model.layers.{index}.block_sparse_moe.gate.weight"][2]
        assert layer.mlp.gate.weight.detach().numpy().tobytes() == stored
    ids = torch.tensor([[1, 5, 9, 14]])
    assert torch.isfinite(loaded(input_ids=ids).logits).all()


def test_progress_and_result_report_the_run(trained):
    _model, result, records, _before = trained
    steps = [r for r in records if r.stage == "train"]
    assert [r.step for r in steps] == list(range(1, 7))
    for record in steps:
        assert record.loss is not None and record.balance_loss is not None and record.tokens_per_s > 0
        assert len(record.expert_load) == 3 and abs(sum(record.expert_load) - 1) < 1e-5
    validations = [r for r in records if r.stage == "validate" and r.val_loss is not None]
    assert [r.step for r in validations] == [0, 3, 6]
    assert result.initial_val_loss == validations[0].val_loss
    assert result.best_val_loss == min(r.val_loss for r in validations[1:])
    assert result.steps == 6 and result.tokens == 6 * 2 * 16
    assert {r.stage for r in records} >= {"data", "train", "validate", "write"}
    assert json.loads((result.out_dir / "router-training.json").read_text())["steps"] == 6


def test_card_and_recipe_gain_a_router_training_section_and_the_recipe_still_reads(trained):
    model, result, _records, _before = trained
    card = (result.out_dir / "README.md").read_text()
    assert "## Router training" in card and "train.txt" in card and "6 of 6 planned" in card
    original_card = (model / "README.md").read_text()
    assert card.startswith(original_card.rstrip())
    text = (result.out_dir / RECIPE_FILENAME).read_text()
    assert "# --- Router training" in text and "0.01 x load-balancing loss" in text
    recipe = load_recipe(result.out_dir / RECIPE_FILENAME)
    assert recipe == load_recipe(model / RECIPE_FILENAME)
    assert not recipe.ignored_keys


@pytest.mark.parametrize("gate_mode", ["random", "cheap_embed"])
def test_training_starts_from_any_gate_mode(llama_donors, tmp_path, gate_mode):
    model = merge_donors(llama_donors, tmp_path / "moe", gate_mode)
    result = train(model, tmp_path / "out", TrainingData(files=(write_text(tmp_path / "t.txt"),)), steps=3)
    before, after = tensors_of(model), tensors_of(result.out_dir)
    changed = {name for name in before if before[name] != after[name]}
    assert changed and all(router_key(name) is not None for name in changed)


def test_qwen2_moe_trains_its_routers_and_shared_expert_gates(qwen2_donors, tmp_path):
    model = merge_donors(qwen2_donors, tmp_path / "moe", "hidden", shared=True)
    result = train(model, tmp_path / "out", TrainingData(files=(write_text(tmp_path / "t.txt"),)), steps=3)
    before, after = tensors_of(model), tensors_of(result.out_dir)
    changed = {name for name in before if before[name] != after[name]}
    kinds = {router_key(name).kind for name in changed}
    assert kinds == {"router", "shared_gate"}


def test_a_bfloat16_model_trains_in_bfloat16_and_keeps_its_routers_in_bfloat16(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_moe(tmp_path / "moe", "qwen3_moe", seed=3)
    AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).save_pretrained(model)
    data = TrainingData(files=(write_text(tmp_path / "t.txt"),))
    result = train(model, tmp_path / "out", data, steps=3, dtype="bfloat16", lr=0.05)
    before, after = tensors_of(model), tensors_of(result.out_dir)
    changed = {name for name in before if before[name] != after[name]}
    assert changed and all(router_key(name) is not None for name in changed)
    assert all(after[name][0] == before[name][0] == "torch.bfloat16" for name in changed)


# --------------------------------------------------------------------------- learning


def make_learnable_toy(folder: Path) -> tuple[Path, Path]:
    """A top-2 Mixtral whose text comes from one routing (the teacher's) while its routers start elsewhere.

    (Top-2, not top-1: Mixtral renormalises the chosen experts' weights, so a single choice always weighs 1
    and the next-token loss would give its router no gradient.) The teacher's experts and output head are
    scaled up so that its text is far from uniform and the experts each token goes to matter; the text
    is sampled from the teacher; the student is the same model with other (random) router weights. Only
    the routers differ, so routers alone can bring the student's loss down to the teacher's.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir = make_tiny_moe(folder / "teacher", "mixtral", seed=11)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in teacher.model.layers:
            for parameter in layer.mlp.experts.parameters():
                parameter.mul_(8.0)
            layer.mlp.gate.weight.normal_(0.0, 4.0)
        teacher.lm_head.weight.mul_(40.0)
    teacher.save_pretrained(teacher_dir)
    with torch.no_grad():
        prompt = torch.full((48, 1), tokenizer.bos_token_id)
        sample = teacher.generate(
            prompt, do_sample=True, max_new_tokens=32, min_new_tokens=32, top_k=0, pad_token_id=tokenizer.pad_token_id
        )
        texts = tokenizer.batch_decode(sample[:, 1:], skip_special_tokens=True)
    data = folder / "teacher.txt"
    data.write_text("\n\n".join(t.replace("\n", " ").strip() for t in texts if t.strip()), encoding="utf-8")
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 4.0)
    student_dir = folder / "student"
    teacher.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    return student_dir, data


def test_loss_goes_down_on_a_learnable_toy(tmp_path):
    student, data = make_learnable_toy(tmp_path)
    result = train(
        student, tmp_path / "out", TrainingData(files=(data,)), steps=12, lr=0.05, eval_every=6, patience=None,
        balance_coef=0.0, batch_size=4, seq_len=32,
    )
    validation = [loss for _step, loss in result.report["history"]["validation"]]
    assert validation[2] < validation[1] < validation[0] - 0.1
    assert result.best_val_loss == validation[2]


# --------------------------------------------------------------------------- resume and cancel


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    model = make_tiny_moe(tmp_path / "moe", "mixtral", seed=2)
    data = TrainingData(files=(write_text(tmp_path / "t.txt"),))
    settings = dict(steps=8, checkpoint_every=4, eval_every=2, patience=None)
    straight = train(model, tmp_path / "straight", data, **settings)

    cancel = threading.Event()
    seen = []

    def stop_after_step_5(record):
        seen.append(record)
        if record.stage == "train" and record.step == 5:
            cancel.set()

    with pytest.raises(Cancelled):
        settings_object = RouterTrainingSettings(**(FAST | settings))
        run_job(train_routers(model, tmp_path / "resumed", settings_object, data, cancel=cancel), stop_after_step_5)
    assert not (tmp_path / "resumed").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    assert [p.name for p in checkpoint_dir(tmp_path / "resumed").iterdir()] == ["step-000000004"]
    with pytest.raises(ProblemsError, match="--resume"):
        train(model, tmp_path / "resumed", data, **settings)
    with pytest.raises(FrankenMoEError, match="settings differ"):
        train(model, tmp_path / "resumed", data, resume=True, **(settings | {"lr": 0.5}))

    resumed = train(model, tmp_path / "resumed", data, resume=True, **settings)
    assert tensors_of(resumed.out_dir) == tensors_of(straight.out_dir)
    assert resumed.report["history"]["loss"] == straight.report["history"]["loss"]
    assert resumed.report["history"]["validation"] == straight.report["history"]["validation"]
    assert not checkpoint_dir(tmp_path / "resumed").exists()  # a finished run removes its checkpoint


@pytest.mark.parametrize("stage", ["train", "write"])
def test_cancel_leaves_nothing(tmp_path, stage):
    """Cancelled at the first step, or while the new folder is being written (after its first file)."""
    model = make_tiny_moe(tmp_path / "moe", "mixtral", seed=2)
    data = TrainingData(files=(write_text(tmp_path / "t.txt"),))
    cancel = threading.Event()

    def on_record(record):
        if record.stage == stage and (stage == "train" or record.done == 1):
            cancel.set()

    with pytest.raises(Cancelled):
        run_job(train_routers(model, tmp_path / "out", RouterTrainingSettings(**(FAST | {"steps": 5})), data,
                              cancel=cancel), on_record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "t.txt"]


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return make_tiny_moe(tmp_path_factory.mktemp("bad") / "moe", "mixtral", seed=4)


def problem_text(excinfo) -> str:
    return " ".join(p.text for p in excinfo.value.problems)


def test_a_dense_model_is_refused(llama_donors, tmp_path):
    with pytest.raises(ProblemsError) as excinfo:
        train(llama_donors["base"], tmp_path / "out", TrainingData(files=(write_text(tmp_path / "t.txt"),)), steps=2)
    assert "dense model" in problem_text(excinfo) and "router" in problem_text(excinfo)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lr", [0.0, -1e-3])
def test_a_learning_rate_of_zero_or_less_is_refused(tiny_moe, tmp_path, lr):
    with pytest.raises(ProblemsError) as excinfo:
        train(tiny_moe, tmp_path / "out", TrainingData(files=(write_text(tmp_path / "t.txt"),)), steps=2, lr=lr)
    assert "learning rate must be above 0" in problem_text(excinfo)


def test_an_output_folder_that_is_not_empty_is_refused_and_kept(tiny_moe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ProblemsError) as excinfo:
        train(tiny_moe, out, TrainingData(files=(write_text(tmp_path / "t.txt"),)), steps=2)
    assert "not empty" in problem_text(excinfo)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_empty_data_is_refused(tiny_moe, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(FrankenMoEError, match="holds no records"):
        train(tiny_moe, tmp_path / "out", TrainingData(files=(empty,)), steps=2)
    with pytest.raises(ProblemsError, match="No training data"):
        train(tiny_moe, tmp_path / "out", TrainingData(), steps=2)
    assert not (tmp_path / "out").exists()


def test_data_shorter_than_a_sequence_is_refused_with_the_length_that_would_do(tiny_moe, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    with pytest.raises(FrankenMoEError) as excinfo:
        train(tiny_moe, tmp_path / "out", TrainingData(files=(short,)), steps=2, seq_len=64)
    assert "fewer than the 128" in excinfo.value.message and "--seq-len" in excinfo.value.hint
    assert not (tmp_path / "out").exists()


def test_running_out_of_memory_names_settings_that_fit(tiny_moe, tmp_path):
    """A memory cap of 32 tokens per forward pass, enforced by a real forward hook on every module."""
    limit = 32

    def cap(_module, args):
        hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
        tokens = hidden.shape[0] * hidden.shape[1] if hidden is not None and hidden.dim() == 3 else 0
        if torch.is_grad_enabled() and tokens > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(cap)
    data = TrainingData(files=(write_text(tmp_path / "t.txt"),))
    try:
        with pytest.raises(FrankenMoEError) as excinfo:
            train(tiny_moe, tmp_path / "out", data, steps=2, batch_size=4, seq_len=16)
        assert "ran out of memory" in excinfo.value.message
        assert "a batch size of 2 (--batch-size)" in excinfo.value.hint
        assert not (tmp_path / "out").exists()
        result = train(tiny_moe, tmp_path / "out", data, steps=2, batch_size=2, seq_len=16)
    finally:
        handle.remove()
    assert result.steps == 2


def test_a_model_without_weights_or_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProblemsError) as excinfo:
        train(tmp_path / "empty", tmp_path / "out", TrainingData(files=(write_text(tmp_path / "t.txt"),)), steps=2)
    assert excinfo.value.problems[0].field == "model"


def test_conflicting_budgets_and_bad_numbers_are_each_named(tiny_moe, tmp_path):
    settings = dict(steps=3, tokens=100, batch_size=0, val_fraction=1.5, balance_coef=-1)
    with pytest.raises(ProblemsError) as excinfo:
        train(tiny_moe, tmp_path / "out", TrainingData(files=(write_text(tmp_path / "t.txt"),)), **settings)
    fields = {p.field for p in excinfo.value.problems}
    assert fields == {"steps", "batch_size", "val_fraction", "balance_coef"}


def test_make_tiny_model_has_no_router(tmp_path):
    """The dense check reads tensor names: a Llama's mlp.gate_proj is not a router."""
    folder = make_tiny_model(tmp_path / "llama", "llama")
    from app.core.training.output import stored_router_names

    assert stored_router_names(folder) == {}
