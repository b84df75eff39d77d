"""What a merge leaves on disk when it is cancelled, killed while replacing a model, or run without
the kernel's file-to-file copy (macOS, Windows)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from app.core.merge import shards
from app.core.merge.leftovers import PARTIAL_MARK, REPLACED_MARK, clean_folder
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.progress import Cancelled
from app.core.recipe import save_recipe
from tests.core.test_merge import leftovers, merge, recipe_for

REPO = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def dead_pid() -> int:
    """The id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("cancel_after", [1, 5, 20])
def test_cancel_stops_the_merge_at_its_next_step(llama_donors, tmp_path, cancel_after):
    cancel = threading.Event()
    out = tmp_path / "moe"
    job = merge_moe(recipe_for(llama_donors), MergeOptions(out_dir=out), cancel=cancel)
    after_cancel = []
    with pytest.raises(Cancelled):
        for record in job:
            if cancel.is_set():
                after_cancel.append(record)
            elif record.stage == "writing" and record.done == cancel_after:
                assert record.done < record.total  # cancelled mid-write, not at the end
                cancel.set()
    assert len(after_cancel) <= 1, [r.message for r in after_cancel]
    assert list(tmp_path.iterdir()) == []


# Dies by SIGKILL (no cleanup, no finally) at a moment observed from outside the merge, through
# Python's audit events: just before the new model is renamed into the target, or once the merge has
# touched the target and a second file is being removed (rmtree removes by name relative to a folder
# handle, so what is removed shows only once the target itself has been renamed or removed).
KILLED_OVERWRITE = """
import os, signal, sys
from pathlib import Path

out = os.path.abspath(sys.argv[2])
kill_at = sys.argv[3]
touched = []
removals = []


def kill_at_the_moment(event, args):
    if event in ("os.rename", "shutil.rmtree"):
        paths = [os.path.abspath(os.fsdecode(a)) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        if out in paths:
            touched.append(event)
            if kill_at == "rename into place" and event == "os.rename" and paths[1] == out:
                os.kill(os.getpid(), signal.SIGKILL)
    if kill_at == "second removal" and touched and event == "os.remove":
        removals.append(args[0])
        if len(removals) == 2:
            os.kill(os.getpid(), signal.SIGKILL)


from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.progress import run_job
from app.core.recipe import load_recipe

recipe = load_recipe(sys.argv[1])
sys.addaudithook(kill_at_the_moment)
run_job(merge_moe(recipe, MergeOptions(out_dir=Path(out), overwrite=True)))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")
@pytest.mark.parametrize("kill_at", ["rename into place", "second removal"])
def test_a_merge_killed_while_overwriting_leaves_the_old_model_or_the_new(llama_donors, tmp_path, kill_at):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "moe"
    merge(recipe_for(llama_donors, top_k=1), out)
    old = snapshot(out)
    merge(recipe_for(llama_donors, top_k=2), tmp_path / "reference" / "moe")
    new = snapshot(tmp_path / "reference" / "moe")
    recipe_path = tmp_path / "recipe.yml"
    save_recipe(recipe_for(llama_donors, top_k=2), recipe_path)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_OVERWRITE), str(recipe_path), str(out), kill_at],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]  # the moment came, the process died
    clean_folder(out.parent)  # what the next merge into this folder does first
    assert out.is_dir()
    assert snapshot(out) in (old, new)
    assert leftovers(work) == []


@pytest.mark.parametrize("name", ["moe", "moe [v2]*?"])  # glob's special characters are only a name here
def test_the_next_merge_restores_a_model_a_killed_overwrite_had_moved_aside(llama_donors, tmp_path, name):
    """The state a kill between 'move the old model aside' and 'rename the new one in' leaves."""
    from app.core.problems import FrankenMoEError

    out = tmp_path / name
    merge(recipe_for(llama_donors), out)
    old = snapshot(out)
    pid = dead_pid()
    aside = tmp_path / f".{name}{REPLACED_MARK}{pid}-0badc0de"
    out.rename(aside)
    partial = tmp_path / f".{name}{PARTIAL_MARK}{pid}-0badc0de"
    shutil.copytree(aside, partial)
    (partial / "config.json").unlink()  # the new model, unfinished
    # A live process's folders are its own business: the cleanup leaves them alone.
    alive = tmp_path / f".{name}{REPLACED_MARK}{os.getpid()}-0badc0de"
    alive.mkdir()

    # The next merge restores the old model and removes the dead run's partial folder; then it
    # refuses, since the restored model is not to be replaced without asking.
    with pytest.raises(FrankenMoEError, match="already exists"):
        merge(recipe_for(llama_donors, top_k=1), out)
    assert snapshot(out) == old
    assert leftovers(tmp_path) == [alive.name]


def test_the_buffered_copy_writes_the_same_bytes_as_the_kernel_copy(llama_donors, tmp_path, monkeypatch):
    """macOS and Windows have no os.copy_file_range: the buffered copy is their only data path."""
    recipe = recipe_for(llama_donors)
    merge(recipe, tmp_path / "kernel" / "moe", shard_size=40_000)
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    # A chunk smaller than most tensors, and odd, so that chunk boundaries fall everywhere.
    monkeypatch.setattr(shards, "_COPY_CHUNK", 4099)
    merge(recipe, tmp_path / "buffered" / "moe", shard_size=40_000)
    kernel, buffered = snapshot(tmp_path / "kernel" / "moe"), snapshot(tmp_path / "buffered" / "moe")
    assert len([name for name in kernel if name.endswith(".safetensors")]) > 1
    assert buffered == kernel


def test_tensors_written_from_memory_in_chunks_have_the_same_bytes(llama_donors, tmp_path, monkeypatch):
    # Float32 donors into bfloat16 output: every tensor is converted in memory and written in chunks.
    recipe = recipe_for(llama_donors, dtype="bfloat16")
    merge(recipe, tmp_path / "whole" / "moe")
    monkeypatch.setattr(shards, "_WRITE_CHUNK", 4099)  # odd and small: chunk boundaries fall everywhere
    merge(recipe, tmp_path / "chunked" / "moe")
    assert snapshot(tmp_path / "chunked" / "moe") == snapshot(tmp_path / "whole" / "moe")


def test_a_tensor_written_in_blocks_of_rows_is_the_tensor_and_a_short_one_is_refused(tmp_path):
    import torch
    from safetensors.torch import load_file

    whole = torch.arange(40 * 6, dtype=torch.float32).view(40, 6).to(torch.bfloat16)
    planned = [shards.PlannedTensor("w", (40, 6), "bfloat16")]
    folder = tmp_path / "blocks"
    folder.mkdir()
    with shards.ShardWriter(folder, shards.plan_shards(planned, 2**20)) as writer:
        writer.write("w", iter([whole[:17], whole[17:34], whole[34:]]))
    assert torch.equal(load_file(folder / "model.safetensors")["w"], whole)

    short = tmp_path / "short"
    short.mkdir()
    one_shard = shards.plan_shards(planned, 2**20)
    with pytest.raises(RuntimeError, match="came to 408 bytes, 480 were planned"), shards.ShardWriter(
        short, one_shard
    ) as writer:
        writer.write("w", iter([whole[:34]]))
    with pytest.raises(RuntimeError, match=r"block of \(4, 5\)"), shards.ShardWriter(short, one_shard) as writer:
        writer.write("w", iter([whole[:4, :5]]))


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_tensors_written_ahead_of_their_turn_leave_the_same_files(tmp_path, monkeypatch, kernel_copy):
    # While a LoRA merge waits for torch, the writer copies later tensors into their places; the
    # files must be those written in order, byte for byte, with or without the kernel's copy.
    import torch
    from safetensors.torch import save_file

    from app.core.sources import ByteRange

    if not kernel_copy:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
        monkeypatch.setattr(shards, "_COPY_CHUNK", 4099)
    generator = torch.Generator().manual_seed(3)
    tensors = {f"t{index}": torch.randn(10 + index, 7, generator=generator) for index in range(6)}
    save_file(tensors, tmp_path / "source.safetensors")
    source = tmp_path / "source.safetensors"
    header = 8 + int.from_bytes(source.read_bytes()[:8], "little")
    layout = json.loads(source.read_bytes()[8:header])

    def byte_range(name: str) -> ByteRange:
        start, end = layout[name]["data_offsets"]
        return ByteRange(source, header + start, end - start)

    planned = [shards.PlannedTensor(name, tuple(tensor.shape), "float32") for name, tensor in tensors.items()]
    plan = shards.plan_shards(planned, 3 * 17 * 7 * 4)  # t0-t3 in the first shard, t4-t5 in the second
    assert [len(shard.tensors) for shard in plan] == [4, 2]

    (tmp_path / "in_order").mkdir()
    with shards.ShardWriter(tmp_path / "in_order", plan) as writer:
        for name in tensors:
            writer.write(name, byte_range(name))

    (tmp_path / "ahead").mkdir()
    with shards.ShardWriter(tmp_path / "ahead", plan) as writer:
        writer.write("t0", tensors["t0"])
        assert writer.write_ahead("t3", byte_range("t3")) and writer.write_ahead("t2", byte_range("t2"))
        assert not writer.write_ahead("t4", byte_range("t4"))  # the next shard: not now
        with pytest.raises(RuntimeError, match="t0 is not planned after t1"):
            writer.write_ahead("t0", byte_range("t0"))
        assert writer.bytes_written == sum(tensors[name].numel() * 4 for name in ("t0", "t2", "t3"))
        assert not writer.pass_written_ahead()
        writer.write("t1", byte_range("t1"))
        assert writer.pass_written_ahead() and writer.pass_written_ahead()
        assert not writer.pass_written_ahead()
        assert writer.write_ahead("t5", byte_range("t5"))  # t4 is next: the second shard is begun
        writer.write("t4", tensors["t4"])
        assert writer.pass_written_ahead()
    assert snapshot(tmp_path / "ahead") == snapshot(tmp_path / "in_order")
