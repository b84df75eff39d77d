"""Running a dense base model layer by layer, straight from its checkpoint, to read what its routers would see.

`NativeDecoder` is the Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) written out in a few torch
operations, with the same numerics as transformers' modelling code: RMSNorm in float32, RoPE tables in
float32, grouped-query attention through scaled_dot_product_attention. It needs neither transformers'
config classes nor a model skeleton, whose imports take longer than the forward pass itself on a
16-layer model. `TransformersDecoder` runs transformers' own model (on a meta-device skeleton, layer
weights streamed in by hooks) for anything the native one does not cover, such as YaRN RoPE.

Both call back into a `LayerObserver` around every layer's MLP, so that the caller can capture its
input and, for calibration, replace its output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from app.core.families import FAMILIES, config_value, require_sizes, rope_settings, sliding_window
from app.core.imports import TRANSFORMERS_IMPORT_LOCK
from app.core.merge.architectures import attention_layer_types
from app.core.problems import FrankenMoEError
from app.core.sources import ModelSource

if TYPE_CHECKING:
    import torch

NATIVE_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")
LAYER_WEIGHTS = tuple(
    f"{name}.weight"
    for name in (
        "input_layernorm",
        "post_attention_layernorm",
        *(f"self_attn.{projection}_proj" for projection in "qkvo"),
        *(f"mlp.{projection}_proj" for projection in ("gate", "up", "down")),
    )
)


class LayerObserver(Protocol):
    def layer_started(self, layer: int) -> None: ...

    def mlp_input(self, layer: int, hidden: torch.Tensor) -> None: ...

    def mlp_output(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """A replacement for the MLP's output, or None to run the MLP."""
        ...

    def layer_finished(self, layer: int) -> None: ...


class Decoder(Protocol):
    num_layers: int

    def run(self, ids: torch.Tensor, mask: torch.Tensor, observer: LayerObserver) -> None: ...

    def unload(self, layer: int) -> None: ...

    def release(self) -> None: ...


def native_unsupported_reason(config: Mapping[str, Any], max_tokens: int) -> str | None:
    """Why the native decoder cannot run this model exactly as transformers would, or None if it can."""
    model_type = str(config.get("model_type"))
    if model_type not in FAMILIES:
        return f"model type {model_type!r} is not a Llama-family decoder"
    if config_value(config, "hidden_act") != "silu":
        return f"activation {config_value(config, 'hidden_act')!r}"
    rope = rope_settings(config)
    if rope["rope_type"] not in NATIVE_ROPE_TYPES:
        return f"RoPE type {rope['rope_type']!r}"
    if float(rope.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0) != 1.0:
        return "partial rotary embeddings"
    # Dynamic NTK scaling only changes the frequencies for sequences longer than the model's context.
    if rope["rope_type"] == "dynamic" and int(config.get("max_position_embeddings") or 0) < max_tokens:
        return "dynamic RoPE scaling on prompts longer than the context"
    return None


def rope_inverse_frequencies(config: Mapping[str, Any], head_dim: int) -> torch.Tensor:
    """RoPE's inverse frequencies as transformers computes them for the rope types NATIVE_ROPE_TYPES names."""
    import torch

    rope = rope_settings(config)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inverse = 1.0 / (float(rope["rope_theta"]) ** exponents)
    if rope["rope_type"] == "linear":
        return inverse / float(rope["factor"])
    if rope["rope_type"] == "llama3":
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        context = float(rope["original_max_position_embeddings"])
        wavelength = 2 * math.pi / inverse
        scaled = torch.where(wavelength > context / low, inverse / factor, inverse)
        smooth = (context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelength < context / high) * ~(wavelength > context / low)
        return torch.where(medium, smoothed, scaled)
    return inverse


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    import torch

    widened = hidden.float()
    widened = widened * torch.rsqrt(widened.pow(2).mean(-1, keepdim=True) + epsilon)
    return weight * widened.to(hidden.dtype)


def _project(weights: dict[str, torch.Tensor], name: str, hidden: torch.Tensor) -> torch.Tensor:
    """A linear layer from the checkpoint, with its bias where the checkpoint has one (Qwen2's q/k/v)."""
    from torch.nn.functional import linear

    return linear(hidden, weights[f"{name}.weight"], weights.get(f"{name}.bias"))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    import torch

    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class NativeDecoder:
    """A Llama-family decoder run from checkpoint tensors, one layer's weights in memory at a time."""

    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype, max_tokens: int) -> None:
        import torch

        reason = native_unsupported_reason(source.config, max_tokens)
        if reason is not None:
            raise ValueError(f"the native decoder does not run {source.ref}: {reason}")
        config = source.config
        self.source = source
        self.device = device
        self.dtype = dtype
        self.num_layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.kv_heads = int(config_value(config, "num_key_value_heads"))
        self.head_dim = int(config_value(config, "head_dim"))
        self.epsilon = float(config_value(config, "rms_norm_eps"))
        window = sliding_window(config)
        self.windows = [
            int(window) if kind == "sliding_attention" and window else None
            for kind in attention_layer_types(config)
        ]
        self.inverse_frequencies = rope_inverse_frequencies(config, self.head_dim).to(device)
        # Rows are looked up in the checkpoint's dtype and only those are widened: the same values as
        # converting the whole table first, without a float32 copy of a 100k-token vocabulary.
        self.embeddings = source.read_tensor("model.embed_tokens.weight").to(device)
        self._layers: dict[int, dict[str, torch.Tensor]] = {}
        self._spare: dict[str, torch.Tensor] = {}
        layer_tensors = [name for name in source.tensor_names if name.startswith("model.layers.")]
        self._staging = torch.empty(max(source.tensor_info(name).nbytes for name in layer_tensors), dtype=torch.uint8)

    def _weights(self, layer: int) -> dict[str, torch.Tensor]:
        import torch

        if layer in self._layers:
            return self._layers[layer]
        prefix = f"model.layers.{layer}."
        # Layers share their shapes, so the last unloaded layer's tensors take this one's values.
        spare, self._spare = self._spare, {}
        weights = {}
        for name in self.source.tensor_names:
            if not name.startswith(prefix):
                continue
            key = name[len(prefix) :]
            target = spare.get(key)
            if target is None or tuple(target.shape) != self.source.tensor_info(name).shape:
                target = torch.empty(self.source.tensor_info(name).shape, dtype=self.dtype, device=self.device)
            weights[key] = self.source.read_tensor_into(name, target, self._staging)
        for needed in LAYER_WEIGHTS:
            if needed not in weights:
                raise FrankenMoEError(
                    f"{self.source.ref} lacks {prefix}{needed}", "the checkpoint is incomplete; download it again"
                )
        self._layers[layer] = weights
        return weights

    def unload(self, layer: int) -> None:
        self._spare = self._layers.pop(layer, None) or self._spare

    def release(self) -> None:
        self._layers.clear()
        self._spare = {}

    def run(self, ids: torch.Tensor, mask: torch.Tensor, observer: LayerObserver) -> None:
        """One forward pass over right-padded prompts; padded positions are computed but never read."""
        import torch

        hidden = self.embeddings[ids.to(self.device)].to(self.dtype)
        width = ids.shape[1]
        positions = torch.arange(width, device=self.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inverse_frequencies.float())
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        last = self.num_layers - 1
        for layer in range(self.num_layers):
            observer.layer_started(layer)
            weights = self._weights(layer)
            normed = _rms_norm(hidden, weights["input_layernorm.weight"], self.epsilon)
            hidden = hidden + self._attention(weights, normed, cos, sin, self.windows[layer])
            normed = _rms_norm(hidden, weights["post_attention_layernorm.weight"], self.epsilon)
            observer.mlp_input(layer, normed)
            replaced = observer.mlp_output(layer, normed)
            if replaced is not None:
                hidden = hidden + replaced.to(hidden.dtype)
            elif layer < last:  # nothing reads the last layer's output
                hidden = hidden + self._mlp(weights, normed)
            observer.layer_finished(layer)

    def _attention(
        self,
        weights: dict[str, torch.Tensor],
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        window: int | None,
    ) -> torch.Tensor:
        import torch
        from torch.nn.functional import scaled_dot_product_attention

        batch, width, _ = hidden.shape

        def project(name: str, heads: int) -> torch.Tensor:
            states = _project(weights, f"self_attn.{name}_proj", hidden).view(batch, width, heads, self.head_dim)
            norm = weights.get(f"self_attn.{name}_norm.weight")
            if norm is not None:  # Qwen3 normalises each head's queries and keys before RoPE
                states = _rms_norm(states, norm, self.epsilon)
            return states.transpose(1, 2)

        query, key, value = project("q", self.heads), project("k", self.kv_heads), project("v", self.kv_heads)
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        repeats = self.heads // self.kv_heads
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        if window is not None and window < width:
            rows = torch.arange(width, device=hidden.device)
            offsets = rows[:, None] - rows[None, :]
            allowed = (offsets >= 0) & (offsets < window)
            attended = scaled_dot_product_attention(query, key, value, attn_mask=allowed)
        else:
            # Right padding: every real token's causal past is real, so no padding mask is needed.
            attended = scaled_dot_product_attention(query, key, value, is_causal=True)
        attended = attended.transpose(1, 2).reshape(batch, width, self.heads * self.head_dim)
        return _project(weights, "self_attn.o_proj", attended)

    @staticmethod
    def _mlp(weights: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        from torch.nn.functional import silu

        gate, up = _project(weights, "mlp.gate_proj", hidden), _project(weights, "mlp.up_proj", hidden)
        return _project(weights, "mlp.down_proj", silu(gate) * up)


class TransformersDecoder:
    """transformers' own model on a meta-device skeleton, layer weights streamed in and out by hooks."""

    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype) -> None:
        import torch
        self.source = source
        self.device = device
        self.dtype = dtype
        # Both calls import the model's modules lazily, hence the lock around them too.
        with TRANSFORMERS_IMPORT_LOCK:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        self.body = skeleton.model
        self.body.eval()
        self.num_layers = len(self.body.layers)
        self._materialise(self.body.embed_tokens, "model.embed_tokens.")
        self._materialise(self.body.norm, "model.norm.")
        rotary = self.body.rotary_emb
        self.body.rotary_emb = type(rotary)(config=self.body.config).to(device)
        self._loaded: set[int] = set()
        self._observer: LayerObserver | None = None
        for index, layer in enumerate(self.body.layers):
            layer.register_forward_pre_hook(self._start_hook(index))
            layer.register_forward_hook(self._finish_hook(index))
            layer.mlp.register_forward_pre_hook(self._capture_hook(index))
            layer.mlp.register_forward_hook(self._override_hook(index))

    def _materialise(self, module: torch.nn.Module, prefix: str) -> None:
        state = {
            name[len(prefix) :]: self.source.read_tensor(name).to(self.device, self.dtype)
            for name in self.source.tensor_names
            if name.startswith(prefix)
        }
        missing, _unexpected = module.load_state_dict(state, strict=False, assign=True)
        if missing:
            raise FrankenMoEError(
                f"{self.source.ref} lacks {prefix}{missing[0]}", "the checkpoint is incomplete; download it again"
            )

    def _start_hook(self, index: int) -> Callable[..., None]:
        def start(module: torch.nn.Module, _args: object) -> None:
            assert self._observer is not None
            self._observer.layer_started(index)
            if index not in self._loaded:
                self._materialise(module, f"model.layers.{index}.")
                self._loaded.add(index)

        return start

    def _finish_hook(self, index: int) -> Callable[..., None]:
        def finish(_module: torch.nn.Module, _args: object, _output: object) -> None:
            assert self._observer is not None
            self._observer.layer_finished(index)

        return finish

    def _capture_hook(self, index: int) -> Callable[..., None]:
        def capture(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            assert self._observer is not None
            self._observer.mlp_input(index, args[0])

        return capture

    def _override_hook(self, index: int) -> Callable[..., torch.Tensor | None]:
        def override(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> Any:
            assert self._observer is not None
            return self._observer.mlp_output(index, args[0])

        return override

    def unload(self, layer: int) -> None:
        if layer in self._loaded:
            self.body.layers[layer].to("meta")
            self._loaded.discard(layer)

    def release(self) -> None:
        for layer in list(self._loaded):
            self.unload(layer)

    def run(self, ids: torch.Tensor, mask: torch.Tensor, observer: LayerObserver) -> None:
        self._observer = observer
        try:
            self.body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        finally:
            self._observer = None


def open_decoder(source: ModelSource, device: torch.device, dtype: torch.dtype, max_tokens: int) -> Decoder:
    """The native decoder where it runs the model exactly, transformers' otherwise."""
    require_sizes(source.config, source.ref)
    if native_unsupported_reason(source.config, max_tokens) is None:
        return NativeDecoder(source, device, dtype, max_tokens)
    return TransformersDecoder(source, device, dtype)
