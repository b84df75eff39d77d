"""`frankenmoe generate`: the answer on stdout, the trace on disk, the same as the engine's."""

from __future__ import annotations

import json

import pytest

from app.cli.main import run_cli
from app.core.chat import LoadRequest, SamplingSettings, load_chat_model
from app.core.progress import run_job


@pytest.fixture(scope="module")
def moe(tiny_mixtral):
    return tiny_mixtral


def test_generate_prints_the_answer_and_writes_the_trace(moe, tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    argv = ["generate", str(moe), "--prompt", "What is 2 plus 2?", "--system", "Be brief."]
    argv += ["--max-new-tokens", "6", "--seed", "9", "--device", "cpu", "--trace", str(trace), "--quiet"]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out

    chat = run_job(load_chat_model(LoadRequest(str(moe), device="cpu")))
    try:
        turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"}]
        settings = SamplingSettings(temperature=0.7, max_new_tokens=6, seed=9)
        expected = run_job(chat.generate(chat.prompt_ids(turns), settings))
    finally:
        chat.unload()
    assert printed == expected.text + "\n"
    records = [json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines()]
    assert [r["token_id"] for r in records] == [t.token_id for t in expected.trace]
    assert [r["experts"] for r in records] == [[list(e) for e in t.experts] for t in expected.trace]
    assert sum(r["generated"] for r in records) == len(expected.generated)


def test_generate_does_not_print_the_token_that_ends_the_answer(moe, capsys):
    # With plain sampling, seed 21 ends this tiny model's answer with its end-of-text token, "</s>".
    argv = ["generate", str(moe), "--prompt", "What is 2 plus 2?", "--temperature", "1", "--top-p", "1"]
    argv += ["--top-k", "0", "--max-new-tokens", "40", "--seed", "21", "--device", "cpu"]
    assert run_cli(argv) == 0
    captured = capsys.readouterr()
    assert "tokens (eos)" in captured.err
    assert captured.out.strip() and "</s>" not in captured.out


def test_generate_with_a_dense_model_says_there_is_no_routing(llama_donors, capsys):
    argv = ["generate", str(llama_donors["base"]), "--prompt", "hi", "--max-new-tokens", "3", "--device", "cpu"]
    assert run_cli(argv) == 0
    assert "no routing: " in capsys.readouterr().err


def test_generate_names_a_missing_model_and_the_fix(tmp_path, capsys):
    assert run_cli(["generate", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "fix:" in err


def test_generate_names_a_folder_without_config_json_and_the_fix(moe, tmp_path, capsys):
    folder = tmp_path / "no-config"
    folder.mkdir()
    for file in moe.iterdir():
        if file.name != "config.json":
            (folder / file.name).write_bytes(file.read_bytes())
    assert run_cli(["generate", str(folder), "--prompt", "hi", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "has no config.json" in err and "fix:" in err
    assert "Traceback" not in err and "FileNotFoundError" not in err
