"""NLL evaluation against transformers' own loss, routing overrides against models saved that way."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from app.core.eval.controls import RoutingOverride, k_sweep, overridden_rule, routing_override
from app.core.eval.data import EvalDataset
from app.core.eval.nll import EvalModel, EvalRequest, comparison_models, evaluate, score_loaded_model
from app.core.problems import FrankenMoEError
from app.core.progress import Cancelled, Progress, run_job
from tests.chat_models import make_tiny_moe, write_expert_names
from tests.models import make_tiny_model

TEXTS = EvalDataset(
    "prose",
    (
        "the quick brown fox jumps over the lazy dog",
        "a",
        "one two three four five six seven eight nine ten eleven twelve",
        "hello world",
        "Mixture of experts models route every token to a few experts.",
    ),
)
CODE = EvalDataset("code", ("def f(x):\n    return x + 1", "print(sum(range(10)))", "for i in range(3): pass"))
CHATS = EvalDataset(
    "chats",
    (
        ({"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}),
        ({"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}),
    ),
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    folders = {arch: make_tiny_moe(root / arch, arch, seed=7) for arch in ("mixtral", "qwen2_moe", "qwen3_moe")}
    folders["dense"] = make_tiny_model(root / "dense", "llama", seed=3)
    return folders


def load(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def reference_nll(model: Any, tokenizer: Any, dataset: EvalDataset) -> tuple[float, int]:
    """transformers' own loss (labels=input_ids), one record at a time, weighted by predicted tokens."""
    import torch

    total, count = 0.0, 0
    for record in dataset.records:
        if isinstance(record, str):
            ids = tokenizer(record, return_tensors="pt").input_ids
        else:
            text = tokenizer.apply_chat_template(list(record), tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return total / count, count


def nll_of(report_results: list[Any], model: str, dataset: str) -> Any:
    [result] = [r for r in report_results if (r.model, r.dataset, r.override.is_default) == (model, dataset, True)]
    return result


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "dense"])
def test_nll_agrees_with_transformers_loss(models: dict[str, Path], name: str) -> None:
    request = EvalRequest(
        models=(EvalModel(name, str(models[name])),), datasets=(TEXTS, CODE, CHATS), batch_size=2, device="cpu"
    )
    report = run_job(evaluate(request))
    model, tokenizer = load(models[name])
    for dataset in (TEXTS, CODE, CHATS):
        expected, tokens = reference_nll(model, tokenizer, dataset)
        result = nll_of(report.results, name, dataset.name)
        assert result.tokens == tokens
        assert result.nll == pytest.approx(expected, rel=0.002)
        assert result.ppl == pytest.approx(2.718281828459045**expected, rel=0.002)
    layout = json.loads(json.dumps(report.to_json()))
    assert layout["models"] == [name]
    assert layout["datasets"] == ["prose", "code", "chats"]
    assert {(r["model"], r["dataset"]) for r in layout["results"]} == {(name, d) for d in layout["datasets"]}
    assert "labels=input_ids" in layout["scoring"]
    assert (name in layout["routing"]) == (name != "dense")


def test_left_and_right_padding_give_the_same_nll(models: dict[str, Path]) -> None:
    model, tokenizer = load(models["qwen2_moe"])
    scores = {
        side: run_job(score_loaded_model(model, tokenizer, [TEXTS, CODE], batch_size=3, padding_side=side))
        for side in ("left", "right")
    }
    one_by_one = run_job(score_loaded_model(model, tokenizer, [TEXTS, CODE], batch_size=1))
    for left, right, single in zip(scores["left"].results, scores["right"].results, one_by_one.results, strict=True):
        assert left.tokens == right.tokens == single.tokens
        assert left.nll == pytest.approx(single.nll, rel=1e-5)
        assert right.nll == pytest.approx(single.nll, rel=1e-5)


def saved_with_top_k(folder: Path, destination: Path, top_k: int) -> Path:
    shutil.copytree(folder, destination)
    config = json.loads((destination / "config.json").read_text())
    config["num_experts_per_tok"] = top_k
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_top_k_override_equals_a_model_saved_with_that_top_k(
    models: dict[str, Path], tmp_path: Path, name: str
) -> None:
    model, tokenizer = load(models[name])
    sweep = [RoutingOverride(top_k=k) for k in (1, 2, 4)]
    scores = run_job(score_loaded_model(model, tokenizer, [TEXTS], overrides=sweep, batch_size=2))
    by_k = {r.override.top_k: r.nll for r in scores.results}
    assert len(set(by_k.values())) == 3  # k changes the model's output
    for k in (1, 2, 4):
        saved_model, _ = load(saved_with_top_k(models[name], tmp_path / f"k{k}", k))
        [expected] = run_job(score_loaded_model(saved_model, tokenizer, [TEXTS], batch_size=2)).results
        assert by_k[k] == pytest.approx(expected.nll, rel=1e-5)


def without_expert(model: Any, expert: int) -> Any:
    """The same model rebuilt with one routed expert fewer: its router row and its weights cut out."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config.to_dict()
    key = "num_local_experts" if "num_local_experts" in config else "num_experts"
    count = config[key]
    config[key] = count - 1
    smaller = AutoModelForCausalLM.from_config(type(model.config).from_dict(config))
    keep = torch.tensor([i for i in range(count) if i != expert])
    state = {
        name: tensor.index_select(0, keep) if tensor.dim() >= 2 and tensor.shape[0] == count else tensor
        for name, tensor in model.state_dict().items()
    }
    smaller.load_state_dict(state)
    return smaller.eval()


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_switching_an_expert_off_equals_a_model_without_it(models: dict[str, Path], name: str) -> None:
    model, tokenizer = load(models[name])
    off = RoutingOverride(disabled=frozenset({1}))
    scores = run_job(score_loaded_model(model, tokenizer, [TEXTS, CODE], overrides=[RoutingOverride(), off]))
    expected = run_job(score_loaded_model(without_expert(model, 1), tokenizer, [TEXTS, CODE])).results
    ablated = [r for r in scores.results if r.override == off]
    default = [r for r in scores.results if r.override.is_default]
    for result, reference, before in zip(ablated, expected, default, strict=True):
        assert result.nll == pytest.approx(reference.nll, rel=1e-5)
        assert result.nll != before.nll
    routing = scores.routing[off.label()]["datasets"]
    for stats in routing.values():
        assert all(row[1] == 0 for row in stats["top1_share"])
        assert 1 in stats["dead_experts"]


def test_routing_override_is_undone_on_exit_and_seen_by_the_chat_capture(models: dict[str, Path]) -> None:
    import torch

    from app.core.chat.capture import RouterCapture, find_routers

    model, tokenizer = load(models["mixtral"])
    capture = RouterCapture(model)  # attached first, as the chat attaches it
    override = RoutingOverride(top_k=1, disabled=frozenset({0, 2}))
    ids = tokenizer(TEXTS.records[2], return_tensors="pt").input_ids
    routers = list(find_routers(model).values())
    before_hooks = [len(r._forward_hooks) for r in routers]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with routing_override(model, override):
            capture.rule = overridden_rule(capture.rule, override)
            capture.begin_step()
            capture.enabled = True
            during = model(input_ids=ids).logits
            capture.enabled = False
            step = capture.finish_step()
        after = model(input_ids=ids).logits
    assert not torch.equal(before, during)
    assert torch.equal(before, after)
    assert [len(r._forward_hooks) for r in routers] == before_hooks
    assert [r.top_k for r in routers] == [2, 2]
    assert set(step.experts.ravel().tolist()) <= {1, 3}  # the capture sees the masked router logits
    assert step.experts.shape[-1] == 1
    assert step.weights.ravel().tolist() == pytest.approx([1.0] * step.weights.size)


@pytest.mark.parametrize(
    ("override", "wording"),
    [
        (RoutingOverride(top_k=0), "0 experts per token"),
        (RoutingOverride(top_k=5), "5 experts per token"),
        (RoutingOverride(disabled=frozenset({0, 1, 2, 3})), "every one of the 4 experts"),
        (RoutingOverride(disabled=frozenset({7})), "expert 7 does not exist"),
        (RoutingOverride(top_k=3, disabled=frozenset({0, 1})), "more than the 2 experts left"),
    ],
)
def test_impossible_overrides_are_refused_before_loading(
    models: dict[str, Path], override: RoutingOverride, wording: str
) -> None:
    request = EvalRequest(models=(EvalModel("moe", str(models["mixtral"])),), datasets=(TEXTS,), overrides=(override,))
    records: list[Progress] = []
    with pytest.raises(FrankenMoEError, match=wording) as error:
        run_job(evaluate(request), records.append)
    assert error.value.hint
    assert records == []  # nothing was loaded


def test_overrides_on_a_dense_model_are_refused(models: dict[str, Path]) -> None:
    model, _ = load(models["dense"])
    with pytest.raises(FrankenMoEError, match="no experts"), routing_override(model, RoutingOverride(top_k=1)):
        pass
    request = EvalRequest(
        models=(EvalModel("base", str(models["dense"])),), datasets=(TEXTS,), overrides=(RoutingOverride(top_k=1),)
    )
    records: list[Progress] = []
    with pytest.raises(FrankenMoEError, match="none of the models has experts"):
        run_job(evaluate(request), records.append)
    assert records == []


def test_a_folder_that_is_not_a_causal_lm_is_named(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path / "bert")
    (tmp_path / "empty").mkdir()
    for folder, wording in (("bert", "BertModel, not a causal language model"), ("empty", "config.json")):
        request = EvalRequest(models=(EvalModel(folder, str(tmp_path / folder)),), datasets=(TEXTS,), device="cpu")
        with pytest.raises(FrankenMoEError, match=wording) as error:
            run_job(evaluate(request))
        assert error.value.hint, str(error.value)


def test_evaluate_reports_progress_and_stops_on_cancel(models: dict[str, Path]) -> None:
    request = EvalRequest(
        models=(EvalModel("moe", str(models["mixtral"])), EvalModel("base", str(models["dense"]))),
        datasets=(TEXTS, CODE),
        batch_size=1,
        device="cpu",
    )
    records: list[Progress] = []
    report = run_job(evaluate(request), records.append)
    scoring = [r for r in records if r.stage == "scoring moe"]
    assert [r.done for r in scoring] == list(range(len(TEXTS.records) + len(CODE.records) + 1))
    assert {r.stage for r in records} >= {"loading moe", "scoring moe", "loading base", "scoring base"}
    assert [(r.model, r.dataset) for r in report.results] == [
        ("moe", "prose"), ("moe", "code"), ("base", "prose"), ("base", "code")
    ]

    cancel = threading.Event()
    job = evaluate(request, cancel)
    seen: list[Progress] = []
    with pytest.raises(Cancelled):
        for record in job:
            seen.append(record)
            if record.stage == "scoring moe" and record.done == 2:
                cancel.set()
    assert seen[-1].done == 2
    assert not any(r.stage.endswith("base") for r in seen)


def test_a_dataset_with_nothing_to_predict_is_refused(models: dict[str, Path]) -> None:
    model, tokenizer = load(models["dense"])
    with pytest.raises(FrankenMoEError, match="no token to predict"):
        run_job(score_loaded_model(model, tokenizer, [EvalDataset("tiny", ("",))]))


def test_comparison_models_come_from_the_recipe_beside_the_merge(tmp_path: Path) -> None:
    folder = tmp_path / "merged"
    folder.mkdir()
    with pytest.raises(FrankenMoEError, match="has no frankenmoe-recipe"):
        comparison_models(folder)
    write_expert_names(folder, ("maths", "code", "prose"))
    assert [(m.name, m.path) for m in comparison_models(folder)] == [
        ("moe", str(folder)),
        ("base", "base"),
        ("donor-0", "donor-0"),
        ("donor-1", "donor-1"),
        ("donor-2", "donor-2"),
    ]


def test_records_longer_than_the_context_are_cut_to_it(models: dict[str, Path]) -> None:
    import torch

    model, tokenizer = load(models["dense"])
    context = model.config.max_position_embeddings
    text = " ".join(f"word{i % 37} and more" for i in range(context))
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] > context
    cut = ids[:, :context]
    with torch.no_grad():
        expected = float(model(input_ids=cut, labels=cut).loss)
    [result] = run_job(score_loaded_model(model, tokenizer, [EvalDataset("long", (text,))])).results
    assert result.tokens == context - 1
    assert result.nll == pytest.approx(expected, rel=1e-5)


def test_a_k_sweep_scores_the_moe_at_every_k_and_a_dense_model_once(models: dict[str, Path]) -> None:
    sweep = k_sweep(4, disabled=frozenset({3}))
    assert [(o.top_k, o.disabled) for o in sweep] == [(1, {3}), (2, {3}), (3, {3})]
    request = EvalRequest(
        models=(EvalModel("moe", str(models["mixtral"])), EvalModel("base", str(models["dense"]))),
        datasets=(CODE,),
        overrides=sweep,
        device="cpu",
    )
    report = run_job(evaluate(request))
    assert [(r.model, r.override.top_k) for r in report.results] == [("moe", 1), ("moe", 2), ("moe", 3), ("base", None)]
    assert list(report.routing["moe"]) == [o.label() for o in sweep]
    assert "base" not in report.routing
    with pytest.raises(FrankenMoEError, match="every one of the 2 experts"):
        k_sweep(2, disabled=frozenset({0, 1}))
