"""Writing the model with trained routers: a new folder, every other tensor byte-identical, committed atomically.

Shards that hold no router are hard-linked into the new folder (copied where links are impossible,
across drives for instance); shards that hold routers are rewritten tensor by tensor, every other
tensor copied as its bytes and the routers converted back to their stored dtype. The model card and
the saved recipe gain a "Router training" section; everything else is copied. The folder is built in
a hidden work folder beside the target (the merge's, cleaned up by the same leftovers rules when a
run is killed) and renamed into place at the end. The input folder is only read.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.merge.leftovers import PARTIAL_MARK, clean_folder, record_output_folder, work_folder
from app.core.merge.shards import PlannedTensor, Shard, ShardWriter, write_error
from app.core.problems import FrankenMoEError
from app.core.progress import Job, check_cancel
from app.core.sources import ModelSource
from app.core.training.card import with_recipe_comment

if TYPE_CHECKING:
    import torch

ROUTER_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")
SHARED_GATE_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.shared_expert_gate\.weight$")
CARD_FILENAME = "README.md"
REPORT_FILENAME = "router-training.json"


@dataclass(frozen=True, slots=True)
class RouterKey:
    """Which trainable gate a tensor is: a layer's router, or its shared expert's gate."""

    layer: int
    kind: str  # "router" or "shared_gate"


def router_key(tensor_name: str) -> RouterKey | None:
    """The gate a stored tensor is (by name, as transformers 4 and 5 and mergekit write them), or None."""
    match = ROUTER_TENSOR.search(tensor_name)
    if match:
        return RouterKey(int(match.group(1)), "router")
    match = SHARED_GATE_TENSOR.search(tensor_name)
    return RouterKey(int(match.group(1)), "shared_gate") if match else None


def stored_router_names(model_dir: Path) -> dict[RouterKey, str]:
    """Each gate's tensor name in the model's safetensors files (empty for a dense model)."""
    with ModelSource(Path(model_dir)) as source:
        return {key: name for name in source.tensor_names if (key := router_key(name)) is not None}


def write_trained_model(
    model_dir: Path,
    out_dir: Path,
    gates: Mapping[str, torch.Tensor],
    *,
    card_section: str,
    recipe_comment: str,
    report_json: str,
    cancel: threading.Event | None = None,
) -> Job[None]:
    """Write ``model_dir`` with the ``gates`` (stored tensor name -> trained tensor) to ``out_dir``.

    Yields ("write", files done, files) progress records; raises Cancelled or a FrankenMoEError, in
    which case nothing is left at ``out_dir`` or beside it.
    """
    from app.core.merge.pipeline import RECIPE_FILENAME
    from app.core.training.trainer import TrainingProgress

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    clean_folder(out_dir.parent)
    record_output_folder(out_dir.parent)  # so that the app's next start removes the work folder of a killed run
    partial = work_folder(out_dir, PARTIAL_MARK)
    with ModelSource(model_dir) as source:
        by_file: dict[Path, list[str]] = {}
        for name in source.tensor_names:
            by_file.setdefault(source.tensor_info(name).file, []).append(name)
        entries = sorted(model_dir.iterdir())
        try:
            partial.mkdir(parents=True)
            for done, entry in enumerate(entries):
                check_cancel(cancel)
                yield TrainingProgress("write", done, len(entries), message=entry.name)
                target = partial / entry.name
                names = by_file.get(entry.resolve(), by_file.get(entry, []))
                if entry.name == CARD_FILENAME:
                    _write_text(target, _with_section(_read_text(entry), card_section))
                elif entry.name == RECIPE_FILENAME:
                    _write_text(target, with_recipe_comment(_read_text(entry), recipe_comment))
                elif any(name in gates for name in names):
                    _rewrite_shard(source, entry, target, names, gates)
                elif names:
                    _link_or_copy(entry, target)
                elif entry.is_dir():
                    shutil.copytree(entry, target, symlinks=False)
                else:
                    shutil.copy2(entry, target)
            if not (model_dir / CARD_FILENAME).exists():
                _write_text(partial / CARD_FILENAME, _with_section("", card_section))
            _write_text(partial / REPORT_FILENAME, report_json)
            check_cancel(cancel)
            _commit(partial, out_dir)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise write_error(partial, exc) from exc
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    yield TrainingProgress("write", len(entries), len(entries), message=f"wrote {out_dir}")


def _commit(partial: Path, out_dir: Path) -> None:
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()  # an empty folder the user made for the model: the new one takes its place
    if out_dir.exists():
        raise FrankenMoEError(
            f"{out_dir} appeared while the routers were being trained", "choose another output folder and run again"
        )
    partial.rename(out_dir)


def _rewrite_shard(
    source: ModelSource, file: Path, target: Path, names: list[str], gates: Mapping[str, torch.Tensor]
) -> None:
    """The shard with its gates replaced (in their stored dtype); every other tensor copied as bytes, in order."""
    import torch

    ordered = sorted(names, key=lambda name: source.tensor_info(name).start)
    planned = [
        PlannedTensor(name, source.tensor_info(name).shape, source.tensor_info(name).torch_dtype_name)
        for name in ordered
    ]
    # A single-shard plan: the writer writes no index (the input's is copied: names and files stay).
    with ShardWriter(target.parent, [Shard(file.name, tuple(planned))]) as writer:
        for tensor in planned:
            if tensor.name in gates:
                trained = gates[tensor.name].detach().to("cpu", getattr(torch, tensor.dtype))
                writer.write(tensor.name, trained.reshape(tensor.shape).contiguous())
            else:
                writer.write(tensor.name, source.byte_range(tensor.name))


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link to an unchanged shard (no second copy on disk), else a copy."""
    try:
        os.link(source.resolve(), target)
    except OSError:
        shutil.copy2(source, target)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return path.read_bytes().decode("utf-8", errors="replace")


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _with_section(card: str, section: str) -> str:
    """The card with the router training section at its end, replacing one an earlier training wrote."""
    from app.core.training.card import SECTION_TITLE

    kept = card.split(SECTION_TITLE, 1)[0] if SECTION_TITLE in card else card
    return f"{kept.rstrip()}\n\n{section}".lstrip()


def report_text(report: Mapping[str, Any]) -> str:
    import json

    return json.dumps(report, indent=2, sort_keys=False) + "\n"
