"""Evaluation datasets: data files, recipe prompts, and the errors for files that cannot be read."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from app.core.eval.data import hub_dataset, load_data_file, recipe_datasets
from app.core.eval.routing_stats import RoutingCounts, confusion, dataset_routing
from app.core.problems import FrankenMoEError
from app.core.recipe import parse_recipe


def test_text_file_records_are_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "prose.txt"
    path.write_text("first line\nsame paragraph\n\n\n  second paragraph  \n\nthird\n", encoding="utf-8")
    dataset = load_data_file(path)
    assert dataset.name == "prose"
    assert dataset.records == ("first line\nsame paragraph", "second paragraph", "third")


def test_jsonl_text_and_messages(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path.write_text(json.dumps({"text": "plain"}) + "\n\n" + json.dumps({"messages": messages}) + "\n")
    dataset = load_data_file(path)
    assert dataset.records == ("plain", tuple(messages))


@pytest.mark.parametrize(
    ("name", "content", "wording"),
    [
        ("empty.txt", b"", "holds no records"),
        ("blank.jsonl", b"\n  \n", "holds no records"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "not UTF-8"),
        ("fields.jsonl", b'{"prompt": "x"}\n', "line 1 has no text or messages field"),
        ("broken.jsonl", b'{"text": "x"}\n{"text": \n', "line 2 is not JSON"),
        ("roles.jsonl", b'{"messages": [{"content": "x"}]}\n', "messages must be"),
        ("table.csv", b"text\nx\n", "not a data file"),
    ],
)
def test_unreadable_data_files_are_named(tmp_path: Path, name: str, content: bytes, wording: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(FrankenMoEError, match=wording) as error:
        load_data_file(path)
    assert error.value.hint


def test_missing_data_file(tmp_path: Path) -> None:
    with pytest.raises(FrankenMoEError, match="does not exist"):
        load_data_file(tmp_path / "nowhere.txt")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(FrankenMoEError, match="needs pyarrow"):
        load_data_file(path)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow is not installed")
def test_parquet_text_column(tmp_path: Path) -> None:
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "data.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": ["a b", "c d"]}), path)
    assert load_data_file(path).records == ("a b", "c d")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    pyarrow.parquet.write_table(pyarrow.table({"messages": [chat]}), path)
    assert load_data_file(path).records == (tuple(chat),)
    pyarrow.parquet.write_table(pyarrow.table({"prompt": ["a"]}), path)
    with pytest.raises(FrankenMoEError, match="no text or messages column"):
        load_data_file(path)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hub_dataset_without_the_library_says_what_to_install() -> None:
    with pytest.raises(FrankenMoEError, match="needs the datasets library"):
        hub_dataset("someone/texts")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_hub_dataset_through_the_datasets_library(tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"body": f"text {i}"}) + "\n" for i in range(5)))
    cache = tmp_path / "cache"
    dataset = hub_dataset(str(folder), split="train", field="body", limit=3, cache_dir=cache)
    assert (dataset.name, dataset.records) == ("texts", ("text 0", "text 1", "text 2"))
    with pytest.raises(FrankenMoEError, match="no 'text' column"):
        hub_dataset(str(folder), split="train", cache_dir=cache)
    with pytest.raises(FrankenMoEError, match="cannot load split 'test'"):
        hub_dataset(str(folder), split="test", cache_dir=cache)


def test_recipe_prompts_per_expert() -> None:
    recipe = parse_recipe(
        "base_model: base\ngate_mode: hidden\nexperts:\n"
        "  - source_model: maths-model\n    positive_prompts: ['What is 2+2?', 'Solve x']\n"
        "  - source_model: code-model\n    positive_prompts: ['Write a loop']\n"
        "frankenmoe:\n  experts:\n    - {label: maths, test_prompts: ['What is 3*3?', 'Solve x']}\n"
        "    - {label: code}\n"
    )
    datasets = recipe_datasets(recipe)
    assert [(d.name, d.records) for d in datasets] == [
        ("maths", ("What is 2+2?", "Solve x", "What is 3*3?")),
        ("code", ("Write a loop",)),
    ]


def test_routing_statistics_on_a_crafted_case() -> None:
    counts = RoutingCounts(layers=(0, 2), num_experts=4)
    # Layer 0 spreads 8 tokens evenly over the 4 experts; layer 2 sends all of them to expert 1.
    counts.add(np.array([[0, 1], [1, 1], [2, 1], [3, 1]]))
    counts.add(np.array([[0, 1], [1, 1], [2, 1], [3, 1]]))
    maths = dataset_routing("maths", counts)
    assert maths.tokens == 8
    np.testing.assert_allclose(maths.top1_share, [[0.25, 0.25, 0.25, 0.25], [0, 1, 0, 0]])
    assert maths.entropy == pytest.approx((1.0, 0.0))
    assert maths.dead_experts == ()

    skewed = RoutingCounts(layers=(0,), num_experts=4)
    skewed.add(np.array([[0]] * 150 + [[2]] * 49 + [[3]]))
    code = dataset_routing("Code", skewed)
    assert code.dead_experts == (1, 3)  # expert 3 has 0.5 % of the tokens, expert 1 none

    table = confusion([maths, code, dataset_routing("prose", skewed)], ("maths", "code", "chat", "other"))
    assert table["matched"] == {"maths": 0, "Code": 1}
    assert table["shares"][0] == pytest.approx([0.125, 0.625, 0.125, 0.125])
    assert table["accuracy"] == pytest.approx((0.125 + 0.0) / 2)
