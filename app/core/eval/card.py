"""An evaluation report as a model card section and as CSV, from the report's JSON layout
(:meth:`EvalReport.to_json`), so that what is exported is exactly what ``--json`` writes.

The card's section is a Markdown table of perplexity per dataset (rows) and model (columns), the best
of each row in bold, like the results table on a published frankenMoE card; lm-eval's scores follow
when there are any. Writing it replaces an earlier Evaluation section, never adds a second, and goes
through a temporary file, so a crash leaves the old card whole.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path, PurePath
from typing import Any

SECTION_HEADING = "## Evaluation"
_HEADING = re.compile(r"^#{1,2} ")
CSV_FIELDS = ("model", "dataset", "top_k", "disabled", "nll", "ppl", "tokens")


def result_top_k(result: dict[str, Any]) -> int | None:
    value = (result.get("override") or {}).get("top_k")
    return int(value) if value is not None else None


def result_disabled(result: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(expert) for expert in (result.get("override") or {}).get("disabled") or ())


def is_default_routing(result: dict[str, Any]) -> bool:
    """Whether a result was measured with the model's own routing (no k override, no expert off)."""
    return result_top_k(result) is None and not result_disabled(result)


def card_model_name(model: str) -> str:
    """How the card names a model: "moe", "base", a Hub id as written, or a local folder's name only."""
    if model in ("moe", "base"):
        return model
    path = PurePath(os.path.expanduser(model))
    looks_local = model.startswith((".", "/", "~")) or "\\" in model or len(path.parts) != 2
    return path.name if looks_local else model


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def perplexity_table(report: dict[str, Any]) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """Datasets, models (in the report's order) and the perplexity of each (dataset, model) measured
    with the model's own routing."""
    results = [r for r in report.get("results", []) if is_default_routing(r)]
    models = list(dict.fromkeys([*report.get("models", []), *(r["model"] for r in results)]))
    datasets = list(dict.fromkeys([*report.get("datasets", []), *(r["dataset"] for r in results)]))
    values = {(r["dataset"], r["model"]): float(r["ppl"]) for r in results}
    models = [m for m in models if any((d, m) in values for d in datasets)]
    datasets = [d for d in datasets if any((d, m) in values for m in models)]
    return datasets, models, values


def lm_eval_table(report: dict[str, Any]) -> tuple[list[tuple[str, str]], list[str], dict[tuple[str, str, str], float]]:
    """lm-eval's scores with each model's own routing: (task, metric) rows, models, and the value of each
    (task, metric, model); standard errors left out."""
    entries = [e for e in ((report.get("lm_eval") or {}).get("results") or []) if is_default_routing(e)]
    values: dict[tuple[str, str, str], float] = {}
    for entry in entries:
        for metric, value in (entry.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric:
                values[(entry["task"], metric.removesuffix(",none"), entry["model"])] = float(value)
    rows = list(dict.fromkeys((task, metric) for task, metric, _model in values))
    models = list(dict.fromkeys(model for _task, _metric, model in values))
    return rows, models, values


def evaluation_section(report: dict[str, Any]) -> str:
    """The card's Evaluation section (heading included), ending with a newline."""
    datasets, models, values = perplexity_table(report)
    lines = [SECTION_HEADING, ""]
    if datasets:
        lines += [
            "Perplexity per dataset (lower is better; the best of each row in bold), measured with "
            "FrankenMoE Studio. " + str(report.get("scoring", "")).strip(),
            "",
            "| Dataset | " + " | ".join(_cell(card_model_name(m)) for m in models) + " |",
            "|---|" + "---:|" * len(models),
        ]
        for dataset in datasets:
            row = {m: values[(dataset, m)] for m in models if (dataset, m) in values}
            best = min(row.values())
            cells = [
                ("—" if m not in row else f"**{row[m]:.3f}**" if row[m] == best else f"{row[m]:.3f}") for m in models
            ]
            lines.append(f"| {_cell(dataset)} | " + " | ".join(cells) + " |")
        lines.append("")
    benchmark_rows, benchmark_models, scores = lm_eval_table(report)
    if benchmark_rows:
        lines += [
            "Benchmarks run with EleutherAI's lm-evaluation-harness:",
            "",
            "| Task | Metric | " + " | ".join(_cell(card_model_name(m)) for m in benchmark_models) + " |",
            "|---|---|" + "---:|" * len(benchmark_models),
        ]
        for task, metric in benchmark_rows:
            cells = [
                f"{scores[(task, metric, m)]:.4f}" if (task, metric, m) in scores else "—" for m in benchmark_models
            ]
            lines.append(f"| {_cell(task)} | {_cell(metric)} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(lines) == 2:
        lines += ["No results yet.", ""]
    return "\n".join(lines)


def replace_section(card: str, section: str) -> str:
    """The card with its Evaluation section replaced by section, or section appended where it has none."""
    lines = card.splitlines()
    body_start = 0
    if lines and lines[0].strip() == "---":  # the Hub's front matter: a "## " in it is no heading
        closing = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
        body_start = closing + 1 if closing is not None else 0
    start = next((i for i in range(body_start, len(lines)) if lines[i].rstrip() == SECTION_HEADING), None)
    new_lines = section.rstrip("\n").splitlines()
    if start is None:
        kept = card.rstrip("\n")
        return f"{kept}\n\n{section.rstrip()}\n" if kept else f"{section.rstrip()}\n"
    end = next((i for i in range(start + 1, len(lines)) if _HEADING.match(lines[i])), len(lines))
    following = lines[end:]
    return "\n".join([*lines[:start], *new_lines, *([""] if following else []), *following]).rstrip("\n") + "\n"


def write_text_atomically(path: Path, text: str) -> None:
    """Write through a temporary file beside path, then replace it: never a half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def add_to_model_card(folder: Path, report: dict[str, Any]) -> Path:
    """Write the report's Evaluation section into folder/README.md (created if missing); returns the card's path."""
    readme = Path(folder) / "README.md"
    card = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    write_text_atomically(readme, replace_section(card, evaluation_section(report)))
    return readme


def results_csv(report: dict[str, Any]) -> str:
    """One row per (model, dataset, routing): the report's results as CSV."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for result in report.get("results", []):
        top_k = result_top_k(result)
        ppl = float(result["ppl"])
        writer.writerow(
            [
                result["model"],
                result["dataset"],
                "" if top_k is None else top_k,
                " ".join(str(e) for e in result_disabled(result)),
                f"{float(result['nll']):.6f}",
                f"{ppl:.6f}" if math.isfinite(ppl) else "inf",
                int(result["tokens"]),
            ]
        )
    return out.getvalue()
