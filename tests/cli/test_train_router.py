"""`frankenmoe train-router` in a process of its own: a run, its report, every bad input, kill -9 and --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from app.cli.main import build_parser
from app.cli.train_commands import build_settings
from app.core.training.trainer import checkpoint_dir
from tests.chat_models import make_tiny_moe
from tests.cli.test_cli import REPO, frankenmoe
from tests.core.test_training_trainer import write_text
from tests.models import make_tiny_model

FAST = ["--seq-len", "16", "--batch-size", "2", "--eval-every", "3", "--quiet"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return make_tiny_moe(tmp_path_factory.mktemp("cli") / "moe", "mixtral", seed=6)


def test_train_router_writes_the_model_and_a_json_report(moe, tmp_path):
    data = write_text(tmp_path / "train.txt")
    done = frankenmoe("train-router", str(moe), str(tmp_path / "out"), "--data", str(data), "--steps", "3",
                      "--json", str(tmp_path / "report.json"), *FAST)
    assert done.returncode == 0, done.stderr
    assert "trained 3 steps" in done.stdout and f"wrote {tmp_path / 'out'}" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 3 and report["data"]["sources"] == ["train.txt"]
    assert report["best_val_loss"] <= report["initial_val_loss"] + 1 and len(report["expert_load"]) == 4
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "router-training.json").is_file()


def test_without_a_budget_it_says_what_it_chose(moe, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short to train on.")
    done = frankenmoe("train-router", str(moe), str(tmp_path / "out"), "--data", str(short), "--quiet")
    assert done.returncode == 1
    assert "no step or token budget given: training" in done.stderr and "about" in done.stderr
    assert "error: the training data (short.txt) gives" in done.stderr and "fix: give more text" in done.stderr


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("lr", "learning rate must be above 0"),
        ("dense", "dense model"),
        ("not-empty", "is not empty"),
        ("empty-data", "holds no records"),
        ("missing-data", "does not exist"),
        ("no-data", "No training data was given"),
        ("too-short", "fewer than the"),
        ("eight-bit-on-cpu", "needs a CUDA GPU"),
    ],
)
def test_bad_input_exits_non_zero_with_one_clear_message(moe, llama_donors, tmp_path, case, expected):
    data = write_text(tmp_path / "train.txt")
    model, out, extra = moe, tmp_path / "out", ["--data", str(data), "--steps", "2"]
    if case == "lr":
        extra += ["--lr", "0"]
    elif case == "dense":
        model = llama_donors["base"]
    elif case == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "empty-data":
        (tmp_path / "empty.txt").write_text("")
        extra = ["--data", str(tmp_path / "empty.txt"), "--steps", "2"]
    elif case == "missing-data":
        extra = ["--data", str(tmp_path / "nope.txt"), "--steps", "2"]
    elif case == "no-data":
        extra = ["--steps", "2"]
    elif case == "too-short":
        extra += ["--seq-len", "4096"]
    elif case == "eight-bit-on-cpu":
        extra += ["--load", "8bit", "--device", "cpu"]
    done = frankenmoe("train-router", str(model), str(out), *extra, "--quiet")
    assert done.returncode == 1, done.stdout + done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.startswith("error")]) == 1
    assert not out.exists() or [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if ".frankenmoe-partial-" in p.name]


def test_steps_and_tokens_together_are_a_usage_error(moe, tmp_path):
    done = frankenmoe("train-router", str(moe), str(tmp_path / "out"), "--steps", "2", "--tokens", "100")
    assert done.returncode == 2 and "not allowed with argument" in done.stderr


def test_every_flag_reaches_the_settings():
    args = build_parser().parse_args(
        ["train-router", "m", "o", "--tokens", "5000", "--seq-len", "64", "--batch-size", "3", "--lr", "0.002",
         "--balance-coef", "0.05", "--z-coef", "0.001", "--val-fraction", "0.2", "--eval-every", "7", "--patience", "0",
         "--checkpoint-every", "9", "--seed", "11", "--device", "cpu", "--dtype", "bfloat16", "--load", "4bit"]
    )
    settings = build_settings(args)
    assert settings.model_dump() == {
        "steps": None, "tokens": 5000, "seq_len": 64, "batch_size": 3, "lr": 0.002, "balance_coef": 0.05,
        "z_coef": 0.001, "val_fraction": 0.2, "eval_every": 7, "patience": None, "warmup_fraction": 0.05,
        "grad_clip": 1.0, "seed": 11, "device": "cpu", "dtype": "bfloat16", "load": "4bit", "checkpoint_every": 9,
    }


@pytest.mark.slow
def test_a_run_killed_mid_training_leaves_no_model_and_resume_finishes_it(tmp_path):
    model = make_tiny_moe(tmp_path / "moe", "mixtral", seed=8)
    data = write_text(tmp_path / "train.txt")
    out = tmp_path / "out"
    arguments = ["train-router", str(model), str(out), "--data", str(data), "--steps", "16", "--checkpoint-every", "2",
                 *FAST]
    process = subprocess.Popen(
        [sys.executable, "-m", "app", *arguments], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while not list(checkpoint_dir(out).glob("step-*")):
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".frankenmoe-partial-" in p.name]
    done = frankenmoe(*arguments, "--resume")
    assert done.returncode == 0, done.stderr
    assert "trained 16 steps" in done.stdout and (out / "model.safetensors").is_file()
    assert not checkpoint_dir(out).exists()


def test_dense_check_names_no_router_for_a_llama(tmp_path):
    folder = make_tiny_model(tmp_path / "llama", "llama")
    done = frankenmoe("train-router", str(folder), str(tmp_path / "out"), "--data", str(folder / "config.json"))
    assert done.returncode == 1 and "dense model" in done.stderr and "not a data file" in done.stderr
