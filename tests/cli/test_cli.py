from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from app import __version__
from app.cli.engine_commands import parse_size
from app.core.recipe import parse_recipe, save_recipe

REPO = Path(__file__).resolve().parents[2]


def frankenmoe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own, with this process's environment (monkeypatched variables included)."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.fixture
def recipe_file(llama_donors, tmp_path):
    recipe = parse_recipe(
        "\n".join(
            [
                f"base_model: {llama_donors['base']}",
                "gate_mode: hidden",
                "experts:",
                f"  - source_model: {llama_donors['expert0']}",
                "    positive_prompts: ['What is 12 plus 30?']",
                f"  - source_model: {llama_donors['expert1']}",
                "    positive_prompts: ['def add(a, b): return a + b']",
                f"  - source_model: {llama_donors['expert2']}",
                "    positive_prompts: ['The storm rolled in over the sea.']",
            ]
        )
    )
    path = tmp_path / "recipe.yml"
    save_recipe(recipe, path)
    return path


def test_version():
    result = frankenmoe("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"FrankenMoE Studio {__version__}"


def test_merge_writes_a_loadable_model(recipe_file, tmp_path):
    out = tmp_path / "moe"
    result = frankenmoe("merge", str(recipe_file), str(out), "--dtype", "bfloat16", "--shard-size", "50KB")
    assert result.returncode == 0, result.stderr
    assert f"merged 3 experts into {out}" in result.stdout
    # The tqdm bars: writing waits for the gates without starting over, sizes read as in the summary.
    lines = [line.strip() for line in re.split(r"[\r\n]", result.stderr) if line.strip()]
    writing = [int(m.group(1)) for line in lines if (m := re.match(r"writing:\s+(\d+)%", line))]
    assert writing and writing == sorted(writing), writing
    assert any(line.startswith("writing:") and "waiting for the gates" in line for line in lines)
    summary_size = re.search(r"\((\d+\.\d (?:kB|MB)) in \d+ shard", result.stdout)
    assert summary_size and f"/ {summary_size.group(1)}" in result.stderr
    assert "step/s" not in result.stderr
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 3


def test_merge_refuses_an_existing_folder_with_a_clear_message(recipe_file, tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "config.json").write_text("{}")
    result = frankenmoe("merge", str(recipe_file), str(out), "--quiet")
    assert result.returncode == 1
    assert "already exists and is not empty" in result.stderr
    assert "fix: choose another folder, or allow overwriting (--overwrite)" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "config.json").read_text() == "{}"
    assert frankenmoe("merge", str(recipe_file), str(out), "--quiet", "--overwrite").returncode == 0


def test_check_prints_gate_diagnostics(recipe_file):
    result = frankenmoe("check", str(recipe_file), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "recipe OK: 3 experts, top-2, gate mode hidden" in result.stdout
    assert "layer  condition  most similar pair" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.strip().startswith(("0 ", "1 "))]) == 2


def test_check_fails_on_a_recipe_that_cannot_be_merged(recipe_file, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(recipe_file.read_text().replace("experts_per_token: 2", "experts_per_token: 7"))
    result = frankenmoe("check", str(bad))
    assert result.returncode == 1
    assert "experts_per_token setting is 7, but there are only 3 experts" in result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_recipe_is_one_message_with_its_line(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("base_model: a/b\nexperts: [\n")
    result = frankenmoe("merge", str(bad), str(tmp_path / "out"))
    assert result.returncode == 1
    assert "(line 3)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1234") == 1234
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")


def test_check_routing_and_eval_routing(recipe_file, tmp_path):
    from app.core.recipe import ExpertExtras, StudioExtras, load_recipe

    recipe = load_recipe(recipe_file)
    held_out = ("What is 9 times 9?", "def mul(a, b): return a * b", "The cat slept by the fire.")
    extras = tuple(
        ExpertExtras(label=name, test_prompts=(text,))
        for name, text in zip(("maths", "code", "prose"), held_out, strict=True)
    )
    recipe = recipe.model_copy(update={"gate_mode": "calibrated", "studio": StudioExtras(experts=extras)})
    save_recipe(recipe, recipe_file)

    checked = frankenmoe("check", str(recipe_file), "--routing", "--device", "cpu")
    assert checked.returncode == 0, checked.stderr
    assert "calibrated routers fitted in" in checked.stdout
    assert "routing: " in checked.stdout and "of 3 test prompts" in checked.stdout
    assert "expert usage: maths " in checked.stdout

    out = tmp_path / "moe"
    assert frankenmoe("merge", str(recipe_file), str(out), "--quiet").returncode == 0
    prompts = tmp_path / "held-out.yml"
    prompts.write_text("maths: ['What is 9 times 9?']\n2: ['The cat slept by the fire.']\n")
    evaluated = frankenmoe("eval-routing", str(out), str(prompts), "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "of 2 test prompts" in evaluated.stdout
    # The recipe itself works as a prompts file: its test prompts are used.
    assert "of 3 test prompts" in frankenmoe("eval-routing", str(out), str(recipe_file)).stdout
    bad = tmp_path / "bad.yml"
    bad.write_text("poetry: ['Roses are red']\n")
    refused = frankenmoe("eval-routing", str(out), str(bad))
    assert refused.returncode == 1
    assert "'poetry' is not an expert of this model" in refused.stderr


def test_eval_routing_lists_the_misrouted_prompts_worst_first(llama_donors, tmp_path, capsys):
    from app.cli.main import run_cli
    from app.core.merge.pipeline import MergeOptions, merge_moe
    from app.core.progress import run_job
    from app.core.routing_eval import evaluate_model_routing, load_labelled_prompts

    recipe = parse_recipe(
        "\n".join(
            [
                f"base_model: {llama_donors['base']}",
                "gate_mode: hidden",
                "experts:",
                f"  - source_model: {llama_donors['expert0']}",
                "    positive_prompts: ['What is 7 times 8?']",
                f"  - source_model: {llama_donors['expert1']}",
                "    positive_prompts: ['for i in range(10): print(i)']",
                f"  - source_model: {llama_donors['expert2']}",
                "    positive_prompts: ['The storm rolled in over the grey sea.']",
                "frankenmoe:",
                "  experts: [{label: maths}, {label: code}, {label: prose}]",
            ]
        )
    )
    out = tmp_path / "moe"
    run_job(merge_moe(recipe, MergeOptions(out_dir=out, device="cpu")))
    # One prompt under every expert goes to one of them at most: at least two entries are misrouted.
    same = "What is 12 plus 30?"
    prompts = tmp_path / "held-out.yml"
    prompts.write_text(json.dumps({"maths": [same], "code": [same, "def add(a, b):"], "prose": [same]}))
    assert run_cli(["eval-routing", str(out), str(prompts), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()

    reference = run_job(
        evaluate_model_routing(out, load_labelled_prompts(prompts, ["maths", "code", "prose"]), device="cpu")
    )
    wrong = [r for r in reference.routings if r.prompt_choice() != r.intended_expert]
    assert len(wrong) >= 2
    header = next(i for i, line in enumerate(printed) if line.startswith("misrouted prompts ("))
    assert printed[header].startswith(f"misrouted prompts ({len(wrong)}, worst first")
    listed = printed[header + 1 : header + 1 + len(wrong)]
    labels = ["maths", "code", "prose"]
    expected = sorted(
        (float(r.weights.mean(axis=(0, 1))[r.intended_expert]), r.text, labels[r.intended_expert]) for r in wrong
    )
    for line, (weight, text, label) in zip(listed, expected, strict=True):
        assert line.startswith(f'  "{text}": intended {label} {weight:.2f}, went to ')


def test_merge_says_how_much_the_leftovers_of_a_killed_merge_freed(recipe_file, tmp_path, capsys):
    from app.cli.main import run_cli

    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    partial = tmp_path / f".old-moe.frankenmoe-partial-{exited.pid}-1700000000000-0a1b2c3d"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 1_500_000)
    assert run_cli(["merge", str(recipe_file), str(tmp_path / "moe"), "--device", "cpu"]) == 0
    assert not partial.exists()
    err = capsys.readouterr().err
    assert f"freed 1.5 MB: removed 1 unfinished merge folder(s) left by stopped merges in {tmp_path}" in err


def test_readme_lists_every_command_and_merge_names_every_output_architecture():
    import argparse

    from app.cli.main import build_parser

    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(actions[0].choices) if actions else {}

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    listed = readme.split("## Command line", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    for name, parser in subcommands(build_parser()).items():
        nested = subcommands(parser)
        for command in [f"{name} {sub}" for sub in nested] or [name]:
            assert f"frankenmoe {command} " in listed, command
    help_text = frankenmoe("merge", "--help").stdout
    assert "Mixtral, Qwen2-MoE or Qwen3-MoE" in " ".join(help_text.split())
