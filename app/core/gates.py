"""Router gate initialisation: one vector per expert per layer, from prompts or at random.

`hidden` and `hidden_avg` read what the router will really see: the input of each layer's MLP
(after the post-attention norm) in the base model. mergekit-moe instead reads the residual stream
before the layer and, with left padding, averages pad positions into `hidden_avg`; here prompts
are right-padded and every reduction uses the attention mask, so padding never leaks in.

The base model is run layer by layer with weights streamed from disk (unless kept loaded for
repeated previews), so memory stays around one layer plus the prompts' activations.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from app.core.devices import available_memory, compute_dtype, resolve_device
from app.core.problems import FrankenMoEError
from app.core.progress import Cancelled, Job, Progress, check_cancel
from app.core.recipe import GATE_MODES, ModelRef, Recipe
from app.core.routing import PromptRouting, RoutingQuality, evaluate_routing
from app.core.sources import ModelSource, open_model

if TYPE_CHECKING:
    import torch

Reduction = Literal["last", "mean", "tokens"]

DEGENERATE_SIMILARITY = 0.95
MAX_PROMPT_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class LayerDiagnostics:
    layer: int
    similarity: tuple[tuple[float, ...], ...]  # cosine similarity, experts x experts
    condition_number: float
    degenerate_pairs: tuple[tuple[int, int], ...]

    @property
    def is_degenerate(self) -> bool:
        return bool(self.degenerate_pairs)


@dataclass(frozen=True, slots=True)
class GateResult:
    mode: str
    router: torch.Tensor  # layers x experts x hidden, float32, on the CPU
    diagnostics: tuple[LayerDiagnostics, ...]
    # For `calibrated`: seconds spent fitting, and each layer's accuracy on the prompts' tokens.
    fit_seconds: float | None = None
    train_accuracy: tuple[float, ...] = ()

    def degenerate_warnings(self, labels: Sequence[str]) -> list[str]:
        return describe_degenerate_layers(self.diagnostics, labels)


@dataclass(frozen=True, slots=True)
class RoutingPreview:
    routings: tuple[PromptRouting, ...]
    tokens: tuple[tuple[str, ...], ...]  # the text of each prompt's scored tokens
    quality: RoutingQuality


def layer_diagnostics(router: torch.Tensor, threshold: float = DEGENERATE_SIMILARITY) -> tuple[LayerDiagnostics, ...]:
    import torch

    results = []
    for layer, gates in enumerate(router.float()):
        unit = gates / gates.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        similarity = unit @ unit.T
        singular = torch.linalg.svdvals(gates)
        condition = float(singular.max() / singular.min()) if singular.min() > 0 else math.inf
        pairs = tuple(
            (i, j)
            for i in range(similarity.shape[0])
            for j in range(i + 1, similarity.shape[0])
            if similarity[i, j] >= threshold
        )
        results.append(
            LayerDiagnostics(
                layer=layer,
                similarity=tuple(tuple(round(float(v), 6) for v in row) for row in similarity),
                condition_number=condition,
                degenerate_pairs=pairs,
            )
        )
    return tuple(results)


def describe_degenerate_layers(diagnostics: Sequence[LayerDiagnostics], labels: Sequence[str]) -> list[str]:
    """Plain-language warnings, one per pair of experts, with their layers as ranges."""
    layers_by_pair: dict[tuple[int, int], list[int]] = {}
    for diag in diagnostics:
        for pair in diag.degenerate_pairs:
            layers_by_pair.setdefault(pair, []).append(diag.layer)
    warnings = []
    for (i, j), layers in sorted(layers_by_pair.items()):
        warnings.append(
            f"{labels[i]} and {labels[j]} look the same to the router in {_layer_ranges(layers)}: "
            "give them more distinct prompts"
        )
    return warnings


def _layer_ranges(layers: Sequence[int]) -> str:
    spans: list[list[int]] = []
    for layer in sorted(layers):
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
    return f"layer {text}" if len(layers) == 1 else f"layers {text}"


# --------------------------------------------------------------------------- tokenisation


def load_tokenizer(folder: Path) -> object:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise FrankenMoEError(
            f"cannot load the tokenizer of {folder} ({exc})",
            "use a base model folder that includes its tokenizer files",
        ) from exc


def encode_prompts(tokenizer: object, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids as mergekit-moe makes them: the BOS text prepended, no other special tokens."""
    bos = getattr(tokenizer, "bos_token", None) or ""
    encoded = []
    for prompt in prompts:
        ids = tokenizer(bos + prompt, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        encoded.append(list(ids[:MAX_PROMPT_TOKENS]))
    return encoded


# --------------------------------------------------------------------------- running the base model


@dataclass
class _Capture:
    reduction: Reduction
    mask: torch.Tensor | None = None
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)


class RouterInputProbe:
    """Runs a dense model and captures every layer's MLP input, streaming layer weights from disk."""

    def __init__(
        self,
        source: ModelSource,
        device: str,
        dtype: torch.dtype,
        keep_loaded: bool = False,
        memory_budget: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.source = source
        self.device = torch.device(device)
        self.dtype = dtype
        self.keep_loaded = keep_loaded
        self.memory_budget = memory_budget
        self.config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.config, trust_remote_code=False)
        self.body = skeleton.model
        self.body.eval()
        self.num_layers = len(self.body.layers)
        self._materialise(self.body.embed_tokens, "model.embed_tokens.")
        self._materialise(self.body.norm, "model.norm.")
        rotary = self.body.rotary_emb
        self.body.rotary_emb = type(rotary)(config=self.body.config).to(self.device)
        self._loaded: set[int] = set()
        self._capture: _Capture | None = None
        self._progress: Callable[[int], None] | None = None
        self._abort = threading.Event()
        for index, layer in enumerate(self.body.layers):
            layer.register_forward_pre_hook(self._make_load_hook(index))
            layer.register_forward_hook(self._make_unload_hook(index))
            layer.mlp.register_forward_pre_hook(self._make_capture_hook(index))

    def layer_bytes(self) -> int:
        prefix = "model.layers.0."
        return sum(self.source.tensor_info(n).nbytes for n in self.source.tensor_names if n.startswith(prefix))

    def _materialise(self, module: torch.nn.Module, prefix: str) -> None:
        state = {
            name[len(prefix) :]: self.source.read_tensor(name).to(self.device, self.dtype)
            for name in self.source.tensor_names
            if name.startswith(prefix)
        }
        missing, _unexpected = module.load_state_dict(state, strict=False, assign=True)
        if missing:
            raise FrankenMoEError(
                f"{self.source.ref} lacks {prefix}{missing[0]}",
                "the checkpoint is incomplete; download it again",
            )

    def _make_load_hook(self, index: int) -> Callable[..., None]:
        def load(module: torch.nn.Module, _args: object) -> None:
            if self._abort.is_set():
                raise Cancelled("cancelled")
            if index not in self._loaded:
                self._materialise(module, f"model.layers.{index}.")
                self._loaded.add(index)

        return load

    def _make_unload_hook(self, index: int) -> Callable[..., None]:
        def unload(module: torch.nn.Module, _args: object, _output: object) -> None:
            if not self.keep_loaded:
                module.to("meta")
                self._loaded.discard(index)
            if self._progress is not None:
                self._progress(index)

        return unload

    def _make_capture_hook(self, index: int) -> Callable[..., None]:
        def capture(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            state = self._capture
            if state is None or state.mask is None:
                return
            hidden = args[0].float()
            mask = state.mask.to(hidden.device, hidden.dtype)
            if state.reduction == "last":
                last = state.mask.sum(dim=1) - 1
                reduced = hidden[range(hidden.shape[0]), last.to(hidden.device)]
            elif state.reduction == "mean":
                reduced = (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
            else:
                reduced = hidden
            state.outputs[index] = reduced.cpu()

        return capture

    def plan_batches(self, lengths: Sequence[int], reduction: Reduction) -> list[list[int]]:
        """Group prompts, longest first, into batches whose activations fit in a share of free memory."""
        config = self.config
        element = self.dtype.itemsize
        hidden, intermediate = int(config.hidden_size), int(config.intermediate_size)
        heads = int(config.num_attention_heads)
        budget = self.memory_budget
        if budget is None:
            budget = max(available_memory(str(self.device)) // 4 - self.layer_bytes(), 64 * 2**20)

        def cost(batch: int, length: int) -> int:
            activations = batch * length * (6 * hidden + 3 * intermediate) * element
            attention = batch * heads * length * length * 4
            kept = batch * hidden * self.num_layers * 4 * (length if reduction == "tokens" else 1)
            return activations + attention + kept

        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        for index in order:
            if batches and cost(len(batches[-1]) + 1, lengths[batches[-1][0]]) <= budget:
                batches[-1].append(index)
            else:
                batches.append([index])
        return batches

    def collect(
        self,
        token_ids: Sequence[Sequence[int]],
        reduction: Reduction,
        cancel: threading.Event | None = None,
        stage: str = "running the base model",
    ) -> Job[list[torch.Tensor]]:
        """Per prompt: layers x hidden ("last", "mean") or layers x tokens x hidden ("tokens")."""
        import torch

        lengths = [len(ids) for ids in token_ids]
        if any(length == 0 for length in lengths):
            raise FrankenMoEError("a prompt has no tokens", "remove empty prompts")
        batches = self.plan_batches(lengths, reduction)
        pad = int(self.config.pad_token_id or 0) if getattr(self.config, "pad_token_id", None) is not None else 0
        results: list[torch.Tensor | None] = [None] * len(token_ids)
        total = len(batches) * self.num_layers
        for batch_number, batch in enumerate(batches):
            width = max(lengths[i] for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids[row, : lengths[index]] = torch.tensor(token_ids[index])
                mask[row, : lengths[index]] = 1
            capture = _Capture(reduction=reduction, mask=mask)
            for done_layers in self._run(ids, mask, capture, cancel):
                yield Progress(stage, batch_number * self.num_layers + done_layers, total)
            stacked = torch.stack([capture.outputs[layer] for layer in range(self.num_layers)], dim=1)
            for row, index in enumerate(batch):
                if reduction == "tokens":
                    results[index] = stacked[row, :, : lengths[index]].clone()
                else:
                    results[index] = stacked[row].clone()
        return [r for r in results if r is not None]

    def _run(
        self, ids: torch.Tensor, mask: torch.Tensor, capture: _Capture, cancel: threading.Event | None
    ) -> Iterator[int]:
        """Run one batch in a helper thread so that per-layer progress can be yielded as it happens."""
        import torch

        events: queue.Queue[int | BaseException | None] = queue.Queue()
        self._abort.clear()
        self._capture = capture
        self._progress = lambda layer: events.put(layer + 1)

        def forward() -> None:
            try:
                with torch.inference_mode():
                    self.body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
            except BaseException as exc:  # handed to the generator's thread and re-raised there
                events.put(exc)
            finally:
                events.put(None)

        worker = threading.Thread(target=forward, name="frankenmoe-probe", daemon=True)
        worker.start()
        failure: BaseException | None = None
        try:
            while (event := events.get()) is not None:
                if isinstance(event, BaseException):
                    failure = event
                    continue
                if cancel is not None and cancel.is_set():
                    self._abort.set()
                yield event
        finally:
            self._abort.set()
            worker.join()
            self._capture = None
            self._progress = None
            if not self.keep_loaded:
                self.release()
        if failure is not None:
            raise failure
        check_cancel(cancel)

    def release(self) -> None:
        for index in list(self._loaded):
            self.body.layers[index].to("meta")
        self._loaded.clear()


# --------------------------------------------------------------------------- computing gates


class GateComputer:
    """Computes router gates for a recipe's experts. Hold one to keep the base model warm."""

    def __init__(
        self,
        base: ModelRef,
        *,
        device: str = "auto",
        dtype: str | None = None,
        keep_loaded: bool = False,
        cache_dir: Path | None = None,
        memory_budget: int | None = None,
    ) -> None:
        self.base = base
        self.memory_budget = memory_budget
        self.device_name = device
        self.dtype_name = dtype
        self.keep_loaded = keep_loaded
        self.cache_dir = cache_dir
        self._source: ModelSource | None = None
        self._probe: RouterInputProbe | None = None
        self._tokenizer: object | None = None

    @property
    def source(self) -> ModelSource:
        if self._source is None:
            self._source = open_model(self.base, self.cache_dir)
        return self._source

    @property
    def tokenizer(self) -> object:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source.path)
        return self._tokenizer

    def probe(self) -> RouterInputProbe:
        if self._probe is None:
            device = resolve_device(self.device_name)
            self._probe = RouterInputProbe(
                self.source,
                device,
                compute_dtype(device, self.dtype_name),
                keep_loaded=self.keep_loaded,
                memory_budget=self.memory_budget,
            )
        return self._probe

    def close(self) -> None:
        self._probe = None
        self._tokenizer = None
        if self._source is not None:
            self._source.close()
            self._source = None

    def compute(self, recipe: Recipe, cancel: threading.Event | None = None) -> Job[GateResult]:
        import torch

        if recipe.gate_mode not in GATE_MODES:
            raise FrankenMoEError(f"unknown gate mode {recipe.gate_mode!r}", f"use one of {', '.join(GATE_MODES)}")
        config = self.source.config
        layers, hidden, experts = (
            int(config["num_hidden_layers"]),
            int(config["hidden_size"]),
            len(recipe.experts),
        )
        check_cancel(cancel)
        generator = torch.Generator().manual_seed(recipe.studio.seed)
        if recipe.gate_mode == "random":
            router = torch.randn((layers, experts, hidden), generator=generator)
        elif recipe.gate_mode == "uniform_random":
            scale = math.sqrt(1.0 / hidden)
            router = torch.rand((layers, experts, hidden), generator=generator) * 2 * scale - scale
        elif recipe.gate_mode == "cheap_embed":
            router = self._cheap_embed(recipe, layers)
        elif recipe.gate_mode == "calibrated":
            return (yield from self._calibrated(recipe, cancel))
        else:
            router = yield from self._hidden(recipe, cancel)
        yield Progress("gates", 1, 1, message=f"{recipe.gate_mode} gates for {experts} experts")
        return GateResult(recipe.gate_mode, router.contiguous(), layer_diagnostics(router))

    def _cheap_embed(self, recipe: Recipe, layers: int) -> torch.Tensor:
        """mergekit-moe's definition: normalised sums of token embeddings, positive minus negative."""
        embed = self.source.read_tensor("model.embed_tokens.weight").float()

        def normalised_sum(prompts: Sequence[str]) -> torch.Tensor:
            total = sum(embed[ids].sum(dim=0) for ids in encode_prompts(self.tokenizer, prompts))
            return total / total.norm().clamp(min=1e-8)

        vectors = []
        for expert in recipe.experts:
            vector = normalised_sum(expert.positive_prompts)
            if expert.negative_prompts:
                vector = vector - normalised_sum(expert.negative_prompts)
            vectors.append(vector / vector.norm().clamp(min=1e-8))
        import torch

        return torch.stack(vectors).unsqueeze(0).repeat(layers, 1, 1)

    def _hidden(self, recipe: Recipe, cancel: threading.Event | None) -> Job[torch.Tensor]:
        import torch

        reduction: Reduction = "mean" if recipe.gate_mode == "hidden_avg" else "last"
        prompts = sorted({p for e in recipe.experts for p in (*e.positive_prompts, *e.negative_prompts)})
        states = yield from self.probe().collect(
            encode_prompts(self.tokenizer, prompts), reduction, cancel, stage="gates"
        )
        by_prompt = dict(zip(prompts, states, strict=True))

        def mean_state(texts: Sequence[str]) -> torch.Tensor:
            return torch.stack([by_prompt[t] for t in texts]).mean(dim=0)

        vectors = []
        for expert in recipe.experts:
            vector = mean_state(expert.positive_prompts)
            if expert.negative_prompts:
                vector = vector - mean_state(expert.negative_prompts)
            vectors.append(vector / vector.norm(dim=-1, keepdim=True).clamp(min=1e-8))
        return torch.stack(vectors, dim=1)

    def _calibrated(self, recipe: Recipe, cancel: threading.Event | None) -> Job[GateResult]:
        import time

        import torch

        from app.core.calibration import fit_layer, label_tokens

        prompts = sorted({p for e in recipe.experts for p in (*e.positive_prompts, *e.negative_prompts)})
        states = yield from self.probe().collect(
            encode_prompts(self.tokenizer, prompts), "tokens", cancel, stage="gates"
        )
        by_prompt = dict(zip(prompts, states, strict=True))
        skip = 1 if getattr(self.tokenizer, "bos_token", None) else 0  # every prompt's BOS looks the same

        def mean_state(texts: Sequence[str]) -> torch.Tensor:
            return torch.stack([by_prompt[t].mean(dim=1) for t in texts]).mean(dim=0)

        # The hidden_avg gates are where the fit starts and what it is pulled towards.
        initial = []
        for expert in recipe.experts:
            vector = mean_state(expert.positive_prompts)
            if expert.negative_prompts:
                vector = vector - mean_state(expert.negative_prompts)
            initial.append(vector / vector.norm(dim=-1, keepdim=True).clamp(min=1e-8))
        init = torch.stack(initial, dim=1)

        labelled = [(text, index, -1) for index, e in enumerate(recipe.experts) for text in e.positive_prompts]
        labelled += [(text, -1, index) for index, e in enumerate(recipe.experts) for text in e.negative_prompts]
        num_layers = init.shape[0]
        started = time.perf_counter()
        weights, accuracies = [], []
        for layer in range(num_layers):
            check_cancel(cancel)
            tokens = label_tokens(
                [by_prompt[text][layer, skip:] for text, _, _ in labelled],
                [positive for _, positive, _ in labelled],
                [negative for _, _, negative in labelled],
            )
            fit = fit_layer(tokens, init[layer])
            weights.append(fit.weight)
            accuracies.append(fit.train_accuracy)
            yield Progress("calibrating", layer + 1, num_layers, message=f"layer {layer}: {fit.train_accuracy:.0%}")
        router = torch.stack(weights).contiguous()
        return GateResult(
            "calibrated",
            router,
            layer_diagnostics(router),
            fit_seconds=time.perf_counter() - started,
            train_accuracy=tuple(accuracies),
        )

    def route(
        self,
        recipe: Recipe,
        gates: GateResult,
        prompts_by_expert: Sequence[Sequence[str]],
        cancel: threading.Event | None = None,
    ) -> Job[RoutingPreview]:
        """Where test prompts would go: router softmax per layer and token, and the quality score."""
        import torch

        labelled = [(expert, text) for expert, texts in enumerate(prompts_by_expert) for text in texts if text.strip()]
        token_ids = encode_prompts(self.tokenizer, [text for _, text in labelled])
        states = yield from self.probe().collect(token_ids, "tokens", cancel, stage="routing test prompts")
        skip = 1 if getattr(self.tokenizer, "bos_token", None) else 0  # the BOS token is the same for every prompt
        routings, token_texts = [], []
        router = gates.router.float()
        for (expert, text), ids, state in zip(labelled, token_ids, states, strict=True):
            logits = torch.einsum("lth,leh->lte", state[:, skip:], router)
            weights = torch.softmax(logits, dim=-1).numpy()
            routings.append(PromptRouting(text=text, intended_expert=expert, weights=weights))
            token_texts.append(tuple(self.tokenizer.decode([i]) for i in ids[skip:]))  # type: ignore[attr-defined]
        quality = evaluate_routing(routings, len(recipe.experts))
        return RoutingPreview(tuple(routings), tuple(token_texts), quality)


def compute_gates(
    recipe: Recipe,
    *,
    device: str = "auto",
    dtype: str | None = None,
    cache_dir: Path | None = None,
    cancel: threading.Event | None = None,
) -> Job[GateResult]:
    """One-shot gate computation that streams the base model and frees everything afterwards."""
    computer = GateComputer(recipe.base_model, device=device, dtype=dtype, cache_dir=cache_dir)
    try:
        return (yield from computer.compute(recipe, cancel))
    finally:
        computer.close()
