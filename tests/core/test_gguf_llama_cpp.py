"""The exported GGUF run by llama.cpp itself (llama-cpp-python) against transformers on the merged folder.

llama-cpp-python has no wheel here: pip builds llama.cpp from source (10-20 minutes), so it is not a
dependency and CI skips these tests. Locally, with a side environment that has it:
    PYTHONPATH=$PWD:/work/side/llama/lib/python3.11/site-packages LLAMA_CPP_LIB_PATH=<llama.cpp build>/bin \
    LLAMA_QUANTIZE=<llama.cpp build>/bin/llama-quantize python -m pytest -s tests/core/test_gguf_llama_cpp.py
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from app.core.export import export_gguf, find_llama_quantize
from app.core.progress import run_job
from tests.core.test_gguf_export import TEXTS, merged, write_sentencepiece_style_tokenizer

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp from source; not a dependency)"
)

PROMPTS = ["Hello world, 42 is", "def add(a, b):\n    return", "The old lighthouse keeper watched the"]


@pytest.fixture(scope="module")
def moes(llama_donors, qwen2_donors, qwen3_donors, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-cpp")
    return {
        "mixtral": merged(llama_donors, root / "mixtral"),
        # Every expert chosen: the top-k weights sum to 1 without renormalising, which llama.cpp's Qwen2-MoE skips.
        "qwen2_moe": merged(qwen2_donors, root / "qwen2", shared=True, top_k=3),
        "qwen2_moe_top2": merged(qwen2_donors, root / "qwen2-top2", shared=True, top_k=2),
        "qwen3_moe": merged(qwen3_donors, root / "qwen3"),
    }


def next_token_logits(folder, gguf_path, **config_overrides):
    """Per prompt: (transformers' last-position logits, llama.cpp's), on the same token ids."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **config_overrides).eval()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
    pairs = []
    try:
        for text in PROMPTS:
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            with torch.no_grad():
                reference = model(torch.tensor([ids])).logits[0, -1].numpy()
            llm.reset()
            llm.eval(ids)
            pairs.append((reference, np.array(llm.scores[len(ids) - 1], dtype=np.float32)))
    finally:
        llm.close()
    return pairs


def report(label, pairs):
    worst = max(float(np.abs(a - b).max()) for a, b in pairs)
    top1 = sum(int(a.argmax() == b.argmax()) for a, b in pairs)
    print(f"\n{label}: top-1 equal on {top1}/{len(pairs)} prompts, max |logit diff| {worst:.2e}")
    return top1, worst


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_llama_cpp_computes_what_transformers_computes(moes, tmp_path, arch):
    path = run_job(export_gguf(moes[arch], tmp_path / "m.gguf", "f32")).out_path
    top1, worst = report(f"{arch} f32", next_token_logits(moes[arch], path))
    assert top1 == len(PROMPTS)
    assert worst < 1e-3


@pytest.mark.parametrize("kind", ["byte-level BPE", "SentencePiece"])
def test_llama_cpp_tokenizes_like_the_model(moes, tmp_path, kind):
    folder = moes["mixtral"]
    if kind == "SentencePiece":
        folder = tmp_path / "spm"
        shutil.copytree(moes["mixtral"], folder)
        write_sentencepiece_style_tokenizer(folder, json.loads((folder / "config.json").read_text())["vocab_size"])
    path = run_job(export_gguf(folder, tmp_path / "m.gguf", "f16")).out_path
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    try:
        for text in [*TEXTS, "zebra quokka ünïcödé"]:
            ours = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert ours == tokenizer.encode(text, add_special_tokens=False).ids, text
    finally:
        llm.close()


def test_qwen2_moe_without_renormalisation_differs_as_warned(moes, tmp_path):
    """Top-2 of 3: llama.cpp computes what transformers computes with norm_topk_prob off, not what the config says."""
    result = run_job(export_gguf(moes["qwen2_moe_top2"], tmp_path / "m.gguf", "f32"))
    assert any(w.startswith("norm_topk_prob") for w in result.warnings)
    folder = moes["qwen2_moe_top2"]
    _top1, as_configured = report("qwen2_moe top-2 of 3, as configured", next_token_logits(folder, result.out_path))
    _top1, unnormalised = report(
        "qwen2_moe top-2 of 3, transformers with norm_topk_prob off",
        next_token_logits(folder, result.out_path, norm_topk_prob=False),
    )
    assert unnormalised < 1e-4 < as_configured


@pytest.mark.parametrize("out_type", ["q8_0", "q4_0"])
def test_in_process_quants_run_in_llama_cpp(moes, tmp_path, out_type):
    path = run_job(export_gguf(moes["qwen3_moe"], tmp_path / "m.gguf", out_type)).out_path
    pairs = next_token_logits(moes["qwen3_moe"], path)
    report(f"qwen3_moe {out_type}", pairs)
    assert all(np.isfinite(b).all() for _a, b in pairs)


def test_k_quant_with_a_real_llama_quantize(moes, tmp_path):
    quantizer = find_llama_quantize(os.environ.get("LLAMA_QUANTIZE"))
    if quantizer is None:
        pytest.skip("no llama-quantize (set LLAMA_QUANTIZE or put one on PATH)")
    import gguf

    result = run_job(export_gguf(moes["mixtral"], tmp_path / "m.gguf", "q4_k_m", quantizer=quantizer))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # the intermediate is gone
    reader = gguf.GGUFReader(result.out_path)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    pairs = next_token_logits(moes["mixtral"], result.out_path)
    report("mixtral q4_k_m (llama-quantize)", pairs)
    assert all(np.isfinite(b).all() for _a, b in pairs)


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize(("arch", "scaling"), [("mixtral", "linear"), ("mixtral", "llama3"), ("qwen3_moe", "yarn")])
def test_rope_scaling_reaches_llama_cpp(moes, tmp_path, arch, scaling):
    """The same model with scaled RoPE (config only): llama.cpp (rope.scaling keys, or the rope_freqs tensor)
    computes what transformers computes, and not what it computed without the scaling."""
    folder = tmp_path / scaling
    shutil.copytree(moes[arch], folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {**ROPE_SCALINGS[scaling], "rope_theta": config["rope_theta"]}
    config["rope_scaling"] = ROPE_SCALINGS[scaling]
    (folder / "config.json").write_text(json.dumps(config))
    path = run_job(export_gguf(folder, tmp_path / "m.gguf", "f32")).out_path
    top1, worst = report(f"{arch} f32, {scaling} RoPE scaling", next_token_logits(folder, path))
    assert top1 == len(PROMPTS) and worst < 1e-3
    unscaled = next_token_logits(moes[arch], path)
    assert max(float(np.abs(a - b).max()) for a, b in unscaled) > 10 * worst


def test_cancel_while_llama_quantize_runs_leaves_nothing(moes, tmp_path):
    quantizer = find_llama_quantize(os.environ.get("LLAMA_QUANTIZE"))
    if quantizer is None:
        pytest.skip("no llama-quantize (set LLAMA_QUANTIZE or put one on PATH)")
    import threading

    from app.core.progress import Cancelled

    cancel = threading.Event()
    with pytest.raises(Cancelled):
        for record in export_gguf(moes["qwen3_moe"], tmp_path / "m.gguf", "q5_k_m", quantizer=quantizer, cancel=cancel):
            if record.stage == "quantize":
                cancel.set()
    assert list(tmp_path.iterdir()) == []


def test_exactly_zero_shared_gate_is_nan_in_llama_cpp_and_the_tiny_one_is_not(moes, tmp_path):
    """Why merges write a tiny gate: llama.cpp's sigmoid silu(z)/z is 0/0 for a zero gate."""
    import gguf

    path = run_job(export_gguf(moes["qwen2_moe"], tmp_path / "m.gguf", "f32")).out_path
    ids = Tokenizer.from_file(str(moes["qwen2_moe"] / "tokenizer.json")).encode(PROMPTS[0]).ids

    def logits() -> np.ndarray:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
        try:
            llm.eval(ids)
            return np.array(llm.scores[len(ids) - 1])
        finally:
            llm.close()

    assert np.isfinite(logits()).all()
    reader = gguf.GGUFReader(path, "r+")
    for tensor in reader.tensors:
        if tensor.name.endswith("ffn_gate_inp_shexp.weight"):
            tensor.data[:] = 0
    reader.data.flush()
    del reader
    assert np.isnan(logits()).all()
