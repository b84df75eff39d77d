"""`frankenmoe export-gguf`, in a process of its own."""

from __future__ import annotations

import os
import sys

import gguf
import pytest

from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.progress import run_job
from app.core.recipe import parse_recipe
from tests.cli.test_cli import frankenmoe


@pytest.fixture(scope="module")
def qwen2_moe(qwen2_donors, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-export") / "moe"
    lines = [f"base_model: {qwen2_donors['base']}", "gate_mode: random", "dtype: float32", "experts_per_token: 2"]
    lines += ["experts:", *(f"  - source_model: {qwen2_donors[f'expert{i}']}" for i in range(3))]
    lines += ["shared_experts:", f"  - source_model: {qwen2_donors['shared']}"]
    run_job(merge_moe(parse_recipe("\n".join(lines)), MergeOptions(out_dir=out)))
    return out


def test_exports_with_progress_warnings_and_apps(qwen2_moe, tmp_path):
    out = tmp_path / "moe.q8_0.gguf"
    result = frankenmoe("export-gguf", str(qwen2_moe), str(out), "--type", "Q8_0")
    assert result.returncode == 0, result.stderr
    assert "warning: norm_topk_prob" in result.stderr  # said before writing
    assert "write: 100%" in result.stderr  # the tqdm bar
    assert f"wrote {out}" in result.stdout and "LM Studio" in result.stdout
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "qwen2moe"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_refuses_to_overwrite_without_the_flag(qwen2_moe, tmp_path):
    out = tmp_path / "moe.gguf"
    out.write_bytes(b"keep me")
    result = frankenmoe("export-gguf", str(qwen2_moe), str(out), "--quiet")
    assert result.returncode == 1 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert out.read_bytes() == b"keep me"
    result = frankenmoe("export-gguf", str(qwen2_moe), str(out), "--quiet", "--overwrite", "--type", "bf16")
    assert result.returncode == 0, result.stderr
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16


def test_k_quant_needs_llama_quantize(qwen2_moe, tmp_path, monkeypatch):
    # Only the Python running the CLI stays reachable: no llama-quantize anywhere on PATH.
    monkeypatch.setenv("PATH", f"{tmp_path / 'no-tools'}{os.pathsep}{os.path.dirname(sys.executable)}")
    result = frankenmoe("export-gguf", str(qwen2_moe), str(tmp_path / "m.gguf"), "--type", "q4_k_m")
    assert result.returncode == 1
    assert "llama-quantize" in result.stderr and "--quantize-with" in result.stderr
    result = frankenmoe(
        "export-gguf", str(qwen2_moe), str(tmp_path / "m.gguf"), "--type", "q4_k_m", "--quantize-with", str(tmp_path)
    )
    assert result.returncode == 1 and "is not an executable llama-quantize" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_type_is_refused_by_the_parser(qwen2_moe, tmp_path):
    result = frankenmoe("export-gguf", str(qwen2_moe), str(tmp_path / "m.gguf"), "--type", "q3_x")
    assert result.returncode == 2 and "q4_k_m" in result.stderr


def test_k_quant_through_a_real_llama_quantize(qwen2_moe, tmp_path):
    """Runs only where llama.cpp was built (LLAMA_QUANTIZE or PATH): a fake quantizer would prove nothing."""
    from app.core.export import find_llama_quantize

    quantizer = find_llama_quantize(os.environ.get("LLAMA_QUANTIZE"))
    if quantizer is None:
        pytest.skip("no llama-quantize (set LLAMA_QUANTIZE or put one on PATH)")
    out = tmp_path / "moe.q6_k.gguf"
    result = frankenmoe("export-gguf", str(qwen2_moe), str(out), "--type", "q6_k", "--quantize-with", str(quantizer))
    assert result.returncode == 0, result.stderr
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q6_K
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
