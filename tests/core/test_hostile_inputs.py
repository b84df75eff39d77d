"""Hostile input files, each built here: one clear error naming the problem and its fix, nothing lost or written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.core.compat import check_recipe, tokenizer_fingerprint
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.merge.shards import WriteError
from app.core.problems import FrankenMoEError, ProblemsError
from app.core.progress import run_job
from app.core.prompt_tokens import load_prompt_tokenizer
from app.core.recipe import MAX_EXPERTS, load_recipe, parse_recipe
from app.core.sources import (
    MAX_CONFIG_JSON_BYTES,
    MAX_TOKENIZER_JSON_BYTES,
    SAFETENSORS_INDEX,
    ModelSource,
    ModelSourceError,
)
from tests.cli.test_cli import frankenmoe
from tests.core.test_merge import leftovers, recipe_for
from tests.hostile import billion_laughs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def donors(llama_donors, tmp_path) -> dict[str, Path]:
    """Copies of the Llama donors, so that a test that fails cannot damage the shared ones."""
    root = tmp_path / "donors"
    return {name: Path(shutil.copytree(folder, root / name)) for name, folder in llama_donors.items()}


def merge(recipe, out, **options):
    return run_job(merge_moe(recipe, MergeOptions(out_dir=out, **options)))


def rewrite_header(file: Path, edit) -> None:
    """Rewrite a safetensors file's header JSON through edit(header) -> new header, keeping its data."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    encoded = json.dumps(edit(header)).encode()
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


def weight_names(header: dict) -> list[str]:
    return sorted(name for name in header if name != "__metadata__")


# --------------------------------------------------------------------------- output through a symlink


def test_an_input_model_reached_through_a_symlink_is_never_the_output(donors, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lnk").symlink_to(donors["base"].parent, target_is_directory=True)
    before = (donors["expert1"] / "model.safetensors").read_bytes()
    with pytest.raises(FrankenMoEError, match="holds an input model"):
        merge(recipe_for(donors), out / "lnk" / "expert1", overwrite=True)
    assert (donors["expert1"] / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in donors["base"].parent.iterdir()) == sorted(donors)


def test_a_merge_into_a_symlink_to_an_empty_folder_fills_that_folder(donors, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "lnk").symlink_to(target, target_is_directory=True)
    merge(recipe_for(donors), out / "lnk")
    assert (out / "lnk").is_symlink()
    assert (target / "config.json").is_file()
    assert leftovers(out) == [] and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- hostile safetensors files


def test_an_index_naming_a_file_outside_the_model_is_refused_unread(donors, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"stolen": torch.ones(2)}, outside / "x.safetensors")
    folder = donors["expert0"]
    with ModelSource(folder) as source:
        names = source.tensor_names
    weight_map = dict.fromkeys(names, "model.safetensors") | {"stolen": "../outside/x.safetensors"}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelSourceError, match="outside the model folder") as caught:
        ModelSource(folder)
    assert "../outside/x.safetensors" in caught.value.message
    for hostile in ("/tmp/x.safetensors", "..\\..\\x.safetensors", "C:/x.safetensors"):
        (folder / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"a": hostile}}))
        with pytest.raises(ModelSourceError, match="outside the model folder"):
            ModelSource(folder)


def _overlap(header: dict) -> dict:
    first, second = weight_names(header)[:2]
    header[second]["data_offsets"] = list(header[first]["data_offsets"])
    header[second]["shape"] = list(header[first]["shape"])
    return header


def _negative_start(header: dict) -> dict:
    name = weight_names(header)[0]
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start - 16, end - 16]  # would read the header's JSON text
    return header


def _wrong_size(header: dict) -> dict:
    name = weight_names(header)[0]
    header[name]["shape"] = [*header[name]["shape"], 2]
    return header


def _backwards(header: dict) -> dict:
    name = weight_names(header)[0]
    header[name]["data_offsets"] = header[name]["data_offsets"][::-1]
    return header


def _past_the_end(header: dict) -> dict:
    name = weight_names(header)[-1]
    header[name]["data_offsets"][1] += 10**9
    return header


def _set_entry(key: str, value: object):
    def edit(header: dict) -> dict:
        header[weight_names(header)[0]][key] = value
        return header

    return edit


def _drop_offsets(header: dict) -> dict:
    del header[weight_names(header)[0]]["data_offsets"]
    return header


HOSTILE_HEADERS = {
    "overlapping data_offsets": (_overlap, "share bytes"),
    "negative data_offsets": (_negative_start, "not two byte offsets"),
    "bytes unlike shape x dtype": (_wrong_size, "needs"),
    "end before start": (_backwards, "end before they start"),
    "end past the file": (_past_the_end, "truncated"),
    "missing data_offsets": (_drop_offsets, "data_offsets None"),
    "data_offsets a string": (_set_entry("data_offsets", "0-8"), "not two byte offsets"),
    "data_offsets of floats": (_set_entry("data_offsets", [0.0, 8.5]), "not two byte offsets"),
    "shape a string": (_set_entry("shape", "32x32"), "not a list of sizes"),
    "dtype Q4_K": (_set_entry("dtype", "Q4_K"), "'Q4_K', a dtype FrankenMoE Studio cannot merge"),
    "dtype F8_E8M0": (_set_entry("dtype", "F8_E8M0"), "'F8_E8M0', a dtype FrankenMoE Studio cannot merge"),
    "entry a number": (lambda h: h | {weight_names(h)[0]: 3}, "has no dtype, shape and data_offsets"),
    "header a JSON list": (lambda h: [h], "header is a JSON list, not an object"),
    "header a JSON string": (lambda h: "weights", "header is a JSON str, not an object"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_a_hostile_safetensors_header_is_refused_before_any_output(donors, tmp_path, case):
    edit, expected = HOSTILE_HEADERS[case]
    rewrite_header(donors["expert1"] / "model.safetensors", edit)
    with pytest.raises(ModelSourceError) as caught:
        ModelSource(donors["expert1"])
    assert expected in caught.value.message
    assert caught.value.hint
    # Merging refuses it the same way, and writes nothing.
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FrankenMoEError) as merged:
        merge(recipe_for(donors), out / "moe")
    assert expected in str(merged.value)
    assert list(out.iterdir()) == []


def test_the_cli_reports_a_hostile_header_in_one_message(donors, tmp_path):
    rewrite_header(donors["expert2"] / "model.safetensors", _overlap)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        "\n".join(
            [
                f"base_model: {donors['base']}",
                "gate_mode: random",
                "experts:",
                *(f"  - source_model: {donors[f'expert{i}']}" for i in range(3)),
            ]
        )
    )
    result = frankenmoe("merge", str(recipe), str(tmp_path / "moe"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "share bytes" in result.stdout + result.stderr
    assert not (tmp_path / "moe").exists()


# --------------------------------------------------------------------------- a disk that fills up


def test_a_disk_filling_up_mid_merge_gives_one_message_and_leaves_nothing(donors, tmp_path, monkeypatch):
    if not hasattr(os, "copy_file_range"):
        pytest.skip("the kernel copy is where this test makes the disk fill up")
    calls = []

    def full_disk(*args, **kwargs):
        calls.append(args)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", full_disk)
    with pytest.raises(WriteError) as caught:
        merge(recipe_for(donors), tmp_path / "moe")
    assert "disk filled up" in caught.value.message
    assert "free some space" in caught.value.hint
    assert len(calls) > 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["donors"]


# --------------------------------------------------------------------------- recipes


def test_a_recipe_that_is_not_utf8_is_one_problem(tmp_path):
    path = tmp_path / "recipe.yml"
    path.write_bytes("base_model: ./b\nexperts: [{source_model: ./é}]\n".encode("latin-1"))
    with pytest.raises(ProblemsError) as caught:
        load_recipe(path)
    [problem] = caught.value.problems
    assert "is not UTF-8 text" in problem.message
    assert "UTF-8" in problem.hint


@pytest.mark.parametrize(
    ("line", "field", "expected"),
    [
        ("noise_scale: .nan", "experts.0.noise_scale", "finite"),
        ("noise_scale: .inf", "experts.0.noise_scale", "finite"),
        ("residual_scale: .nan", "experts.0.residual_scale", "finite"),
        ("residual_scale: -.inf", "experts.0.residual_scale", "finite"),
        ("noise_scale: -0.5", "experts.0.noise_scale", "greater than or equal to 0"),
        ("noise_scale: 50", "experts.0.noise_scale", "less than or equal to 1"),
        ("residual_scale: 1e300", "experts.0.residual_scale", "less than or equal to 10"),
    ],
)
def test_scales_must_be_finite_and_in_range(line, field, expected):
    text = f"base_model: ./base\nexperts:\n  - source_model: ./a\n    {line}\n  - source_model: ./b\n"
    with pytest.raises(ProblemsError) as caught:
        parse_recipe(text)
    [problem] = caught.value.problems
    assert problem.field == field
    assert expected in problem.message
    assert problem.line == 4
    assert problem.hint


def test_a_seed_too_large_for_torch_is_refused_in_the_recipe(donors, tmp_path):
    text = "\n".join(
        [
            f"base_model: {donors['base']}",
            "gate_mode: random",
            "experts:",
            *(f"  - source_model: {donors[f'expert{i}']}" for i in range(2)),
            "frankenmoe:",
            f"  seed: {10**26}",
        ]
    )
    with pytest.raises(ProblemsError) as caught:
        parse_recipe(text)
    [problem] = caught.value.problems
    assert problem.field == "frankenmoe.seed"
    assert "less than or equal to" in problem.message
    assert problem.line == 7
    assert parse_recipe(text.replace(str(10**26), str(2**63 - 1))).studio.seed == 2**63 - 1


def test_a_billion_laughs_recipe_is_read_without_expanding_its_aliases():
    text = billion_laughs(9)  # 9**10 strings once expanded
    assert len(text) < 1200
    finished = threading.Event()
    outcome: list[object] = []

    def parse() -> None:
        try:
            outcome.append(parse_recipe(text))
        finally:
            finished.set()

    threading.Thread(target=parse, daemon=True).start()
    # Unexpanded, reading takes milliseconds; expanded, it would not end in days.
    assert finished.wait(120)
    [recipe] = outcome
    assert len(recipe.ignored_keys) == 10


def test_more_experts_than_any_moe_are_refused_before_opening_them(donors):
    experts = "\n".join(f"  - source_model: {donors['expert0']}" for _ in range(MAX_EXPERTS + 1))
    recipe = parse_recipe(
        f"base_model: {donors['base']}\ngate_mode: random\nfrankenmoe: {{allow_identical_experts: true}}\n"
        f"experts:\n{experts}\n"
    )
    problems = check_recipe(recipe)
    assert [p.field for p in problems if p.is_error] == ["experts"]
    assert f"more than the {MAX_EXPERTS}" in problems[0].message


# --------------------------------------------------------------------------- oversized JSON


def grow(path: Path, size: int) -> None:
    """Make a file `size` bytes long without writing them (a sparse file): only its size is ever read."""
    with path.open("r+b") as handle:
        handle.truncate(size)


def test_an_oversized_config_json_is_refused_unread(donors):
    grow(donors["expert0"] / "config.json", MAX_CONFIG_JSON_BYTES + 1)
    with pytest.raises(ModelSourceError) as caught:
        ModelSource(donors["expert0"])
    assert f"past the {MAX_CONFIG_JSON_BYTES // 2**20} MB limit for config.json" in caught.value.message


def test_oversized_tokenizer_files_are_refused_unread(donors):
    grow(donors["expert0"] / "tokenizer.json", MAX_TOKENIZER_JSON_BYTES + 1)
    with pytest.raises(FrankenMoEError, match=f"{MAX_TOKENIZER_JSON_BYTES // 2**20} MB limit for tokenizer.json"):
        tokenizer_fingerprint(donors["expert0"])
    with pytest.raises(FrankenMoEError, match=f"{MAX_TOKENIZER_JSON_BYTES // 2**20} MB limit for tokenizer.json"):
        load_prompt_tokenizer(donors["expert0"])
    grow(donors["expert1"] / "tokenizer_config.json", MAX_CONFIG_JSON_BYTES + 1)
    with pytest.raises(FrankenMoEError, match=r"limit for tokenizer_config\.json"):
        load_prompt_tokenizer(donors["expert1"])


def test_an_oversized_safetensors_header_is_refused_unread(donors):
    file = donors["expert0"] / "model.safetensors"
    raw = file.read_bytes()
    file.write_bytes(struct.pack("<Q", 200 * 2**20) + raw[8:])
    with pytest.raises(ModelSourceError, match="past the 100 MB limit"):
        ModelSource(donors["expert0"])


def test_a_disk_filling_up_while_the_side_files_are_written_gives_one_message(donors, tmp_path, monkeypatch):
    if not hasattr(os, "sendfile"):
        pytest.skip("shutil copies the tokenizer files with sendfile only on Linux")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "sendfile", full_disk)
    with pytest.raises(WriteError, match="disk filled up"):
        merge(recipe_for(donors), tmp_path / "moe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["donors"]


def test_a_prompts_file_that_is_not_utf8_is_one_message(tmp_path):
    from app.core.routing_eval import load_labelled_prompts

    path = tmp_path / "prompts.yml"
    path.write_bytes("0: [café]\n".encode("latin-1"))
    with pytest.raises(FrankenMoEError, match="cannot read prompts") as caught:
        load_labelled_prompts(path, ["a", "b"])
    assert "UTF-8" in caught.value.hint
