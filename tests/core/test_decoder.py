"""The native decoder against transformers' own forward pass, family by family, RoPE by RoPE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.core.merge.decoder import Decoder, NativeDecoder, TransformersDecoder, native_unsupported_reason, open_decoder
from app.core.problems import FrankenMoEError
from app.core.prompt_tokens import MAX_PROMPT_TOKENS
from app.core.recipe import ModelRef
from app.core.sources import open_model
from tests.models import make_tiny_model

LONG_CONTEXT = {"max_position_embeddings": 2048}
CASES = {
    "llama": ("llama", {}),
    "llama-attention-and-mlp-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama3-rope": (
        "llama",
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "llama-dynamic-rope": ("llama", {**LONG_CONTEXT, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "mistral-window-shorter-than-the-prompts": ("mistral", {"sliding_window": 4}),
    "qwen2-sliding-upper-layers": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1, "num_hidden_layers": 3},
    ),
    "qwen3-head-dim-not-hidden-over-heads": ("qwen3", {"head_dim": 16}),
}
PROMPTS = [[1, 17, 45, 99, 230, 7, 8, 150, 61, 3], [1, 5, 6], [1, 200, 201, 202, 203, 204]]


class Recorder:
    """A LayerObserver that keeps every layer's MLP input."""

    def __init__(self) -> None:
        self.inputs: dict[int, torch.Tensor] = {}
        self.events: list[str] = []

    def layer_started(self, layer: int) -> None:
        self.events.append(f"start {layer}")

    def mlp_input(self, layer: int, hidden: torch.Tensor) -> None:
        self.inputs[layer] = hidden.float().clone()

    def mlp_output(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        return None

    def layer_finished(self, layer: int) -> None:
        self.events.append(f"finish {layer}")


def right_padded(prompts: list[list[int]], pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
        mask[row, : len(prompt)] = 1
    return ids, mask


def reference_mlp_inputs(folder: Path, prompt: list[int]) -> list[torch.Tensor]:
    """transformers' full model on one unpadded prompt, with a hook on every layer's MLP."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    captured: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda _m, args, index=index: captured.__setitem__(index, args[0][0]))
    with torch.no_grad():
        model(torch.tensor([prompt]))
    return [captured[index] for index in range(len(model.model.layers))]


def run_and_compare(decoder: Decoder, folder: Path) -> Recorder:
    """Run the prompts right-padded in one batch; each prompt's MLP inputs must be transformers' on it alone."""
    recorder = Recorder()
    ids, mask = right_padded(PROMPTS)
    with torch.inference_mode():
        decoder.run(ids, mask, recorder)
    for row, prompt in enumerate(PROMPTS):
        for layer, expected in enumerate(reference_mlp_inputs(folder, prompt)):
            torch.testing.assert_close(recorder.inputs[layer][row, : len(prompt)], expected, rtol=1e-4, atol=1e-5)
    return recorder


@pytest.fixture(scope="module", params=sorted(CASES))
def donor(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    family, overrides = CASES[request.param]
    overrides = dict(overrides)
    layers = overrides.pop("num_hidden_layers", 2)
    folder = tmp_path_factory.mktemp(request.param) / "model"
    return make_tiny_model(folder, family, seed=3, num_hidden_layers=layers, config_overrides=overrides)


def test_the_native_decoder_sees_what_transformers_sees(donor: Path) -> None:
    source = open_model(ModelRef.parse(str(donor)))
    assert native_unsupported_reason(source.config, MAX_PROMPT_TOKENS) is None
    decoder = open_decoder(source, torch.device("cpu"), torch.float32, MAX_PROMPT_TOKENS)
    assert isinstance(decoder, NativeDecoder)
    recorder = run_and_compare(decoder, donor)
    expected_events = [f"{event} {layer}" for layer in range(decoder.num_layers) for event in ("start", "finish")]
    assert recorder.events == expected_events


def test_a_rope_the_native_decoder_lacks_runs_through_transformers(tmp_path: Path) -> None:
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    folder = make_tiny_model(tmp_path / "yarn", "qwen3", seed=5, config_overrides={"rope_scaling": yarn})
    source = open_model(ModelRef.parse(str(folder)))
    assert "yarn" in (native_unsupported_reason(source.config, MAX_PROMPT_TOKENS) or "")
    decoder = open_decoder(source, torch.device("cpu"), torch.float32, MAX_PROMPT_TOKENS)
    assert isinstance(decoder, TransformersDecoder)
    run_and_compare(decoder, folder)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"model_type": "gemma"}, "not a Llama-family decoder"),
        ({"hidden_act": "gelu"}, "activation 'gelu'"),
        ({"rope_scaling": {"rope_type": "longrope"}}, "RoPE type 'longrope'"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 512}, "longer"),
    ],
)
def test_what_the_native_decoder_leaves_to_transformers(change: dict[str, object], reason: str) -> None:
    config = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, **change}
    assert reason in (native_unsupported_reason(config, MAX_PROMPT_TOKENS) or "")


def test_a_layer_missing_a_weight_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = make_tiny_model(tmp_path / "model", "llama", seed=1)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    decoder = NativeDecoder(open_model(ModelRef.parse(str(folder))), torch.device("cpu"), torch.float32, 64)
    ids, mask = right_padded(PROMPTS)
    with pytest.raises(FrankenMoEError, match=r"lacks model\.layers\.1\.post_attention_layernorm\.weight"):
        decoder.run(ids, mask, Recorder())
