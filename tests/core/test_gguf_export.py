"""GGUF export: every file read back with gguf's own reader and held against the merged model and its tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from app.core.export import (
    IN_PROCESS_TYPES,
    QUANTIZER_TYPES,
    export_gguf,
    find_llama_quantize,
    plan_gguf_export,
)
from app.core.export.quantizer import quantize_command
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.problems import ProblemsError
from app.core.progress import Cancelled, run_job
from app.core.recipe import parse_recipe
from tests.models import CORPUS

TEXTS = [
    "Hello world, 42 is the answer.",
    "def add(a, b):\n    return a + b",
    "  spaces   and\ttabs\n\nnew lines",
    "Le chat dort sur le rebord de la fenêtre. ☕ 3.14159",
    "<s>special</s> tokens <pad> inside",
]


def merged(donors, out, *, shared=False, top_k=2, architecture=None, dtype="float32"):
    lines = [f"base_model: {donors['base']}", "gate_mode: random", f"dtype: {dtype}", f"experts_per_token: {top_k}"]
    lines += ["experts:", *(f"  - source_model: {donors[f'expert{i}']}" for i in range(3))]
    if shared:
        lines += ["shared_experts:", f"  - source_model: {donors['shared']}"]
    if architecture:
        lines.append(f"architecture: {architecture}")
    run_job(merge_moe(parse_recipe("\n".join(lines)), MergeOptions(out_dir=out)))
    return out


@pytest.fixture(scope="module")
def moes(llama_donors, qwen2_donors, qwen3_donors, tmp_path_factory):
    root = tmp_path_factory.mktemp("moes")
    return {
        "mixtral": merged(llama_donors, root / "mixtral"),
        "qwen2_moe": merged(qwen2_donors, root / "qwen2", shared=True),
        "qwen3_moe": merged(qwen3_donors, root / "qwen3"),
    }


def merged_tensors(folder):
    tensors = {}
    for file in folder.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


def permuted(weight, heads):
    """llama.cpp's llama architecture rotates neighbouring pairs: q/k rows reordered from HF's two halves."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def expected_tensors(folder):
    """The GGUF tensors the merged folder should become, in float32, by llama.cpp's names (written out here)."""
    config = json.loads((folder / "config.json").read_text())
    hf = merged_tensors(folder)
    mixtral = config["model_type"] == "mixtral"
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        out["output.weight"] = hf["lm_head.weight"]
    elif config["model_type"] == "qwen2_moe":
        out["output.weight"] = hf["model.embed_tokens.weight"]
    experts = config.get("num_local_experts") or config["num_experts"]
    for layer in range(config["num_hidden_layers"]):
        p, b = f"model.layers.{layer}", f"blk.{layer}"
        attn = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "output": "o_proj"}
        for short, long in attn.items():
            for kind in ("weight", "bias"):
                if f"{p}.self_attn.{long}.{kind}" in hf:
                    out[f"{b}.attn_{short}.{kind}"] = hf[f"{p}.self_attn.{long}.{kind}"]
        for short in ("q", "k"):
            if f"{p}.self_attn.{short}_norm.weight" in hf:
                out[f"{b}.attn_{short}_norm.weight"] = hf[f"{p}.self_attn.{short}_norm.weight"]
        if mixtral:
            out[f"{b}.attn_q.weight"] = permuted(out[f"{b}.attn_q.weight"], config["num_attention_heads"])
            out[f"{b}.attn_k.weight"] = permuted(out[f"{b}.attn_k.weight"], config["num_key_value_heads"])
        out[f"{b}.attn_norm.weight"] = hf[f"{p}.input_layernorm.weight"]
        out[f"{b}.ffn_norm.weight"] = hf[f"{p}.post_attention_layernorm.weight"]
        if mixtral:
            moe = f"{p}.block_sparse_moe"
            out[f"{b}.ffn_gate_inp.weight"] = hf[f"{moe}.gate.weight"]
            for name, slot in {"gate": "w1", "down": "w2", "up": "w3"}.items():
                out[f"{b}.ffn_{name}_exps.weight"] = torch.stack(
                    [hf[f"{moe}.experts.{e}.{slot}.weight"] for e in range(experts)]
                )
            continue
        out[f"{b}.ffn_gate_inp.weight"] = hf[f"{p}.mlp.gate.weight"]
        for name in ("gate", "up", "down"):
            out[f"{b}.ffn_{name}_exps.weight"] = torch.stack(
                [hf[f"{p}.mlp.experts.{e}.{name}_proj.weight"] for e in range(experts)]
            )
            if f"{p}.mlp.shared_expert.{name}_proj.weight" in hf:
                out[f"{b}.ffn_{name}_shexp.weight"] = hf[f"{p}.mlp.shared_expert.{name}_proj.weight"]
        if f"{p}.mlp.shared_expert_gate.weight" in hf:
            out[f"{b}.ffn_gate_inp_shexp.weight"] = hf[f"{p}.mlp.shared_expert_gate.weight"].reshape(-1)
    return out


def gguf_tensors(path):
    reader = gguf.GGUFReader(path)
    return reader, {
        t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist()))))
        for t in reader.tensors
    }


def export(folder, out, out_type, **kwargs):
    return run_job(export_gguf(folder, out, out_type, **kwargs))


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16"])
def test_float_tensors_are_the_merged_ones_up_to_the_cast(moes, tmp_path, arch, out_type):
    result = export(moes[arch], tmp_path / "m.gguf", out_type)
    _reader, written = gguf_tensors(result.out_path)
    expected = expected_tensors(moes[arch])
    assert set(written) == set(expected)
    assert result.tensor_count == len(expected)
    cast = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[out_type]
    for name, reference in expected.items():
        qtype, data = written[name]
        kept_f32 = reference.dim() == 1 or name.endswith("ffn_gate_inp.weight")
        assert qtype == (gguf.GGMLQuantizationType.F32 if kept_f32 else gguf.GGMLQuantizationType[out_type.upper()])
        want = reference.float() if kept_f32 else reference.to(cast).float()
        assert data.shape == tuple(want.shape), name
        assert np.array_equal(data, want.numpy()), name


@pytest.mark.parametrize(("out_type", "levels"), [("q8_0", 127), ("q4_0", 8), ("q5_0", 16), ("q5_1", 15)])
def test_quantised_tensors_are_within_the_formats_error(moes, tmp_path, out_type, levels):
    result = export(moes["qwen2_moe"], tmp_path / "m.gguf", out_type)
    _reader, written = gguf_tensors(result.out_path)
    for name, reference in expected_tensors(moes["qwen2_moe"]).items():
        qtype, data = written[name]
        if reference.dim() == 1 or name.endswith("ffn_gate_inp.weight"):
            assert qtype == gguf.GGMLQuantizationType.F32 and np.array_equal(data, reference.numpy())
            continue
        assert qtype == gguf.GGMLQuantizationType[out_type.upper()], name
        blocks = reference.float().numpy().reshape(-1, 32)
        span = np.abs(blocks).max(axis=1, keepdims=True) if levels != 15 else np.ptp(blocks, axis=1, keepdims=True)
        error = np.abs(data.reshape(-1, 32) - blocks)
        # One step of the block's scale (rounding plus the f16 scale's own rounding), never more.
        assert (error <= span / levels * 1.01 + 1e-7).all(), name
        assert error.max() > 0  # really quantised


def test_metadata_per_architecture(moes, tmp_path):
    for arch, gguf_arch in {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}.items():
        config = json.loads((moes[arch] / "config.json").read_text())
        reader = gguf.GGUFReader(export(moes[arch], tmp_path / f"{arch}.gguf", "f16").out_path)
        assert field(reader, "general.architecture") == gguf_arch
        key = {
            "context_length": config["max_position_embeddings"],
            "embedding_length": config["hidden_size"],
            "block_count": config["num_hidden_layers"],
            "feed_forward_length": config["intermediate_size"],
            "attention.head_count": config["num_attention_heads"],
            "attention.head_count_kv": config["num_key_value_heads"],
            "attention.key_length": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            "expert_count": config.get("num_local_experts") or config.get("num_experts"),
            "expert_used_count": config["num_experts_per_tok"],
            "vocab_size": config["vocab_size"],
        }
        if arch != "mixtral":
            key["expert_feed_forward_length"] = config["moe_intermediate_size"]
        if arch == "qwen2_moe":
            key["expert_shared_feed_forward_length"] = config["shared_expert_intermediate_size"]
        for name, value in key.items():
            assert field(reader, f"{gguf_arch}.{name}") == value, name
        assert field(reader, f"{gguf_arch}.rope.freq_base") == pytest.approx(config["rope_theta"])
        assert field(reader, f"{gguf_arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
        assert field(reader, "tokenizer.ggml.model") == "gpt2"
        assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
        tokenizer_config = json.loads((moes[arch] / "tokenizer_config.json").read_text())
        vocab = json.loads((moes[arch] / "tokenizer.json").read_text())
        ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
        assert field(reader, "tokenizer.ggml.bos_token_id") == ids[tokenizer_config["bos_token"]]
        assert field(reader, "tokenizer.ggml.eos_token_id") == ids[tokenizer_config["eos_token"]]
        assert field(reader, "tokenizer.ggml.padding_token_id") == ids["<pad>"]
        template = tokenizer_config.get("chat_template")
        if template is None and (moes[arch] / "chat_template.jinja").exists():
            template = (moes[arch] / "chat_template.jinja").read_text()
        if template is not None:
            assert field(reader, "tokenizer.chat_template") == template
        types = field(reader, "tokenizer.ggml.token_type")
        assert types[ids["<s>"]] == gguf.TokenType.CONTROL
        # Said in the file, as the model's own tokenizer does it, rather than left to llama.cpp's guess.
        with_specials = Tokenizer.from_file(str(moes[arch] / "tokenizer.json")).encode("a").ids
        assert field(reader, "tokenizer.ggml.add_bos_token") == (with_specials[0] == ids["<s>"])
        assert field(reader, "tokenizer.ggml.add_eos_token") == (with_specials[-1] == ids["</s>"])


def pre_tokenizer_for(name):
    """tokenizers' pre-tokenizer for a llama.cpp pre-tokenizer name, as llama.cpp's "gpt-2" splits."""
    assert name == "gpt-2", f"no reference pre-tokenizer for {name!r} in this test"
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_gguf_vocabulary_encodes_like_the_models_tokenizer(moes, tmp_path, arch):
    """A BPE built only from the GGUF's tokens and merges (and its pre-tokenizer name) gives the model's ids."""
    reader = gguf.GGUFReader(export(moes[arch], tmp_path / "m.gguf", "f16").out_path)
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    used = {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind != gguf.TokenType.UNUSED}
    rebuilt = Tokenizer(models.BPE(vocab=used, merges=merges))
    rebuilt.pre_tokenizer = pre_tokenizer_for(field(reader, "tokenizer.ggml.pre"))
    rebuilt.decoder = decoders.ByteLevel()
    rebuilt.add_special_tokens([t for t, kind in zip(tokens, types, strict=True) if kind == gguf.TokenType.CONTROL])
    # Control tokens keep their ids.
    assert all(rebuilt.token_to_id(t) == i for i, t in enumerate(tokens) if types[i] == gguf.TokenType.CONTROL)
    original = Tokenizer.from_file(str(moes[arch] / "tokenizer.json"))
    for text in TEXTS:
        assert rebuilt.encode(text, add_special_tokens=False).ids == original.encode(text, add_special_tokens=False).ids


def test_cancel_leaves_no_file(moes, tmp_path):
    cancel = threading.Event()
    out = tmp_path / "m.gguf"
    job = export_gguf(moes["qwen3_moe"], out, "q8_0", cancel=cancel)
    with pytest.raises(Cancelled):
        for record in job:
            if record.stage == "write" and record.done == 3:
                assert any(tmp_path.iterdir())  # the partial file is there mid-write
                cancel.set()
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_kept_unless_overwrite(moes, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    plan = plan_gguf_export(moes["qwen3_moe"], out, "f16")
    assert [p.field for p in plan.problems] == ["overwrite"] and not plan.problems[0].is_error
    with pytest.raises(ProblemsError, match="already exists"):
        export(moes["qwen3_moe"], out, "f16")
    assert out.read_bytes() == b"mine"
    export(moes["qwen3_moe"], out, "f16", overwrite=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "qwen3moe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_k_quant_without_quantizer_is_a_clear_error(moes, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_llama_quantize() is None
    plan = plan_gguf_export(moes["qwen3_moe"], tmp_path / "m.gguf", "q4_k_m", quantizer=find_llama_quantize())
    (problem,) = plan.problems
    assert problem.field == "quantizer" and "llama-quantize" in problem.text and "--quantize-with" in problem.text
    with pytest.raises(ProblemsError, match="llama-quantize"):
        export(moes["qwen3_moe"], tmp_path / "m.gguf", "q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_quantizer_is_found_where_configured_or_on_path(tmp_path, monkeypatch):
    """Only the lookup and the command line: no fake quantizer is run."""
    folder = tmp_path / "llama.cpp" / "bin"
    folder.mkdir(parents=True)
    executable = folder / "llama-quantize"
    executable.write_text("")
    assert find_llama_quantize(str(executable)) is None  # not executable
    executable.chmod(executable.stat().st_mode | stat.S_IXUSR)
    assert find_llama_quantize(str(executable)) == executable
    assert find_llama_quantize(str(folder)) == executable
    assert find_llama_quantize(str(tmp_path / "missing")) is None
    monkeypatch.setenv("PATH", f"{tmp_path / 'nothing'}{os.pathsep}{folder}")
    assert find_llama_quantize() == executable
    command = quantize_command(executable, tmp_path / "a.gguf", tmp_path / "b.gguf", "q4_k_m", 2)
    assert command == [str(executable), str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf"), "Q4_K_M", "2"]
    assert set(QUANTIZER_TYPES).isdisjoint(IN_PROCESS_TYPES)


def test_qwen2_moe_top_k_renormalisation_is_named(moes, qwen2_donors, tmp_path):
    plan = plan_gguf_export(moes["qwen2_moe"], tmp_path / "m.gguf", "f16")
    assert plan.architecture == "qwen2moe" and not plan.problems
    assert any(w.startswith("norm_topk_prob") for w in plan.warnings)
    # With every expert chosen the weights already sum to 1: nothing to warn about.
    every = merged(qwen2_donors, tmp_path / "every", shared=True, top_k=3)
    assert not [w for w in plan_gguf_export(every, tmp_path / "m.gguf", "f16").warnings if "norm_topk" in w]
    assert not [w for w in plan_gguf_export(moes["qwen3_moe"], tmp_path / "m.gguf", "f16").warnings]


def test_mistral_sliding_window_is_named_when_shorter_than_the_context(mistral_donors, tmp_path):
    folder = merged(mistral_donors, tmp_path / "moe", dtype="bfloat16")
    config = json.loads((folder / "config.json").read_text())
    assert config["sliding_window"] >= config["max_position_embeddings"]  # the window never slides: no warning
    assert not plan_gguf_export(folder, tmp_path / "m.gguf", "bf16").warnings
    config["max_position_embeddings"] = config["sliding_window"] * 8
    (folder / "config.json").write_text(json.dumps(config))
    (warning,) = plan_gguf_export(folder, tmp_path / "m.gguf", "bf16").warnings
    assert warning.startswith("sliding window") and f"up to {config['sliding_window']} tokens" in warning


def test_zero_shared_gate_of_an_older_merge_is_replaced(moes, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(moes["qwen2_moe"], folder)
    for file in folder.glob("*.safetensors"):
        tensors = load_file(file)
        for name in [n for n in tensors if n.endswith("shared_expert_gate.weight")]:
            tensors[name] = torch.zeros_like(tensors[name])
        save_file(tensors, file, metadata={"format": "pt"})
    plan = plan_gguf_export(folder, tmp_path / "m.gguf", "f16")
    assert any(w.startswith("shared expert gate") for w in plan.warnings)
    _reader, written = gguf_tensors(export(folder, tmp_path / "m.gguf", "f16").out_path)
    gate = written["blk.0.ffn_gate_inp_shexp.weight"][1]
    assert np.count_nonzero(gate) == 1 and np.abs(gate).max() < 1e-3


def test_not_a_moe_is_refused(llama_donors, tmp_path):
    plan = plan_gguf_export(llama_donors["base"], tmp_path / "m.gguf", "f16")
    assert [p.field for p in plan.problems] == ["architecture"]
    with pytest.raises(ProblemsError, match="Mixtral, Qwen2-MoE, Qwen3-MoE"):
        export(llama_donors["base"], tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_unknown_type_is_refused(moes, tmp_path):
    (problem,) = plan_gguf_export(moes["qwen3_moe"], tmp_path / "m.gguf", "q3_x").problems
    assert problem.field == "type" and "q8_0" in problem.hint


SPACE = "\u2581"


def write_sentencepiece_style_tokenizer(folder, size):
    """A Llama 2 / Mistral style tokenizer.json: BPE with byte fallback on "▁"-escaped text, bytes in the vocab."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials + byte_tokens, show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    data = json.loads(tokenizer.to_str())
    # Byte tokens are ordinary vocabulary entries in such files, not added tokens.
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in specials]
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return Tokenizer.from_str(json.dumps(data))


@pytest.fixture(scope="module")
def spm_mixtral(moes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm") / "mixtral"
    shutil.copytree(moes["mixtral"], folder)
    rows = json.loads((folder / "config.json").read_text())["vocab_size"]
    write_sentencepiece_style_tokenizer(folder, rows)
    return folder


def spm_encode(text, tokens, scores, types, add_space_prefix):
    """llama.cpp's SentencePiece algorithm, from the GGUF alone: merge the best-scored neighbouring pair, leftmost
    first, while the joined text is a token; what no token covers falls back to byte tokens."""
    text = (SPACE if add_space_prefix else "") + text.replace(" ", SPACE)
    index = {t: i for i, t in enumerate(tokens) if types[i] in (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED)}
    symbols = list(text)
    while True:
        candidates = [
            (-scores[index[symbols[i] + symbols[i + 1]]], i)
            for i in range(len(symbols) - 1)
            if symbols[i] + symbols[i + 1] in index
        ]
        if not candidates:
            break
        _score, i = min(candidates)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for symbol in symbols:
        ids += [index[symbol]] if symbol in index else [tokens.index(f"<0x{b:02X}>") for b in symbol.encode()]
    return ids


def test_sentencepiece_style_vocabulary_encodes_like_the_models_tokenizer(spm_mixtral, tmp_path):
    reader = gguf.GGUFReader(export(spm_mixtral, tmp_path / "m.gguf", "f16").out_path)
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.add_space_prefix") is True
    tokens = field(reader, "tokenizer.ggml.tokens")
    scores = field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    assert all(types[tokens.index(f"<0x{b:02X}>")] == gguf.TokenType.BYTE for b in range(256))
    assert types[tokens.index("<s>")] == gguf.TokenType.CONTROL
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokens.index("<s>")
    original = Tokenizer.from_file(str(spm_mixtral / "tokenizer.json"))
    for text in [*TEXTS[:4], "zebra quokka ünïcödé"]:
        want = original.encode(text, add_special_tokens=False).ids
        assert spm_encode(text, tokens, scores, types, add_space_prefix=True) == want, text


def test_incomplete_or_unreadable_folder_is_a_problem_not_a_crash(moes, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(moes["qwen3_moe"], folder)
    for file in folder.glob("*.safetensors"):
        tensors = load_file(file)
        tensors.pop("model.layers.1.mlp.experts.2.up_proj.weight", None)
        save_file(tensors, file, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].pop("model.layers.1.mlp.experts.2.up_proj.weight", None)
        index.write_text(json.dumps(data))
    (problem,) = plan_gguf_export(folder, tmp_path / "m.gguf", "f16").problems
    assert problem.field == "tensors" and "model.layers.1.mlp.experts.2.up_proj.weight" in problem.message
    (problem,) = plan_gguf_export(tmp_path / "nowhere", tmp_path / "m.gguf", "f16").problems
    assert problem.field == "model" and "config.json" in problem.message
