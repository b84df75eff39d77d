"""Every CLI flag reaches the engine: each test's result depends on the flag it passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.cli.main import run_cli
from app.core.chat import LoadRequest, SamplingSettings, load_chat_model, write_trace
from app.core.merge.gates import compute_gates
from app.core.progress import run_job
from app.core.recipe import load_recipe, parse_recipe, save_recipe

REPO = Path(__file__).resolve().parents[2]
PROMPT = "Tell me about the sea."
COMMON = ["--prompt", PROMPT, "--max-new-tokens", "10", "--seed", "9", "--device", "cpu", "--quiet"]
DEFAULTS = SamplingSettings(max_new_tokens=10, seed=9)


@pytest.fixture(scope="module")
def moe(tiny_mixtral):
    return tiny_mixtral


@pytest.fixture(scope="module")
def engine(moe):
    """The engine's own answers, from the model loaded once."""
    chat = run_job(load_chat_model(LoadRequest(str(moe), device="cpu")))
    ids = chat.prompt_ids([{"role": "user", "content": PROMPT}])

    def answer(**settings: object) -> str:
        return run_job(chat.generate(ids, replace(DEFAULTS, **settings))).text

    yield answer
    chat.unload()


def cli_answer(capsys, *argv: str) -> str:
    assert run_cli(list(argv)) == 0
    return capsys.readouterr().out.removesuffix("\n")


@pytest.mark.parametrize(
    ("flag", "value", "setting"),
    [
        ("--temperature", "0", {"temperature": 0.0}),
        ("--top-p", "0.3", {"top_p": 0.3}),
        ("--top-k", "3", {"top_k": 3}),
        ("--repetition-penalty", "3.0", {"repetition_penalty": 3.0}),
    ],
)
def test_sampling_flags_reach_the_engine(moe, engine, capsys, flag, value, setting):
    expected = engine(**setting)
    assert expected != engine(), "this value must change the answer, or the test shows nothing"
    assert cli_answer(capsys, "generate", str(moe), *COMMON, flag, value) == expected


def trace_weights(path: Path) -> list[list[list[float]]]:
    return [json.loads(line)["weights"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_dtype_flag_loads_the_model_in_that_dtype(moe, tmp_path, capsys):
    traces = {}
    for dtype in ("float32", "bfloat16"):
        traces[dtype] = tmp_path / f"{dtype}.jsonl"
        argv = ["generate", str(moe), *COMMON, "--temperature", "0", "--dtype", dtype, "--trace", str(traces[dtype])]
        assert run_cli(argv) == 0
    capsys.readouterr()
    chat = run_job(load_chat_model(LoadRequest(str(moe), device="cpu", dtype="bfloat16")))
    try:
        assert chat.model.dtype == torch.bfloat16
        ids = chat.prompt_ids([{"role": "user", "content": PROMPT}])
        expected = run_job(chat.generate(ids, SamplingSettings(temperature=0.0, max_new_tokens=10, seed=9)))
    finally:
        chat.unload()
    # Router weights computed in bfloat16 differ from float32's in their low bits.
    assert trace_weights(traces["bfloat16"]) != trace_weights(traces["float32"])
    write_trace(expected.trace, tmp_path / "expected.jsonl")
    assert trace_weights(traces["bfloat16"]) == trace_weights(tmp_path / "expected.jsonl")


@pytest.mark.parametrize(("mode", "described"), [("8bit", "in 8 bits"), ("4bit", "in 4 bits"), ("spread", "spread")])
def test_load_flag_becomes_the_loading_plan_and_is_refused_clearly_without_cuda(moe, capsys, mode, described):
    if torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    assert run_cli(["generate", str(moe), *COMMON, "--load", mode]) == 1
    err = capsys.readouterr().err
    assert f"error: the model does not fit {described}" in err
    assert "needs a CUDA GPU" in err
    assert "fix: " in err and "Traceback" not in err


CUSTOM_CONFIG = """
from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom_llama"
"""

CUSTOM_MODEL = """
import os
from pathlib import Path

from transformers import LlamaForCausalLM

from .configuration_tiny_custom import TinyCustomConfig

# Proof that this file, the model's own code, was run.
Path(os.environ["CUSTOM_CODE_RAN"]).touch()


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


def test_trust_remote_code_flag_lets_a_model_s_own_code_run(llama_donors, tmp_path, capsys):
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(llama_donors["base"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "tiny_custom_llama"
    config["architectures"] = ["TinyCustomForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_tiny_custom.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_tiny_custom.py").write_text(CUSTOM_MODEL)
    marker = tmp_path / "custom-code-ran"
    argv = ["generate", str(folder), *COMMON]

    assert run_cli(argv) == 1
    err = capsys.readouterr().err
    assert "needs its own Python code" in err and "--trust-remote-code" in err

    # In a process of its own, so that transformers copies the model's code into a cache of the test's.
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    allowed = subprocess.run(
        [sys.executable, "-m", "app", *argv, "--trust-remote-code"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "CUSTOM_CODE_RAN": str(marker)},
    )
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert marker.exists()


@pytest.fixture
def hidden_recipe(llama_donors, tmp_path):
    recipe = parse_recipe(
        "\n".join(
            [
                f"base_model: {llama_donors['base']}",
                "gate_mode: hidden",
                "dtype: float32",
                "experts:",
                f"  - source_model: {llama_donors['expert0']}",
                "    positive_prompts: ['What is 12 plus 30?']",
                f"  - source_model: {llama_donors['expert1']}",
                "    positive_prompts: ['def add(a, b): return a + b']",
            ]
        )
    )
    path = tmp_path / "recipe.yml"
    save_recipe(recipe, path)
    return path


def test_gate_dtype_flag_computes_the_gates_in_that_dtype(hidden_recipe, tmp_path, capsys):
    routers = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        argv = ["merge", str(hidden_recipe), str(out), "--device", "cpu", "--gate-dtype", dtype, "--quiet"]
        assert run_cli(argv) == 0
        written = load_file(out / "model.safetensors")
        routers[dtype] = torch.stack([written[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(2)])
    capsys.readouterr()
    expected = run_job(compute_gates(load_recipe(hidden_recipe), device="cpu", dtype="bfloat16")).router
    assert not torch.equal(routers["bfloat16"], routers["float32"])
    assert torch.equal(routers["bfloat16"], expected.to(torch.float32))


def test_no_gates_flag_skips_the_gate_diagnostics(hidden_recipe, capsys):
    assert run_cli(["check", str(hidden_recipe), "--device", "cpu"]) == 0
    assert "layer  condition" in capsys.readouterr().out
    assert run_cli(["check", str(hidden_recipe), "--device", "cpu", "--no-gates"]) == 0
    out = capsys.readouterr().out
    assert "recipe OK: 2 experts" in out
    assert "layer  condition" not in out
