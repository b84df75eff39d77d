"""Training text for the routers: read from every source given, tokenised, packed into fixed-length sequences.

Sources: data files (``.txt`` paragraphs, ``.jsonl`` with ``text`` or ``messages``, ``.parquet`` with a
``text`` or ``messages`` column; read as the Evaluate page reads them), the prompts of the recipe saved
beside the model, and Hub datasets through the optional ``datasets`` library. Conversations are
rendered with the model's chat template. Each record is encoded as the model sees a text on its own: plain
text as the tokenizer encodes it by default (with the BOS token where the model uses one, as the model
was trained and as the Evaluate page scores), a conversation as its template writes it (the template
places its own special tokens); the EOS token follows each record unless it already ends with one. The
records are concatenated in order and cut into sequences of ``seq_len`` tokens (the last, shorter piece
is dropped). A seeded shuffle of the sequences then sets aside the validation share.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.eval.data import Record, _row_record, load_data_file, recipe_datasets
from app.core.problems import FrankenMoEError
from app.core.progress import Job, check_cancel
from app.core.training.settings import TrainingData

if TYPE_CHECKING:
    import torch

DEFAULT_HUB_SPLIT = "train"
# Records are tokenised in batches of this many (fast tokenizers batch well); progress comes per batch.
ENCODE_BATCH = 256


@dataclass(frozen=True, slots=True)
class NamedRecords:
    name: str  # the file, "recipe prompts" or the Hub dataset, for messages
    records: tuple[Record, ...]


@dataclass(frozen=True)
class PackedData:
    """Packed sequences (sequences x seq_len token ids), the training and the validation ones."""

    train: torch.Tensor
    validation: torch.Tensor
    sources: tuple[str, ...]  # what was read, for the report and the model card
    records: int
    tokens: int  # tokens packed into sequences (train + validation)
    truncated: bool  # the sources held more text than the run needs, and the rest was not read

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def parse_hub_dataset(spec: str) -> tuple[str, str | None, str]:
    """``id[:config][/split]`` as (id, config, split). A Hub id has at most one slash, so a second one starts
    the split (``org/name/test``); a name without a config takes its split after the slash only when it is
    written after a config (``wikitext:wikitext-2-raw-v1/test``)."""
    text = spec.strip()
    if not text:
        raise FrankenMoEError("an empty Hub dataset name was given", "write it as id[:config][/split]")
    config: str | None = None
    split = DEFAULT_HUB_SPLIT
    if ":" in text:
        repo, rest = text.split(":", 1)
        config, _, given_split = rest.partition("/")
        split = given_split or split
        config = config or None
    else:
        parts = text.split("/")
        if len(parts) > 3:
            raise FrankenMoEError(f"{spec!r} is not a Hub dataset name", "write it as id[:config][/split]")
        repo = "/".join(parts[:2])
        if len(parts) == 3:
            split = parts[2] or split
    if not repo or repo.startswith("/") or repo.endswith("/"):
        raise FrankenMoEError(f"{spec!r} is not a Hub dataset name", "write it as id[:config][/split]")
    return repo, config, split


def hub_records(spec: str) -> NamedRecords:
    """The ``text`` (or ``messages``) column of a Hub dataset split, through ``datasets`` (its cache when offline)."""
    repo, config, split = parse_hub_dataset(spec)
    try:
        import datasets
    except ImportError as exc:
        raise FrankenMoEError(
            f"training on the Hub dataset {repo} needs the datasets library, which is not installed",
            "pip install datasets, or save the texts as a .jsonl file and give that with --data",
        ) from exc
    try:
        table = datasets.load_dataset(repo, config, split=split)
    except Exception as exc:  # datasets raises many unrelated types for a missing repo, config, split or cache
        raise FrankenMoEError(
            f"cannot load split {split!r} of the Hub dataset {repo} ({exc})",
            "check the name, config and split, and download the dataset first when offline",
        ) from exc
    column = next((c for c in ("text", "messages") if c in table.column_names), None)
    if column is None:
        raise FrankenMoEError(
            f"the Hub dataset {repo} has no text or messages column (it has {', '.join(table.column_names)})",
            "choose a dataset with a text column, or convert it to .jsonl with a text field",
        )
    records = tuple(_row_record({column: value}, f"{repo}, row {i + 1}") for i, value in enumerate(table[column]))
    return NamedRecords(spec, tuple(r for r in records if r))


def read_sources(data: TrainingData, model_dir: Path) -> list[NamedRecords]:
    """The records of every source, in the order given: files, recipe prompts, Hub datasets."""
    if data.is_empty:
        raise FrankenMoEError(
            "no training data was given",
            "give data files (--data), the recipe's prompts (--recipe-prompts) or a Hub dataset (--hub-dataset)",
        )
    sources = [NamedRecords(Path(path).name, load_data_file(Path(path)).records) for path in data.files]
    if data.recipe_prompts:
        sources.append(NamedRecords("recipe prompts", _recipe_prompts(model_dir)))
    sources += [hub_records(spec) for spec in data.hub_datasets]
    return sources


def _recipe_prompts(model_dir: Path) -> tuple[Record, ...]:
    from app.core.merge.pipeline import RECIPE_FILENAME
    from app.core.recipe import load_recipe

    path = Path(model_dir) / RECIPE_FILENAME
    if not path.is_file():
        raise FrankenMoEError(
            f"{Path(model_dir).name} has no recipe ({RECIPE_FILENAME}) to take prompts from",
            "give data files or a Hub dataset instead of the recipe's prompts",
        )
    records = tuple(record for dataset in recipe_datasets(load_recipe(path)) for record in dataset.records)
    if not records:
        raise FrankenMoEError(
            f"the recipe of {Path(model_dir).name} has no prompts", "give data files or a Hub dataset as well"
        )
    return records


def _texts(tokenizer: Any, records: Iterable[Record], source: str) -> Iterator[tuple[str, bool]]:
    """Each record's text and whether the tokenizer should add its special tokens (plain text: yes; a rendered
    conversation: no, its template wrote them, and adding them again would double the BOS)."""
    for record in records:
        if isinstance(record, str):
            yield record, True
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise FrankenMoEError(
                f"{source} holds conversations (messages), but this model's tokenizer has no chat template",
                "give plain text records (a text field) for this model",
            )
        yield tokenizer.apply_chat_template(list(record), tokenize=False), False


def _encode(tokenizer: Any, texts: list[tuple[str, bool]]) -> list[list[int]]:
    """Token ids of each text, in order; plain texts and rendered conversations are batched apart."""
    encoded: list[list[int]] = [[] for _ in texts]
    for special in (True, False):
        positions = [i for i, (text, add) in enumerate(texts) if add is special and text.strip()]
        if positions:
            batch = [texts[i][0] for i in positions]
            for i, ids in zip(positions, tokenizer(batch, add_special_tokens=special)["input_ids"], strict=True):
                encoded[i] = list(ids)
    return encoded


def eos_token_id(tokenizer: Any, config: Any) -> int:
    """The token written between records: the tokenizer's EOS, else the config's."""
    value = getattr(tokenizer, "eos_token_id", None)
    if value is None:
        value = getattr(config, "eos_token_id", None)
        value = value[0] if isinstance(value, list | tuple) and value else value
    if value is None:
        raise FrankenMoEError(
            "the model has no end-of-sequence token to separate the training records with",
            "use a model whose tokenizer or config names an eos_token",
        )
    return int(value)


def pack_data(
    tokenizer: Any,
    sources: list[NamedRecords],
    *,
    seq_len: int,
    val_fraction: float,
    seed: int,
    eos_id: int,
    max_tokens: int | None = None,
    max_validation: int | None = None,
    cancel: threading.Event | None = None,
) -> Job[PackedData]:
    """Tokenise, pack and split. Yields ("data", records done, records) progress; stops reading once
    ``max_tokens`` are packed; holds out at most ``max_validation`` sequences. Raises a FrankenMoEError
    when the data give no token, or too few for one training and one validation sequence."""
    import torch

    from app.core.training.trainer import TrainingProgress

    total_records = sum(len(source.records) for source in sources)
    ids: list[int] = []
    done = 0
    truncated = False
    yield TrainingProgress("data", 0, total_records, message="tokenising the training text")
    for source in sources:
        texts = list(_texts(tokenizer, source.records, source.name))
        for start in range(0, len(texts), ENCODE_BATCH):
            check_cancel(cancel)
            for record_ids in _encode(tokenizer, texts[start : start + ENCODE_BATCH]):
                if record_ids:
                    ids.extend(record_ids)
                    if record_ids[-1] != eos_id:  # a template or a tokenizer that already closes the record
                        ids.append(eos_id)
            done += min(ENCODE_BATCH, len(texts) - start)
            yield TrainingProgress("data", done, total_records, message=f"tokenising {source.name}")
            if max_tokens is not None and len(ids) >= max_tokens:
                truncated = done < total_records
                break
        if truncated:
            break
    names = ", ".join(source.name for source in sources)
    if not ids:
        raise FrankenMoEError(
            f"the training data ({names}) holds no text", "give files with at least a few sentences of text"
        )
    sequences = len(ids) // seq_len
    if sequences < 2:
        raise FrankenMoEError(
            f"the training data ({names}) gives {len(ids):,} tokens, fewer than the {2 * seq_len:,} that one "
            f"training and one validation sequence of {seq_len} tokens need",
            f"give more text, or a shorter sequence length (--seq-len {max(2, len(ids) // 2)} or less)",
        )
    packed = torch.tensor(ids[: sequences * seq_len], dtype=torch.long).view(sequences, seq_len)
    order = torch.randperm(sequences, generator=torch.Generator().manual_seed(seed))
    held_out = min(sequences - 1, max(1, math.floor(sequences * val_fraction + 0.5)))
    if max_validation is not None:
        held_out = min(held_out, max_validation)
    return PackedData(
        train=packed[order[held_out:]].contiguous(),
        validation=packed[order[:held_out]].contiguous(),
        sources=tuple(source.name for source in sources),
        records=done,
        tokens=sequences * seq_len,
        truncated=truncated,
    )
