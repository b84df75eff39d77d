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
from typing import TYPE_CHECKING, Literal, Protocol

from app.core.devices import available_memory, compute_dtype, resolve_device, return_freed_tensors_to_the_os
from app.core.families import require_sizes
from app.core.problems import FrankenMoEError
from app.core.progress import Cancelled, Job, Progress, check_cancel
from app.core.prompt_tokens import MAX_PROMPT_TOKENS, PromptTokenizer, load_prompt_tokenizer
from app.core.recipe import GATE_MODES, Expert, ModelRef, Recipe
from app.core.routing import PromptRouting, RoutingQuality, evaluate_routing
from app.core.sources import ModelSource, open_model

if TYPE_CHECKING:
    import torch

Reduction = Literal["last", "mean", "tokens"]

DEGENERATE_SIMILARITY = 0.95


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
    # layers x hidden: the shared expert's gate, computed like the others' from its prompts; None
    # where there is no shared expert or no gate computed from prompts (it is then always on).
    shared_router: torch.Tensor | None = None

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


def contrast_gates(experts: Sequence[Expert], summarise: Callable[[Sequence[str]], torch.Tensor]) -> torch.Tensor:
    """Each expert's gate: its positive prompts' summary minus its negative prompts', unit length.

    ``summarise`` maps prompts to one vector, or one per layer (layers x hidden); the experts are
    stacked on the second-to-last axis.
    """
    import torch

    vectors = []
    for expert in experts:
        vector = summarise(expert.positive_prompts)
        if expert.negative_prompts:
            vector = vector - summarise(expert.negative_prompts)
        vectors.append(vector / vector.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(vectors, dim=-2)


# --------------------------------------------------------------------------- running the base model


class MlpOverride(Protocol):
    """Replaces a dense model's MLP outputs while the probe runs it, e.g. by a MoE block."""

    def start_batch(self, prompt_indices: Sequence[int]) -> None: ...

    def before_mlp(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor) -> None: ...

    def mlp_output(self, layer: int, hidden: torch.Tensor) -> torch.Tensor: ...


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

        from app.core.merge.decoder import open_decoder

        return_freed_tensors_to_the_os()
        self.source = source
        self.config = source.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.keep_loaded = keep_loaded
        self.memory_budget = memory_budget
        self.decoder = open_decoder(source, self.device, dtype, MAX_PROMPT_TOKENS)
        self.num_layers = self.decoder.num_layers
        self._capture: _Capture | None = None
        self._override: MlpOverride | None = None
        self._progress: Callable[[int], None] | None = None
        self._abort = threading.Event()

    def layer_bytes(self) -> int:
        prefix = "model.layers.0."
        return sum(self.source.tensor_info(n).nbytes for n in self.source.tensor_names if n.startswith(prefix))

    # The decoder calls these around every layer (the LayerObserver protocol).

    def layer_started(self, layer: int) -> None:
        if self._abort.is_set():
            raise Cancelled("cancelled")

    def mlp_input(self, layer: int, hidden: torch.Tensor) -> None:
        state = self._capture
        if state is None or state.mask is None:
            return
        widened = hidden.float()
        mask = state.mask.to(widened.device, widened.dtype)
        if state.reduction == "last":
            last = state.mask.sum(dim=1) - 1
            reduced = widened[range(widened.shape[0]), last.to(widened.device)]
        elif state.reduction == "mean":
            reduced = (widened * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        else:
            reduced = widened
        state.outputs[layer] = reduced.cpu()
        if self._override is not None:
            self._override.before_mlp(layer, hidden, state.mask)

    def mlp_output(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        return None if self._override is None else self._override.mlp_output(layer, hidden)

    def layer_finished(self, layer: int) -> None:
        if not self.keep_loaded:
            self.decoder.unload(layer)
        if self._progress is not None:
            self._progress(layer)

    def plan_batches(self, lengths: Sequence[int], reduction: Reduction) -> list[list[int]]:
        """Group prompts, longest first, into batches whose activations fit in a share of free memory."""
        config = self.config
        element = self.dtype.itemsize
        hidden, intermediate = int(config["hidden_size"]), int(config["intermediate_size"])
        heads = int(config["num_attention_heads"])
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
        override: MlpOverride | None = None,
    ) -> Job[list[torch.Tensor]]:
        """Per prompt: layers x hidden ("last", "mean") or layers x tokens x hidden ("tokens").

        With an override, every layer's MLP output is replaced by the override's (all prompts must
        then fit in one batch, since the override sees each layer once).
        """
        import torch

        lengths = [len(ids) for ids in token_ids]
        if any(length == 0 for length in lengths):
            raise FrankenMoEError("a prompt has no tokens", "remove empty prompts")
        batches = self.plan_batches(lengths, reduction)
        if override is not None and len(batches) > 1:
            raise FrankenMoEError(
                f"{len(token_ids)} prompts do not fit in one batch in the memory there is",
                "use fewer or shorter prompts, or a device with more memory",
            )
        pad = int(self.config.get("pad_token_id") or 0)
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
            if override is not None:
                override.start_batch(batch)
            self._override = override
            try:
                for done_layers in self._run(ids, mask, capture, cancel):
                    yield Progress(stage, batch_number * self.num_layers + done_layers, total)
            finally:
                self._override = None
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
                    self.decoder.run(ids, mask, self)
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
        self.decoder.release()


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
        self._tokenizer: PromptTokenizer | None = None
        self._donors: dict[str, ModelSource] = {}

    @property
    def source(self) -> ModelSource:
        if self._source is None:
            source = open_model(self.base, self.cache_dir)
            try:
                require_sizes(source.config, source.ref)
            except FrankenMoEError:
                source.close()
                raise
            self._source = source
        return self._source

    @property
    def tokenizer(self) -> PromptTokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_prompt_tokenizer(self.source.path)
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
        for donor in self._donors.values():
            if donor is not self._source:
                donor.close()
        self._donors.clear()
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
        gated = (*recipe.experts, *prompted_shared_experts(recipe))
        if recipe.gate_mode == "random":
            router = torch.randn((layers, experts, hidden), generator=generator)
        elif recipe.gate_mode == "uniform_random":
            scale = math.sqrt(1.0 / hidden)
            router = torch.rand((layers, experts, hidden), generator=generator) * 2 * scale - scale
        elif recipe.gate_mode == "cheap_embed":
            router = self._cheap_embed(gated, layers)
        elif recipe.gate_mode == "calibrated":
            return (yield from self._calibrated(recipe, cancel))
        else:
            router = yield from self._hidden(recipe.gate_mode, gated, cancel)
        # The prompt modes computed the shared expert's gate vector along with the others'; split it off.
        shared_router = router[:, experts].contiguous() if router.shape[1] > experts else None
        router = router[:, :experts]
        yield Progress("gates", 1, 1, message=f"{recipe.gate_mode} gates for {experts} experts")
        return GateResult(recipe.gate_mode, router.contiguous(), layer_diagnostics(router), shared_router=shared_router)

    def _cheap_embed(self, experts: Sequence[Expert], layers: int) -> torch.Tensor:
        """mergekit-moe's definition: normalised sums of token embeddings, positive minus negative."""
        # Only the prompts' rows are widened to float32 (exactly, from any float dtype), not the whole table.
        embed = self.source.read_tensor("model.embed_tokens.weight")

        def normalised_sum(prompts: Sequence[str]) -> torch.Tensor:
            total = sum(embed[ids].float().sum(dim=0) for ids in self.tokenizer.encode(prompts))
            return total / total.norm().clamp(min=1e-8)

        return contrast_gates(experts, normalised_sum).unsqueeze(0).repeat(layers, 1, 1)

    def _hidden(self, gate_mode: str, experts: Sequence[Expert], cancel: threading.Event | None) -> Job[torch.Tensor]:
        import torch

        reduction: Reduction = "mean" if gate_mode == "hidden_avg" else "last"
        prompts = sorted({p for e in experts for p in (*e.positive_prompts, *e.negative_prompts)})
        states = yield from self.probe().collect(self.tokenizer.encode(prompts), reduction, cancel, stage="gates")
        by_prompt = dict(zip(prompts, states, strict=True))

        return contrast_gates(experts, lambda texts: torch.stack([by_prompt[t] for t in texts]).mean(dim=0))

    def _calibrated(self, recipe: Recipe, cancel: threading.Event | None) -> Job[GateResult]:
        import time

        import torch

        from app.core.merge.calibration import ExpertWeights, ProgressiveCalibration, PromptLabel, fit_layer_on_prompts

        labelled = [(text, PromptLabel(i, -1)) for i, e in enumerate(recipe.experts) for text in e.positive_prompts]
        labelled += [(text, PromptLabel(-1, i)) for i, e in enumerate(recipe.experts) for text in e.negative_prompts]
        token_ids = self.tokenizer.encode([text for text, _ in labelled])
        skip = 1 if self.tokenizer.bos_token else 0  # every prompt's BOS looks the same
        probe = self.probe()
        started = time.perf_counter()
        if len(probe.plan_batches([len(ids) for ids in token_ids], "tokens")) == 1:
            calibration = ProgressiveCalibration(
                [ExpertWeights(self.donor(e.source_model), e.residual_scale) for e in recipe.experts],
                next(
                    (ExpertWeights(self.donor(e.source_model), e.residual_scale) for e in recipe.shared_experts),
                    None,
                ),
                [label for _, label in labelled],
                recipe.experts_per_token,
                skip,
            )
            yield from probe.collect(token_ids, "last", cancel, stage="calibrating", override=calibration)
            fits = [calibration.fits[layer] for layer in range(probe.num_layers)]
        else:
            # Too many prompts to run as one MoE pass: fit every layer on the base model's own states.
            states = yield from probe.collect(token_ids, "tokens", cancel, stage="gates")
            labels = [label for _, label in labelled]
            fits = []
            for layer in range(probe.num_layers):
                check_cancel(cancel)
                layer_states = [state[layer] for state in states]
                fits.append(fit_layer_on_prompts(layer_states, labels, len(recipe.experts), skip))
                yield Progress("calibrating", layer + 1, probe.num_layers)
        router = torch.stack([fit.weight for fit in fits]).contiguous()
        return GateResult(
            "calibrated",
            router,
            layer_diagnostics(router),
            fit_seconds=time.perf_counter() - started,
            train_accuracy=tuple(fit.train_accuracy for fit in fits),
        )

    def donor(self, ref: ModelRef) -> ModelSource:
        """An expert's model, opened once for as long as this computer lives."""
        key = str(ref)
        if key not in self._donors:
            self._donors[key] = self.source if ref == self.base else open_model(ref, self.cache_dir)
        return self._donors[key]

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
        token_ids = self.tokenizer.encode([text for _, text in labelled])
        states = yield from self.probe().collect(token_ids, "tokens", cancel, stage="routing test prompts")
        skip = 1 if self.tokenizer.bos_token else 0  # the BOS token is the same for every prompt
        routings, token_texts = [], []
        router = gates.router.float()
        for (expert, text), ids, state in zip(labelled, token_ids, states, strict=True):
            logits = torch.einsum("lth,leh->lte", state[:, skip:], router)
            weights = torch.softmax(logits, dim=-1).numpy()
            routings.append(PromptRouting(text=text, intended_expert=expert, weights=weights))
            token_texts.append(tuple(self.tokenizer.decode([i]) for i in ids[skip:]))
        quality = evaluate_routing(routings, len(recipe.experts))
        return RoutingPreview(tuple(routings), tuple(token_texts), quality)


# The calibrated mode fits the routed experts' routers to labelled tokens; the shared expert is not
# routed, so there it is always on.
SHARED_GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")


def prompted_shared_experts(recipe: Recipe) -> tuple[Expert, ...]:
    """The shared experts whose gate comes from their prompts: those with prompts, in the modes that use them."""
    if recipe.gate_mode not in SHARED_GATE_MODES:
        return ()
    return tuple(e for e in recipe.shared_experts if any(p.strip() for p in e.positive_prompts))


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
