"""Export a merged MoE (Mixtral, Qwen2-MoE, Qwen3-MoE) to one GGUF file that llama.cpp loads.

Names, shapes and hyper-parameters follow llama.cpp's converter and loader: Mixtral becomes llama.cpp's
"llama" architecture with experts (q/k rows reordered for its interleaved RoPE), Qwen2-MoE "qwen2moe" and
Qwen3-MoE "qwen3moe" (rotate-half RoPE, rows as they are). Experts of a layer are stacked into
ffn_{gate,up,down}_exps. Tensor infos are written first from the safetensors headers, then the data one
output tensor at a time, so memory holds about one layer's experts. The file is written beside OUT under a
temporary name and renamed at the end; a cancel or an error leaves nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.export.quantizer import QUANTIZER_BITS, QUANTIZER_TYPES, run_quantizer
from app.core.families import config_value, rope_settings, sliding_window
from app.core.problems import FrankenMoEError, Problem, Severity, raise_if_errors
from app.core.progress import Job, Progress, check_cancel

if TYPE_CHECKING:
    import numpy as np
    import torch

    from app.core.export.vocab import GgufVocab
    from app.core.sources import ModelSource

IN_PROCESS_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q5_1")
COMPATIBLE_APPS = (
    "GGUF files open in llama.cpp (llama-cli, llama-server), LM Studio, Ollama (through a Modelfile), GPT4All, "
    "KoboldCpp, Jan and other llama.cpp-based apps, provided their llama.cpp is recent enough for the architecture "
    "(Mixtral: any; Qwen2-MoE: 2024 or later; Qwen3-MoE: April 2025 or later)."
)
# llama.cpp's architecture name for each transformers model_type the merge writes.
GGUF_ARCHITECTURES = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
# Block size of the quantised types: rows must be a multiple of it (else the tensor stays f16, as in llama.cpp).
_BLOCK = 32
_PARTIAL_SUFFIX = ".partial"
# GGML types numpy holds as they are; the others are written as bytes.
_FLOAT_DTYPES = {"F32": "float32", "F16": "float16"}
# Room for the header and vocabulary beyond the tensor data, in the size estimate.
_METADATA_SLACK = 1 << 20


@dataclass(frozen=True)
class GgufPlan:
    model_dir: Path
    out_path: Path
    out_type: str
    architecture: str
    estimated_bytes: int
    free_bytes: int
    warnings: tuple[str, ...]
    problems: tuple[Problem, ...]


@dataclass(frozen=True)
class GgufResult:
    out_path: Path
    bytes: int
    tensor_count: int
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class OutputTensor:
    """One GGUF tensor: its name, the safetensors tensors it is made of (stacked when several), its type."""

    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]  # numpy order, as written
    qtype: str  # a gguf.GGMLQuantizationType name
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


# --------------------------------------------------------------------------- the layout


def _permute_for_interleaved_rope(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """HF Llama rotates the two halves of each head; llama.cpp's "llama" rotates neighbouring pairs: reorder rows."""

    def permute(weight: torch.Tensor) -> torch.Tensor:
        half = weight.shape[0] // heads // 2
        return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)

    return permute


def _squeeze(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1)


def _layer_names(model_type: str, layer: int, experts: int) -> dict[str, tuple[str, ...]]:
    """GGUF tensor name (within blk.N) -> the HF tensors it is made of."""
    hf = f"model.layers.{layer}"
    names = {
        "attn_norm.weight": (f"{hf}.input_layernorm.weight",),
        "ffn_norm.weight": (f"{hf}.post_attention_layernorm.weight",),
        "attn_q.weight": (f"{hf}.self_attn.q_proj.weight",),
        "attn_k.weight": (f"{hf}.self_attn.k_proj.weight",),
        "attn_v.weight": (f"{hf}.self_attn.v_proj.weight",),
        "attn_output.weight": (f"{hf}.self_attn.o_proj.weight",),
        "attn_q.bias": (f"{hf}.self_attn.q_proj.bias",),
        "attn_k.bias": (f"{hf}.self_attn.k_proj.bias",),
        "attn_v.bias": (f"{hf}.self_attn.v_proj.bias",),
        "attn_q_norm.weight": (f"{hf}.self_attn.q_norm.weight",),
        "attn_k_norm.weight": (f"{hf}.self_attn.k_norm.weight",),
    }
    if model_type == "mixtral":
        moe, slots = f"{hf}.block_sparse_moe", {"gate": "w1", "down": "w2", "up": "w3"}
        names["ffn_gate_inp.weight"] = (f"{moe}.gate.weight",)
        for projection, slot in slots.items():
            names[f"ffn_{projection}_exps.weight"] = tuple(f"{moe}.experts.{e}.{slot}.weight" for e in range(experts))
        return names
    mlp = f"{hf}.mlp"
    names["ffn_gate_inp.weight"] = (f"{mlp}.gate.weight",)
    for projection in ("gate", "up", "down"):
        names[f"ffn_{projection}_exps.weight"] = tuple(
            f"{mlp}.experts.{e}.{projection}_proj.weight" for e in range(experts)
        )
        names[f"ffn_{projection}_shexp.weight"] = (f"{mlp}.shared_expert.{projection}_proj.weight",)
    names["ffn_gate_inp_shexp.weight"] = (f"{mlp}.shared_expert_gate.weight",)
    return names


def _tensor_type(name: str, shape: tuple[int, ...], out_type: str) -> str:
    """The GGML type of one tensor: llama.cpp keeps 1-D tensors (norms, biases) and routers in f32."""
    if len(shape) <= 1 or name.endswith("ffn_gate_inp.weight"):
        return "F32"
    if out_type in ("f32", "f16", "bf16"):
        return out_type.upper()
    if shape[-1] % _BLOCK:
        return "F16"
    return out_type.upper()


@dataclass
class _Layout:
    arch: str
    config: dict[str, Any]
    tensors: list[OutputTensor]
    unmapped: list[str]
    missing: list[str]
    shared_gates: list[str]


def _layout(source: ModelSource, config: dict[str, Any], out_type: str) -> _Layout:
    model_type = str(config.get("model_type"))
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    heads = int(config["num_attention_heads"])
    kv_heads = int(config_value(config, "num_key_value_heads"))
    layers = int(config["num_hidden_layers"])
    names: list[tuple[str, tuple[str, ...]]] = [("token_embd.weight", ("model.embed_tokens.weight",))]
    for layer in range(layers):
        for gguf_name, hf_names in _layer_names(model_type, layer, experts).items():
            names.append((f"blk.{layer}.{gguf_name}", hf_names))
    names.append(("output_norm.weight", ("model.norm.weight",)))
    # Qwen2-MoE in llama.cpp has no tied-embedding fallback: it always reads an output matrix.
    tied = not source.has_tensor("lm_head.weight")
    if not tied:
        names.append(("output.weight", ("lm_head.weight",)))
    elif model_type == "qwen2_moe":
        names.append(("output.weight", ("model.embed_tokens.weight",)))
    used: set[str] = set()
    tensors = []
    missing = []
    for gguf_name, hf_names in names:
        present = [source.has_tensor(n) for n in hf_names]
        if not all(present):
            used.update(n for n, here in zip(hf_names, present, strict=True) if here)
            if any(present) or _required(gguf_name, model_type):
                missing += [n for n, here in zip(hf_names, present, strict=True) if not here]
            continue
        used.update(hf_names)
        first = tuple(source.tensor_info(hf_names[0]).shape)
        shape = (len(hf_names), *first) if gguf_name.endswith("_exps.weight") else first
        transform = None
        if model_type == "mixtral" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            transform = _permute_for_interleaved_rope(heads if "attn_q" in gguf_name else kv_heads)
        if gguf_name.endswith("ffn_gate_inp_shexp.weight"):
            shape, transform = (math.prod(shape),), _squeeze
        tensors.append(OutputTensor(gguf_name, hf_names, shape, _tensor_type(gguf_name, shape, out_type), transform))
    ignored = ("rotary_emb.inv_freq",)
    unmapped = [n for n in source.tensor_names if n not in used and not n.endswith(ignored)]
    shared_gates = [t.sources[0] for t in tensors if t.name.endswith("ffn_gate_inp_shexp.weight")]
    return _Layout(GGUF_ARCHITECTURES[model_type], config, tensors, unmapped, missing, shared_gates)


def _required(gguf_name: str, model_type: str) -> bool:
    """Whether llama.cpp's loader needs this tensor: biases are optional, q/k norms Qwen3-MoE's, shared experts
    Qwen2-MoE's."""
    if gguf_name.endswith(".bias"):
        return False
    if gguf_name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")):
        return model_type == "qwen3_moe"
    if "shexp" in gguf_name:
        return model_type == "qwen2_moe"
    return True


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return math.prod(shape) // block * type_size


# --------------------------------------------------------------------------- checks


def _fidelity(config: dict[str, Any], layout: _Layout | None) -> tuple[list[str], list[Problem]]:
    """What llama.cpp computes differently from transformers for this config: warnings, or refusals."""
    warnings: list[str] = []
    problems: list[Problem] = []
    model_type = str(config.get("model_type"))
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    top_k = int(config.get("num_experts_per_tok") or 0)
    act = str(config_value(config, "hidden_act") or "silu")
    if act != "silu":
        problems.append(Problem("hidden_act", f"the MLPs use {act!r}; llama.cpp's MoE models use silu", "none"))
    if model_type == "qwen2_moe" and config.get("norm_topk_prob") and top_k < experts:
        # llama.cpp's qwen2moe graph passes norm_w = false to its MoE block, and no GGUF key changes that.
        warnings.append(
            f"norm_topk_prob: llama.cpp's Qwen2-MoE does not renormalise the top-{top_k} routing weights to sum to 1, "
            "while this model's config asks for it (and transformers does it); no GGUF key changes that, so in "
            "llama.cpp the routed experts' output is scaled by the share of the router's probability that the "
            f"chosen {top_k} of {experts} experts hold: the output differs. For the same output, merge as Mixtral "
            "(no shared expert) or with experts_per_token equal to the number of experts"
        )
    if model_type == "qwen3_moe" and not config.get("norm_topk_prob", True) and top_k < experts:
        warnings.append(
            "norm_topk_prob is false, but llama.cpp's Qwen3-MoE always renormalises the top-k routing weights: "
            "the output differs"
        )
    # Qwen MoE configs name a window they only use when use_sliding_window is on.
    window = sliding_window(config) if model_type == "mixtral" or config.get("use_sliding_window") else None
    context = int(config_value(config, "max_position_embeddings") or 0)
    if window and int(window) < context:
        warnings.append(
            f"sliding window: transformers attends over the last {window} tokens only, llama.cpp's "
            f"{GGUF_ARCHITECTURES.get(model_type, model_type)} attends over the whole context: the two agree on "
            f"prompts up to {window} tokens and differ beyond"
        )
    rope = rope_settings(config)
    # Llama 3's scaling is a rope_freqs tensor, which only llama.cpp's "llama" reads.
    readable = ("default", "linear", "yarn", "llama3") if model_type == "mixtral" else ("default", "linear", "yarn")
    if rope.get("rope_type", "default") not in readable:
        problems.append(
            Problem(
                "rope_scaling",
                f"RoPE scaling {rope['rope_type']!r} is not one llama.cpp reads for this architecture",
                "export a model without that RoPE scaling",
            )
        )
    if layout is not None and layout.unmapped:
        shown = ", ".join(layout.unmapped[:3]) + (" …" if len(layout.unmapped) > 3 else "")
        problems.append(
            Problem(
                "tensors",
                f"llama.cpp's {layout.arch} has no place for {len(layout.unmapped)} tensor(s) of this model ({shown})",
                "export a model the app merged (attention output biases are not supported by llama.cpp's Qwen3-MoE)",
            )
        )
    return warnings, problems


def _zero_shared_gates(source: ModelSource, names: list[str]) -> bool:
    from app.core.merge.always_on import is_zero_gate

    return any(is_zero_gate(source.read_tensor(name)) for name in names)


def _zero_gate_warning() -> str:
    return (
        "shared expert gate: this model (merged before the fix) has an exactly zero always-on shared-expert gate, "
        "which llama.cpp computes as 0/0; the GGUF gets the as-good-as-zero gate newer merges write instead "
        "(same output in transformers)"
    )


def _estimate(layout: _Layout, out_type: str, tokenizer_bytes: int) -> int:
    if out_type in QUANTIZER_TYPES:
        source_bytes = sum(_nbytes(t.shape, "F16") for t in layout.tensors)
        return int(source_bytes * QUANTIZER_BITS[out_type] / 16) + tokenizer_bytes + _METADATA_SLACK
    return sum(_nbytes(t.shape, t.qtype) for t in layout.tensors) + tokenizer_bytes + _METADATA_SLACK


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FrankenMoEError(f"{model_dir} has no config.json", "choose a merged model folder") from exc
    except (OSError, ValueError) as exc:
        raise FrankenMoEError(f"cannot read {path}: {exc}", "choose a complete merged model folder") from exc


def _intermediate_type(config: dict[str, Any]) -> str:
    """What llama-quantize reads: the model's own precision, so that nothing is lost before quantising."""
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float16")
    return {"float32": "f32", "bfloat16": "bf16"}.get(dtype, "f16")


def _inspect_model(model_dir: Path, out_type: str) -> tuple[str, int, list[str], list[Problem]]:
    """(llama.cpp architecture, estimated file size, warnings, problems) of the model folder."""
    from app.core.sources import ModelSource

    config = _read_config(model_dir)
    model_type = str(config.get("model_type"))
    if model_type not in GGUF_ARCHITECTURES:
        problem = Problem(
            "architecture",
            f"{model_dir.name} is a {model_type!r} model; the GGUF export takes the MoEs the app builds "
            "(Mixtral, Qwen2-MoE, Qwen3-MoE)",
            "choose a folder the merge wrote",
        )
        return "", 0, [], [problem]
    with ModelSource(model_dir) as source:
        layout = _layout(source, config, out_type if out_type in IN_PROCESS_TYPES else "f16")
        warnings, problems = _fidelity(config, layout)
        if layout.missing:
            shown = ", ".join(layout.missing[:3]) + (" …" if len(layout.missing) > 3 else "")
            problems.append(
                Problem(
                    "tensors",
                    f"{len(layout.missing)} tensor(s) llama.cpp needs are missing from {model_dir.name} ({shown})",
                    "export a complete merged folder (merge it again if it was cut short)",
                )
            )
        if layout.shared_gates and _zero_shared_gates(source, layout.shared_gates):
            warnings.append(_zero_gate_warning())
    kept = sum(1 for t in layout.tensors if out_type.startswith("q") and t.qtype == "F16")
    if kept and out_type in IN_PROCESS_TYPES:
        warnings.append(f"{kept} tensor(s) with rows not a multiple of {_BLOCK} are kept in f16")
    tokenizer_bytes = sum(p.stat().st_size for p in model_dir.glob("tokenizer*") if p.is_file())
    if not tokenizer_bytes:
        problems.append(Problem("tokenizer", f"{model_dir} has no tokenizer", "export a complete merged folder"))
    return GGUF_ARCHITECTURES[model_type], _estimate(layout, out_type, tokenizer_bytes), warnings, problems


def plan_gguf_export(
    model_dir: Path, out_path: Path, out_type: str, *, quantizer: Path | None = None
) -> GgufPlan:
    """Everything checked before writing: architecture, fidelity, type, quantizer, target, disk space.

    Reads the config, the safetensors headers and the (tiny) shared-expert gates only. An existing out_path is
    a warning (field "overwrite"): export_gguf refuses it unless overwrite=True.
    """
    model_dir, out_path = Path(model_dir).expanduser(), Path(out_path).expanduser()
    out_type = out_type.lower()
    problems: list[Problem] = []
    warnings: list[str] = []
    architecture, estimated = "", 0
    if out_type not in IN_PROCESS_TYPES + QUANTIZER_TYPES:
        problems.append(
            Problem(
                "type",
                f"unknown GGUF type {out_type!r}",
                f"use one of {', '.join(IN_PROCESS_TYPES)}, or with llama-quantize {', '.join(QUANTIZER_TYPES)}",
            )
        )
    elif out_type in QUANTIZER_TYPES and (quantizer is None or not Path(quantizer).is_file()):
        problems.append(
            Problem(
                "quantizer",
                f"{out_type} is a K-quant, which only llama.cpp's llama-quantize writes, and none was found"
                + (f" at {quantizer}" if quantizer is not None else " on PATH"),
                "build llama.cpp (it makes llama-quantize) and pass --quantize-with PATH (or set it in Settings), "
                "or choose an in-process type: " + ", ".join(IN_PROCESS_TYPES),
            )
        )
    try:
        architecture, estimated, found, refusals = _inspect_model(model_dir, out_type)
    except FrankenMoEError as exc:
        architecture, estimated, found, refusals = "", 0, [], [Problem("model", exc.message, exc.hint)]
    warnings += found
    problems += refusals
    if out_path.exists() and out_path.is_dir():
        problems.append(Problem("out_path", f"{out_path} is a folder", "name a .gguf file"))
    elif out_path.exists():
        # A warning: the export refuses it unless told to overwrite, which a dialog may ask the user.
        problems.append(
            Problem(
                "overwrite",
                f"{out_path} already exists",
                "choose another file name, or overwrite it (--overwrite)",
                Severity.WARNING,
            )
        )
    target_dir = out_path.parent if out_path.parent.exists() else _existing_parent(out_path)
    free = shutil.disk_usage(target_dir).free
    # A K-quant needs the intermediate file (the model's own precision) beside the result while it runs.
    needed = estimated + (_estimate_intermediate(model_dir) if out_type in QUANTIZER_TYPES else 0)
    if needed > free:
        from app.core.progress import format_bytes

        problems.append(
            Problem(
                "out_path",
                f"the export needs about {format_bytes(needed)} and {target_dir} has {format_bytes(free)} free",
                "free some disk space or write the GGUF to another disk",
            )
        )
    return GgufPlan(model_dir, out_path, out_type, architecture, estimated, free, tuple(warnings), tuple(problems))


def _estimate_intermediate(model_dir: Path) -> int:
    """The intermediate file llama-quantize reads is in the model's own precision: about its safetensors' size."""
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def _existing_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path.cwd()


# --------------------------------------------------------------------------- writing


def _add_metadata(writer: Any, config: dict[str, Any], vocab: GgufVocab, name: str, file_type: int) -> None:
    import gguf

    model_type = str(config["model_type"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config_value(config, "head_dim"))
    experts = int(config.get("num_local_experts") or config.get("num_experts"))
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(config_value(config, "max_position_embeddings")))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config_value(config, "num_key_value_heads")))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config_value(config, "rms_norm_eps")))
    writer.add_expert_count(experts)
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    writer.add_vocab_size(len(vocab.tokens))
    if model_type in ("qwen2_moe", "qwen3_moe"):
        writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    if model_type == "qwen2_moe":
        writer.add_expert_shared_feed_forward_length(int(config["shared_expert_intermediate_size"]))
    rope = rope_settings(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    rope_type = rope.get("rope_type", "default")
    if rope_type in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_type))
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if "original_max_position_embeddings" in rope:
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    vocab.special.add_to_gguf(writer, quiet=True)


def _llama3_rope_factors(config: dict[str, Any]) -> torch.Tensor | None:
    """llama.cpp's rope_freqs tensor for Llama 3 RoPE scaling: a factor per frequency, as its converter computes."""
    import torch

    rope = rope_settings(config)
    if rope.get("rope_type") != "llama3":
        return None
    dim = int(config_value(config, "head_dim"))
    freqs = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings", 8192))
    wavelengths = 2 * math.pi / freqs
    smooth = (original / wavelengths - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelengths < original / high, torch.ones_like(freqs), blended)
    return torch.where(wavelengths > original / low, torch.full_like(freqs, factor), factors)


def _encode(tensor: torch.Tensor, qtype: str) -> np.ndarray:
    """The tensor's bytes in the GGML type: casts by torch, quantisation by the gguf package."""
    import gguf
    import torch

    if qtype == "F32":
        return tensor.float().numpy()
    if qtype == "F16":
        return tensor.to(torch.float16).numpy()
    if qtype == "BF16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view("uint8")
    return gguf.quants.quantize(tensor.float().numpy(), gguf.GGMLQuantizationType[qtype])


def _file_type(out_type: str) -> int:
    import gguf

    return int(gguf.LlamaFileType[{"f32": "ALL_F32", "f16": "MOSTLY_F16"}.get(out_type, f"MOSTLY_{out_type.upper()}")])


def _write_gguf(
    source: ModelSource,
    layout: _Layout,
    vocab: GgufVocab,
    target: Path,
    out_type: str,
    fix_zero_gates: bool,
    cancel: threading.Event | None,
) -> Iterator[Progress]:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(target, layout.arch)
    _add_metadata(writer, layout.config, vocab, source.path.name, _file_type(out_type))
    tensors = list(layout.tensors)
    factors = _llama3_rope_factors(layout.config)
    extra = [("rope_freqs.weight", factors)] if factors is not None else []
    for tensor in tensors:
        qtype = gguf.GGMLQuantizationType[tensor.qtype]
        if tensor.qtype in _FLOAT_DTYPES:
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(_FLOAT_DTYPES[tensor.qtype]),
                                   _nbytes(tensor.shape, tensor.qtype), raw_dtype=qtype)  # fmt: skip
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(tensor.shape, qtype)
            writer.add_tensor_info(tensor.name, byte_shape, np.dtype("uint8"), _nbytes(tensor.shape, tensor.qtype),
                                   raw_dtype=qtype)  # fmt: skip
    for name, value in extra:
        writer.add_tensor_info(name, tuple(value.shape), np.dtype("float32"), value.numel() * 4)
    total = sum(_nbytes(t.shape, t.qtype) for t in tensors)
    done_bytes = 0
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for index, tensor in enumerate(tensors):
            check_cancel(cancel)
            parts = [source.read_tensor(name) for name in tensor.sources]
            data = parts[0] if len(parts) == 1 else _stack(parts)
            del parts
            if tensor.transform is not None:
                data = tensor.transform(data)
            if fix_zero_gates and tensor.name.endswith("ffn_gate_inp_shexp.weight"):
                data = _always_on(source, tensor, data, layout.config)
            writer.write_tensor_data(_encode(data, tensor.qtype))
            del data
            done_bytes += _nbytes(tensor.shape, tensor.qtype)
            yield Progress("write", index + 1, len(tensors), done_bytes, total, message=tensor.name)
        for _name, value in extra:
            writer.write_tensor_data(value.numpy())
    finally:
        writer.close()


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    import torch

    return torch.stack(parts)


def _always_on(source: ModelSource, tensor: OutputTensor, data: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    from app.core.merge.always_on import always_on_gate, is_zero_gate

    if not is_zero_gate(data):
        return data
    layer = tensor.name.split(".")[1]
    norm = source.read_tensor(f"model.layers.{layer}.post_attention_layernorm.weight")
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return always_on_gate(norm, dtype).reshape(-1)


def export_gguf(
    model_dir: Path,
    out_path: Path,
    out_type: str,
    *,
    quantizer: Path | None = None,
    overwrite: bool = False,
    cancel: threading.Event | None = None,
) -> Job[GgufResult]:
    """Write model_dir as one GGUF file at out_path. Yields progress; returns a GgufResult.

    Raises ProblemsError (what plan_gguf_export found), FrankenMoEError or Cancelled; nothing is left at
    out_path (or beside it) unless the export completed.
    """
    from app.core.export.vocab import read_vocab
    from app.core.sources import ModelSource

    yield Progress("check", 0, 1, message="checking the model")
    plan = plan_gguf_export(model_dir, out_path, out_type, quantizer=quantizer)
    refused_overwrite = [
        Problem(p.field, p.message, p.hint) for p in plan.problems if p.field == "overwrite" and not overwrite
    ]
    raise_if_errors([*plan.problems, *refused_overwrite])
    out_path = plan.out_path.resolve()
    out_type = plan.out_type
    out_path.parent.mkdir(parents=True, exist_ok=True)
    warnings = list(plan.warnings)
    quantised = out_type in QUANTIZER_TYPES
    config = _read_config(plan.model_dir)
    first_type = _intermediate_type(config) if quantised else out_type
    partial = out_path.with_name(f".{out_path.name}{_PARTIAL_SUFFIX}")
    intermediate = out_path.with_name(f".{out_path.name}.{first_type}{_PARTIAL_SUFFIX}")
    try:
        with ModelSource(plan.model_dir) as source:
            layout = _layout(source, config, first_type)
            vocab = read_vocab(plan.model_dir, int(layout.tensors[0].shape[0]))
            warnings += vocab.warnings
            fix = any(_zero_gate_warning() == w for w in warnings)
            first_target = intermediate if quantised else partial
            yield from _write_gguf(source, layout, vocab, first_target, first_type, fix, cancel)
        if quantised:
            assert quantizer is not None
            yield from run_quantizer(Path(quantizer), intermediate, partial, out_type, cancel)
            intermediate.unlink()
        check_cancel(cancel)
        os.replace(partial, out_path)
    except OSError as exc:
        raise FrankenMoEError(f"writing {out_path} failed: {exc}", "check the disk (space, permissions)") from exc
    finally:
        partial.unlink(missing_ok=True)
        intermediate.unlink(missing_ok=True)
    size = out_path.stat().st_size
    yield Progress("done", 1, 1, size, size)
    return GgufResult(out_path, size, len(layout.tensors) + (1 if _llama3_rope_factors(config) is not None else 0),
                      tuple(warnings))  # fmt: skip
