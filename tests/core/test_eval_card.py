"""The Evaluation section of a model card and the CSV export, from a report in the --json layout."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from app.core.eval.card import SECTION_HEADING, add_to_model_card, evaluation_section, replace_section, results_csv


def result(model: str, dataset: str, ppl: float, top_k: int | None = None, disabled: tuple[int, ...] = ()) -> dict:
    return {
        "model": model,
        "dataset": dataset,
        "override": {"top_k": top_k, "disabled": list(disabled)},
        "nll": 1.0,
        "ppl": ppl,
        "tokens": 10,
    }


REPORT = {
    "scoring": "token-weighted mean NLL.",
    "models": ["moe", "base", "/home/me/models/maths-tune", "org/code-tune"],
    "datasets": ["maths", "code"],
    "results": [
        result("moe", "maths", 3.5),
        result("base", "maths", 5.25),
        result("/home/me/models/maths-tune", "maths", 3.25),
        result("org/code-tune", "maths", 6.0),
        result("moe", "code", 2.5),
        result("base", "code", 4.0),
        result("/home/me/models/maths-tune", "code", 4.5),
        result("org/code-tune", "code", 2.75),
        result("moe", "code", 1.0, top_k=1),  # a sweep point: not the model's own routing, not on the card
    ],
    "routing": {},
    "lm_eval": {
        "results": [
            {"model": "moe", "override": {"top_k": None, "disabled": []}, "task": "arc", "metrics": {"acc": 0.5}},
            {
                "model": "moe",
                "override": {"top_k": None, "disabled": []},
                "task": "arc",
                "metrics": {"acc_stderr": 0.1},
            },
        ]
    },
}


def test_the_section_is_a_table_with_the_best_of_each_row_in_bold() -> None:
    section = evaluation_section(REPORT)
    lines = section.splitlines()
    assert lines[0] == SECTION_HEADING
    assert "| Dataset | moe | base | maths-tune | org/code-tune |" in lines
    assert "| maths | 3.500 | 5.250 | **3.250** | 6.000 |" in lines
    assert "| code | **2.500** | 4.000 | 4.500 | 2.750 |" in lines  # the k=1 sweep point is not the MoE's own
    assert "/home/me" not in section  # a local donor goes by its folder's name
    assert "| arc | acc | 0.5000 |" in lines and "stderr" not in section


def test_the_section_replaces_an_earlier_one_and_keeps_the_rest(tmp_path: Path) -> None:
    card = (
        "---\nlicense: mit\nnote: '## Evaluation'\n---\n# Model\n\nIntro.\n\n"
        f"{SECTION_HEADING}\n\nOld numbers.\n\n### Details\n\nOld details.\n\n## Usage\n\nKeep me.\n"
    )
    updated = replace_section(card, evaluation_section(REPORT))
    assert updated.count(SECTION_HEADING) == 1 + card.count("'## Evaluation'")
    assert "Old numbers." not in updated and "Old details." not in updated
    assert updated.startswith("---\nlicense: mit\nnote: '## Evaluation'\n---\n# Model\n\nIntro.\n\n## Evaluation\n")
    assert updated.endswith("\n\n## Usage\n\nKeep me.\n")
    assert replace_section(updated, evaluation_section(REPORT)) == updated

    readme = tmp_path / "README.md"
    assert add_to_model_card(tmp_path, REPORT) == readme  # no card yet: one with the section alone
    assert readme.read_text(encoding="utf-8") == evaluation_section(REPORT).rstrip() + "\n"
    readme.write_text("# Model\n\nIntro.\n", encoding="utf-8")
    add_to_model_card(tmp_path, REPORT)
    add_to_model_card(tmp_path, REPORT)
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# Model\n\nIntro.\n\n## Evaluation\n") and text.count(SECTION_HEADING) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temporary file left


def test_csv_has_a_row_per_result_with_its_routing() -> None:
    rows = list(csv.DictReader(io.StringIO(results_csv(REPORT))))
    assert len(rows) == len(REPORT["results"])
    assert rows[0] == {
        "model": "moe",
        "dataset": "maths",
        "top_k": "",
        "disabled": "",
        "nll": "1.000000",
        "ppl": "3.500000",
        "tokens": "10",
    }
    assert rows[-1]["top_k"] == "1" and rows[-1]["ppl"] == "1.000000"
