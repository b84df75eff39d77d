"""lm-evaluation-harness on a loaded model, with custom tasks over local files (offline)."""

from __future__ import annotations

import json
import math
import sys
import threading

import pytest

from app.core.eval.harness import HarnessRequest, run_harness, write_results_json
from app.core.problems import FrankenMoEError
from app.core.progress import Cancelled, run_job
from tests.eval_tasks import ROLLING_TEXTS, needs_lm_eval, write_eval_tasks

pytestmark = pytest.mark.usefixtures("offline_datasets")


@pytest.fixture(scope="module")
def loaded(llama_donors):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_donors["base"]).eval()
    return model, AutoTokenizer.from_pretrained(llama_donors["base"])


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_eval_tasks(tmp_path_factory.mktemp("tasks"))


def rolling_byte_perplexity(model, tokenizer) -> float:
    """What lm-eval's byte perplexity should be, from transformers directly: each text scored after the
    prefix token (BOS), every text token predicted, the sum over texts divided by their UTF-8 bytes."""
    import torch

    total_logprob = 0.0
    total_bytes = 0
    for text in ROLLING_TEXTS:
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])
        total_logprob += float(logprobs.sum())
        total_bytes += len(text.encode("utf-8"))
    return math.exp(-total_logprob / total_bytes)


@needs_lm_eval
def test_runs_custom_tasks_on_the_loaded_model_object(loaded, tasks):
    import torch

    model, tokenizer = loaded
    request = HarnessRequest(tasks=("tiny_choice", "tiny_rolling"), include_path=tasks, batch_size=2)
    records = []
    result = run_job(run_harness(model, tokenizer, request), records.append)
    assert set(result.summary) == {"tiny_choice", "tiny_rolling"}
    assert 0.0 <= result.summary["tiny_choice"]["acc"] <= 1.0
    assert result.summary["tiny_rolling"]["byte_perplexity"] == pytest.approx(
        rolling_byte_perplexity(model, tokenizer), rel=1e-4
    )
    # 6 questions x 2 choices + 4 rolling texts, one progress step per answered request.
    answered = [record for record in records if record.done > 0]
    assert answered[-1].done == answered[-1].total == 16

    # The harness scores the object it is given, not a second copy loaded from disk: change the object, and
    # the perplexity follows it.
    head = model.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.weight.mul_(3.0)
        changed = run_job(run_harness(model, tokenizer, HarnessRequest(tasks=("tiny_rolling",), include_path=tasks)))
        expected = rolling_byte_perplexity(model, tokenizer)
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(head)
    assert changed.summary["tiny_rolling"]["byte_perplexity"] == pytest.approx(expected, rel=1e-4)
    assert expected != pytest.approx(result.summary["tiny_rolling"]["byte_perplexity"], rel=1e-3)


@needs_lm_eval
def test_limit_and_few_shot(loaded, tasks):
    model, tokenizer = loaded
    request = HarnessRequest(tasks=("tiny_choice",), include_path=tasks, limit=3, num_fewshot=1)
    result = run_job(run_harness(model, tokenizer, request))
    assert result.results["n-samples"]["tiny_choice"]["effective"] == 3
    assert result.results["n-shot"]["tiny_choice"] == 1


@needs_lm_eval
def test_results_json_is_lm_evals_own(loaded, tasks, tmp_path):
    model, tokenizer = loaded
    request = HarnessRequest(tasks=("tiny_rolling",), include_path=tasks, limit=2)
    result = run_job(run_harness(model, tokenizer, request))
    path = write_results_json(result.results, tmp_path / "out.lm-eval.json")
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["results"]["tiny_rolling"]["byte_perplexity,none"] == pytest.approx(
        result.summary["tiny_rolling"]["byte_perplexity"]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["out.lm-eval.json"]


@needs_lm_eval
def test_cancel_stops_between_requests(loaded, tasks):
    model, tokenizer = loaded
    cancel = threading.Event()
    request = HarnessRequest(tasks=("tiny_choice",), include_path=tasks, batch_size=1)
    job = run_harness(model, tokenizer, request, cancel)
    answered = 0
    with pytest.raises(Cancelled):
        for record in job:
            if record.done >= 1:
                answered = record.done
                cancel.set()
    assert 1 <= answered < 12


@needs_lm_eval
def test_unknown_task_is_one_clear_error(loaded, tasks):
    model, tokenizer = loaded
    with pytest.raises(FrankenMoEError, match="does not know the task") as error:
        request = HarnessRequest(tasks=("tiny_choice", "no_such_task"), include_path=tasks)
        run_job(run_harness(model, tokenizer, request))
    assert "no_such_task" in error.value.message
    assert "tiny_choice" not in error.value.message
    assert "--include-path" in error.value.hint


def test_missing_lm_eval_names_the_extra(loaded, monkeypatch):
    model, tokenizer = loaded
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets where it is not installed
    with pytest.raises(FrankenMoEError, match="not installed") as error:
        run_job(run_harness(model, tokenizer, HarnessRequest(tasks=("tiny_choice",))))
    assert "pip install 'frankenmoe-studio[eval]'" in error.value.hint


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tasks": ()}, "no lm-eval task"),
        ({"tasks": ("a",), "limit": 0}, "limit must be at least 1"),
        ({"tasks": ("a",), "num_fewshot": -1}, "cannot be negative"),
        ({"tasks": ("a",), "batch_size": 0}, "batch size"),
    ],
)
def test_bad_requests(settings, message, tmp_path):
    with pytest.raises(FrankenMoEError, match=message):
        HarnessRequest(**settings)
    with pytest.raises(FrankenMoEError, match="does not exist"):
        HarnessRequest(tasks=("a",), include_path=tmp_path / "missing")
