"""Custom lm-eval tasks over local JSONL files, so that the lm-eval tests need no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.core.eval.harness import lm_eval_installed

needs_lm_eval = pytest.mark.skipif(
    not lm_eval_installed(), reason="lm-eval is not installed (pip install 'frankenmoe-studio[eval]')"
)

ROLLING_TEXTS = (
    "The storm rolled in over the sea.",
    "What is 12 plus 30? It is 42.",
    "def add(a, b): return a + b",
    "A quiet harbour at dawn, gulls over the boats.",
)


def write_eval_tasks(folder: Path) -> Path:
    """A folder with two tasks: tiny_choice (multiple choice, accuracy) and tiny_rolling (perplexity)."""
    folder.mkdir(parents=True, exist_ok=True)
    choices = folder / "choice.jsonl"
    choices.write_text(
        "\n".join(
            json.dumps({"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1)], "answer": 0})
            for i in range(6)
        ),
        encoding="utf-8",
    )
    rolling = folder / "rolling.jsonl"
    rolling.write_text("\n".join(json.dumps({"text": text}) for text in ROLLING_TEXTS), encoding="utf-8")
    (folder / "tiny_choice.yaml").write_text(
        "\n".join(
            [
                "task: tiny_choice",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {json.dumps(str(choices))}",
                "test_split: test",
                "output_type: multiple_choice",
                'doc_to_text: "{{question}}"',
                'doc_to_choice: "{{choices}}"',
                'doc_to_target: "{{answer}}"',
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
            ]
        ),
        encoding="utf-8",
    )
    (folder / "tiny_rolling.yaml").write_text(
        "\n".join(
            [
                "task: tiny_rolling",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {json.dumps(str(rolling))}",
                "test_split: test",
                "output_type: loglikelihood_rolling",
                'doc_to_text: ""',
                'doc_to_target: "{{text}}"',
                "metric_list:",
                "  - metric: byte_perplexity",
                "    aggregation: weighted_perplexity",
                "    higher_is_better: false",
            ]
        ),
        encoding="utf-8",
    )
    return folder
