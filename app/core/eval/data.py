"""Datasets to score: data files, a recipe's own prompts per expert, and Hub datasets.

A record is scored on its own. It is plain text, or a conversation (a tuple of ``{"role", "content"}``
messages) that is rendered with the model's chat template when it is scored.

File formats:
- ``.txt``: one record per paragraph, paragraphs being separated by blank lines (so a file with no
  blank line is one record); spaces around a paragraph are dropped.
- ``.jsonl``: one JSON object per line with a ``text`` string or a ``messages`` list; blank lines
  are skipped.
- ``.parquet``: a ``text`` or ``messages`` column (needs pyarrow).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.problems import FrankenMoEError

Message = dict[str, str]
Record = str | tuple[Message, ...]

DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True, slots=True)
class EvalDataset:
    """A named list of records; the name is the file's stem, or an expert's name for recipe prompts."""

    name: str
    records: tuple[Record, ...]


def load_data_file(path: Path) -> EvalDataset:
    """Read a .txt, .jsonl or .parquet data file (see the module docstring for the layouts).

    Raises a FrankenMoEError for a missing, empty or non-UTF-8 file, an unknown suffix, and records
    without a ``text`` or ``messages`` field.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise FrankenMoEError(
            f"{path.name} is not a data file this app reads ({suffix or 'no suffix'})",
            "give a .txt file (paragraphs), a .jsonl file (text or messages per line) or a .parquet file",
        )
    if not path.is_file():
        raise FrankenMoEError(f"data file {path} does not exist", "check the path")
    if suffix == ".parquet":
        records = _parquet_records(path)
    else:
        text = _read_text(path)
        records = _jsonl_records(path, text) if suffix == ".jsonl" else _paragraphs(text)
    if not records:
        raise FrankenMoEError(f"data file {path.name} holds no records to score", _EMPTY_HINT)
    return EvalDataset(name=path.stem, records=tuple(records))


_EMPTY_HINT = "give a file with at least one non-empty text or conversation"


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FrankenMoEError(f"cannot read data file {path} ({exc.strerror or exc})", "check the path") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FrankenMoEError(
            f"data file {path.name} is not UTF-8 text (byte {exc.start} cannot be decoded)",
            "save it as UTF-8",
        ) from exc


def _paragraphs(text: str) -> list[Record]:
    blocks: list[Record] = []
    current: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current).strip())
            current = []
    return blocks


def _jsonl_records(path: Path, text: str) -> list[Record]:
    records: list[Record] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FrankenMoEError(
                f"{path.name}, line {number} is not JSON ({exc.msg})", "write one JSON object per line"
            ) from exc
        records.append(_row_record(row, f"{path.name}, line {number}"))
    return records


def _row_record(row: Any, where: str) -> Record:
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return str(row["text"])
    if isinstance(row, dict) and row.get("messages") is not None:
        return _messages(row["messages"], where)
    raise FrankenMoEError(
        f"{where} has no text or messages field",
        'give each record a "text" string or a "messages" list of {"role": ..., "content": ...} objects',
    )


def _messages(value: Any, where: str) -> tuple[Message, ...]:
    if hasattr(value, "tolist"):  # a numpy array from a parquet column
        value = value.tolist()
    ok = isinstance(value, list | tuple) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise FrankenMoEError(
            f"{where}: messages must be a non-empty list of role and content strings",
            'write e.g. "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]',
        )
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _parquet_records(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as exc:
        raise FrankenMoEError(
            f"reading {path.name} needs pyarrow, which is not installed", "pip install pyarrow, or convert it to .jsonl"
        ) from exc
    try:
        table = parquet.read_table(path)
    except (OSError, ValueError) as exc:
        raise FrankenMoEError(f"cannot read {path.name} as Parquet ({exc})", "give a valid Parquet file") from exc
    if "text" not in table.column_names and "messages" not in table.column_names:
        raise FrankenMoEError(
            f"{path.name} has no text or messages column (it has {', '.join(table.column_names) or 'none'})",
            "give the file a text column of strings or a messages column of conversations",
        )
    return [_row_record(row, f"{path.name}, row {i + 1}") for i, row in enumerate(table.to_pylist())]


def recipe_datasets(recipe: Any) -> list[EvalDataset]:
    """One dataset per expert of a recipe, named by the expert's label: its positive and test prompts.

    Experts without any prompt are left out.
    """
    datasets = []
    for index, expert in enumerate(recipe.experts):
        extras = recipe.studio.experts[index] if index < len(recipe.studio.experts) else None
        prompts = [*expert.positive_prompts, *(extras.test_prompts if extras is not None else ())]
        records = tuple(dict.fromkeys(p.strip() for p in prompts if p.strip()))
        if records:
            datasets.append(EvalDataset(name=recipe.expert_label(index), records=records))
    return datasets


def hub_dataset(
    repo_id: str, split: str = "test", field: str = "text", limit: int | None = None, cache_dir: Path | None = None
) -> EvalDataset:
    """A Hub dataset's ``field`` column through the optional ``datasets`` library (from its cache when offline).

    ``field`` "messages" reads conversations; any other names a column of texts.
    """
    try:
        import datasets
    except ImportError as exc:
        raise FrankenMoEError(
            f"loading the Hub dataset {repo_id} needs the datasets library, which is not installed",
            "pip install datasets, or save the texts as a .jsonl file and give that",
        ) from exc
    try:
        table = datasets.load_dataset(repo_id, split=split, cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as exc:  # datasets raises many unrelated types for a missing repo, split or cache
        raise FrankenMoEError(
            f"cannot load split {split!r} of the Hub dataset {repo_id} ({exc})",
            "check the name and split, and download it first when offline",
        ) from exc
    if field not in table.column_names:
        raise FrankenMoEError(
            f"the Hub dataset {repo_id} has no {field!r} column (it has {', '.join(table.column_names)})",
            "name one of its text columns",
        )
    rows = table[field] if limit is None else table[field][:limit]
    key = "messages" if field == "messages" else "text"
    records = tuple(r for r in (_row_record({key: value}, f"{repo_id} {field}") for value in rows) if r)
    if not records:
        raise FrankenMoEError(f"the Hub dataset {repo_id} gave no records", _EMPTY_HINT)
    return EvalDataset(name=repo_id.rsplit("/", 1)[-1], records=records)
