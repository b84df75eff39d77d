"""`frankenmoe eval`: the JSON layout, the table, donors, the k sweep, ablation, lm-eval tasks and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.main import run_cli
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.progress import run_job
from app.core.recipe import parse_recipe
from tests.cli.test_cli import frankenmoe as run_frankenmoe
from tests.eval_tasks import needs_lm_eval, write_eval_tasks

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["The storm rolled in over the sea.", "What is 12 plus 30? It is 42.", "def add(a, b): return a + b"]
pytestmark = pytest.mark.usefixtures("offline_datasets")


@pytest.fixture(scope="module")
def merged(llama_donors, tmp_path_factory) -> Path:
    """A 3-expert MoE merged from the tiny Llama donors, its recipe saved beside it (as the merge does)."""
    recipe = parse_recipe(
        "\n".join(
            [
                f"base_model: {llama_donors['base']}",
                "gate_mode: random",
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
    out = tmp_path_factory.mktemp("merged") / "moe"
    run_job(merge_moe(recipe, MergeOptions(out_dir=out)))
    return out


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps({"text": text}) for text in TEXTS), encoding="utf-8")
    return path


def frankenmoe(*args: str) -> subprocess.CompletedProcess[str]:
    return run_frankenmoe(*args, timeout=600)  # HF_DATASETS_OFFLINE comes from the autouse fixture


def transformers_nll(folder: Path, texts: list[str]) -> float:
    """Token-weighted mean loss as transformers computes it, each text on its own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return total / count


def test_compare_donors_writes_the_issue_layout(merged, llama_donors, data_file, tmp_path):
    out = tmp_path / "report.json"
    result = frankenmoe("eval", str(merged), "--data", str(data_file), "--compare-donors", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert list(report) == ["scoring", "models", "datasets", "results", "routing", "lm_eval"]
    donors = [str(llama_donors[f"expert{i}"]) for i in range(3)]
    assert report["models"] == ["moe", "base", *donors]
    assert report["datasets"] == ["mixed"]
    assert "no packing" in report["scoring"]
    assert report["lm_eval"] is None
    by_model = {r["model"]: r for r in report["results"]}
    assert set(by_model) == {"moe", "base", *donors}
    for entry in report["results"]:
        assert {"model", "dataset", "nll", "ppl", "tokens"} <= set(entry)
        assert entry["ppl"] == pytest.approx(math.exp(entry["nll"]))
    # Each name is scored on its own model: the base's figure is the base's transformers loss, expert 1's its own.
    assert by_model["base"]["nll"] == pytest.approx(transformers_nll(llama_donors["base"], TEXTS), rel=2e-3)
    assert by_model[donors[1]]["nll"] == pytest.approx(transformers_nll(llama_donors["expert1"], TEXTS), rel=2e-3)
    assert by_model["moe"]["nll"] == pytest.approx(transformers_nll(merged, TEXTS), rel=2e-3)
    assert set(report["routing"]) == {"moe"}  # dense donors have no routing
    # The human table on stdout, tqdm progress on stderr.
    assert "dataset" in result.stdout and "mixed" in result.stdout and "base" in result.stdout
    assert "loading moe" in result.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_top_k_sweep_and_ablation(merged, data_file, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    code = run_cli(
        ["eval", str(merged), "--data", str(data_file), "--top-k", "1", "2", "--disable-expert", "1",
         "--json", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text(encoding="utf-8"))
    overrides = [r["override"] for r in report["results"]]
    assert overrides == [{"top_k": k, "disabled": [1]} for k in (1, 2)]
    nlls = [r["nll"] for r in report["results"]]
    assert nlls[0] != pytest.approx(nlls[1])  # k changes the model's output
    for section in report["routing"]["moe"].values():
        stats = section["datasets"]["mixed"]
        assert stats["expert_share"][1] == 0.0  # the switched-off expert is never chosen
        assert 1 in stats["dead_experts"]
    stdout = capsys.readouterr().out
    assert "moe k=1 off=1" in stdout and "moe k=2 off=1" in stdout


def test_recipe_prompts_are_datasets_named_by_expert(merged, capsys):
    code = run_cli(["eval", str(merged), "--recipe", str(merged / "frankenmoe-recipe.yml"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    for index in range(3):
        assert f"expert {index}" in stdout or f"expert{index}" in stdout


@needs_lm_eval
def test_lm_eval_tasks_on_the_moe(merged, tmp_path):
    tasks = write_eval_tasks(tmp_path / "tasks")
    out = tmp_path / "bench.json"
    result = frankenmoe(
        "eval", str(merged), "--tasks", "tiny_choice,tiny_rolling", "--include-path", str(tasks),
        "--limit", "3", "--top-k", "1", "2", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    section = report["lm_eval"]
    assert section["tasks"] == ["tiny_choice", "tiny_rolling"]
    assert section["limit"] == 3
    assert {(e["override"]["top_k"], e["task"]) for e in section["results"]} == {
        (k, task) for k in (1, 2) for task in ("tiny_choice", "tiny_rolling")
    }
    perplexities = [e["metrics"]["byte_perplexity"] for e in section["results"] if e["task"] == "tiny_rolling"]
    assert perplexities[0] != pytest.approx(perplexities[1])  # the override holds while lm-eval runs
    saved = json.loads((tmp_path / section["file"]).read_text(encoding="utf-8"))
    assert section["file"] == "bench.lm-eval.json"
    assert [run["override"]["top_k"] for run in saved["runs"]] == [1, 2]
    assert saved["runs"][0]["results"]["results"]["tiny_choice"]["acc,none"] == pytest.approx(
        section["results"][0]["metrics"]["acc"]
    )
    assert "lm-eval:" in result.stdout
    # One progress step per request: 3 questions x 2 choices + 3 texts, the bar's total grown to match.
    assert "9/9" in result.stderr


def not_utf8(path: Path) -> Path:
    path.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    return path


def empty(path: Path) -> Path:
    path.write_text("", encoding="utf-8")
    return path


def no_text_field(path: Path) -> Path:
    path.write_text(json.dumps({"prompt": "hello"}) + "\n", encoding="utf-8")
    return path


def not_a_causal_lm(tmp_path: Path) -> Path:
    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    return folder


BAD_DATA = {"empty": (empty, "holds no records"), "latin-1": (not_utf8, "UTF-8"), "no text": (no_text_field, "text")}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_files(case, merged, tmp_path, capsys):
    make, message = BAD_DATA[case]
    data = make(tmp_path / "bad.jsonl")
    assert_refused(["eval", str(merged), "--data", str(data)], message, tmp_path, capsys)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--top-k", "0"], "k"),
        (["--top-k", "4"], "3"),
        (["--disable-expert", "0", "1", "2"], "switched off"),
        (["--disable-expert", "7"], "7"),
        (["--batch-size", "0"], "batch size"),
        (["--limit", "2"], "--tasks"),
    ],
)
def test_bad_routing_and_settings(arguments, message, merged, data_file, tmp_path, capsys):
    assert_refused(["eval", str(merged), "--data", str(data_file), *arguments], message, tmp_path, capsys)


def test_bad_models(merged, data_file, llama_donors, tmp_path, capsys):
    assert_refused(["eval", str(tmp_path / "missing"), "--data", str(data_file)], "does not exist", tmp_path, capsys)
    encoder = not_a_causal_lm(tmp_path)
    assert_refused(["eval", str(encoder), "--data", str(data_file)], "not a causal language model", tmp_path, capsys)
    dense = llama_donors["base"]
    assert_refused(["eval", str(dense), "--data", str(data_file), "--top-k", "1"], "dense model", tmp_path, capsys)
    assert_refused(
        ["eval", str(dense), "--data", str(data_file), "--compare-donors"], "frankenmoe-recipe.yml", tmp_path, capsys
    )
    assert_refused(["eval", str(merged)], "nothing to evaluate", tmp_path, capsys, recipe_beside=True)


@needs_lm_eval
def test_unknown_task(merged, data_file, tmp_path, capsys):
    tasks = write_eval_tasks(tmp_path / "tasks")
    arguments = ["eval", str(merged), "--data", str(data_file), "--tasks", "tiny_choice,no_such_task"]
    assert_refused([*arguments, "--include-path", str(tasks)], "no_such_task", tmp_path, capsys)


def test_lm_eval_not_installed(merged, data_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets where it is not installed
    assert_refused(
        ["eval", str(merged), "--data", str(data_file), "--tasks", "arc_easy"],
        "pip install 'frankenmoe-studio[eval]'",
        tmp_path,
        capsys,
    )


def assert_refused(argv: list[str], message: str, tmp_path: Path, capsys, recipe_beside: bool = False) -> None:
    """One clear message and a non-zero exit; the JSON the user named keeps what it held."""
    out = tmp_path / "report.json"
    out.write_text('{"earlier": true}', encoding="utf-8")
    if recipe_beside:
        # Without --data, --recipe or --tasks the saved recipe's prompts are used; hide it to leave nothing.
        recipe = Path(argv[1]) / "frankenmoe-recipe.yml"
        hidden = recipe.with_name("hidden-recipe.yml")
        recipe.rename(hidden)
    try:
        code = run_cli([*argv, "--json", str(out), "--quiet"])
    finally:
        if recipe_beside:
            hidden.rename(recipe)
    err = capsys.readouterr().err
    assert code == 1
    assert message in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "fix:" in err
    assert out.read_text(encoding="utf-8") == '{"earlier": true}'
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
