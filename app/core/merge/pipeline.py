"""The merge: dense donors into a MoE (Mixtral, Qwen2-MoE, Qwen3-MoE), streamed tensor by tensor, committed atomically.

The model is built in a hidden folder beside the target and renamed into place only when every
file is written, so a cancel, an error or a killed process never leaves a model that looks complete.
Leftovers of a killed run are removed by the next merge into the same folder or the app's next start
(app/core/merge/leftovers.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.compat import check_recipe
from app.core.devices import available_memory, return_freed_tensors_to_the_os, torch_is_loading
from app.core.families import QKV_BIAS, config_value, model_parts
from app.core.lora.merged import RESULT_BLOCKS, AdaptedModelSource, forget_thread_buffers
from app.core.merge.ahead import BlockedTensor, ComputedAhead, compute_workers
from app.core.merge.always_on import always_on_gate
from app.core.merge.architectures import MLP_PROJECTIONS, MoEShape, OutputArchitecture, choose_architecture
from app.core.merge.gates import GateResult, compute_gates, prompted_shared_experts
from app.core.merge.leftovers import (
    PARTIAL_MARK,
    REPLACED_MARK,
    clean_leftovers_job,
    record_output_folder,
    recorded_output_folders,
    work_folder,
)
from app.core.merge.modelcard import ModelCardFields, render_model_card
from app.core.merge.shards import PlannedTensor, ShardWriter, plan_shards, write_error
from app.core.problems import FrankenMoEError, raise_if_errors
from app.core.progress import BackgroundJob, Job, Progress, check_cancel
from app.core.recipe import Expert, Recipe, dump_recipe
from app.core.sources import ByteRange, ModelSource, open_model

if TYPE_CHECKING:
    import torch

RECIPE_FILENAME = "frankenmoe-recipe.yml"
# Tokenizer classes transformers 5 writes into tokenizer_config.json and transformers 4 does not have.
TRANSFORMERS_5_ONLY_TOKENIZERS = frozenset({"TokenizersBackend", "SentencePieceBackend", "PythonBackend"})
DEFAULT_SHARD_SIZE = 5 * 10**9
_MLP_TENSOR = re.compile(r"^model\.layers\.(\d+)\.mlp\.")
_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.")
# A shared expert without a gate vector gets an as-good-as-zero gate (always_on.py): sigmoid = 1/2 for
# every token, which doubling its down projection turns into exactly its donor's MLP output, always on.
ALWAYS_ON_DOWN_SCALE = 2.0


@dataclass(frozen=True, slots=True)
class MergeOptions:
    out_dir: Path
    shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    dtype: str | None = None  # output dtype; overrides the recipe's
    device: str = "auto"  # where gates are computed
    gate_dtype: str | None = None  # what they are computed in: bfloat16 on GPUs, float32 on CPUs by default
    cache_dir: Path | None = None
    card: ModelCardFields = field(default_factory=ModelCardFields)


@dataclass(frozen=True, slots=True)
class MergeResult:
    out_dir: Path
    bytes_written: int
    shard_files: tuple[str, ...]
    seconds: float
    gates: GateResult


def output_dtype(recipe: Recipe, options: MergeOptions, base_config: dict[str, object]) -> str:
    """The requested dtype, else the base model's, else bfloat16."""
    from app.core.recipe import DTYPE_ALIASES

    for candidate in (options.dtype, recipe.dtype, base_config.get("dtype"), base_config.get("torch_dtype")):
        if isinstance(candidate, str) and candidate.lower() in DTYPE_ALIASES:
            return DTYPE_ALIASES[candidate.lower()]
        if candidate and isinstance(candidate, str) and candidate in (options.dtype, recipe.dtype):
            raise FrankenMoEError(f"unknown dtype {candidate!r}", "use bfloat16, float16 or float32")
    return "bfloat16"


# --------------------------------------------------------------------------- the output folder


def check_target(out_dir: Path, overwrite: bool, input_dirs: Sequence[Path]) -> None:
    """Refuse any target whose replacement could destroy something the user did not ask to lose."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FrankenMoEError(f"{out_dir} is a file", "choose a folder path for the merged model")
    out_dir = out_dir.resolve()
    for folder in input_dirs:
        folder = folder.resolve()
        if out_dir == folder or out_dir in folder.parents:
            raise FrankenMoEError(
                f"the output folder {out_dir} holds an input model ({folder})",
                "choose an output folder outside the models being merged",
            )
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FrankenMoEError(
                f"the output folder {out_dir} already exists and is not empty",
                "choose another folder, or allow overwriting (--overwrite)",
            )
        if not (out_dir / "config.json").is_file():
            raise FrankenMoEError(
                f"{out_dir} is not empty and does not look like a model folder, so it will not be replaced",
                "choose an empty or new folder",
            )


def _commit(partial: Path, out_dir: Path) -> None:
    if out_dir.exists():
        replaced = work_folder(out_dir, REPLACED_MARK)
        out_dir.rename(replaced)
        partial.rename(out_dir)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        partial.rename(out_dir)


# --------------------------------------------------------------------------- planning tensors


# A tensor, a byte range to copy, or (a LoRA weight) blocks of rows for the merge's workers to compute.
Producer = Callable[[], "torch.Tensor | ByteRange | BlockedTensor[torch.Tensor]"]


@dataclass(frozen=True, slots=True)
class PlanStep:
    """One output tensor and the function that produces it when its turn comes."""

    planned: PlannedTensor
    produce: Producer
    # Torch arithmetic (a LoRA merge, noise, a scale or a cast), which workers do ahead of the writer;
    # otherwise a byte range to copy, or something the writer's thread produces in no time.
    computed: bool = False
    # Computed in blocks of rows that the workers share (produce returns a merge.ahead.BlockedTensor).
    in_blocks: bool = False
    # A byte range copied file to file, without torch.
    copied: bool = False


def _layer_of(name: str) -> int:
    match = _LAYER_TENSOR.match(name)
    return int(match.group(1)) if match else -1


def plan_tensors(
    recipe: Recipe,
    architecture: OutputArchitecture,
    base: ModelSource,
    experts: Sequence[ModelSource],
    shared_expert: ModelSource | None,
    gates_of: Callable[[], GateResult],
    out_dtype: str,
) -> list[PlanStep]:
    """Every output tensor with a function that produces it when its turn comes.

    Tensors stored in the output dtype are copied as bytes, file to file, without torch. The
    routers (and the shared expert's gates) come last, so that everything else can be written
    while the gates are computed; gates_of waits for them.
    """
    num_layers = int(base.config["num_hidden_layers"])
    num_experts, hidden = len(recipe.experts), int(base.config["hidden_size"])
    copied = [n for n in base.tensor_names if not _MLP_TENSOR.match(n) and not n.endswith("rotary_emb.inv_freq")]
    before = sorted(n for n in copied if _layer_of(n) == -1 and "embed" in n)
    after = sorted(n for n in copied if _layer_of(n) == -1 and n not in before)
    by_layer: dict[int, list[str]] = {}
    for name in copied:
        if _layer_of(name) >= 0:
            by_layer.setdefault(_layer_of(name), []).append(name)

    def planned_copy(source: ModelSource, name: str, out_name: str) -> PlanStep:
        info = source.tensor_info(name)
        planned = PlannedTensor(out_name, info.shape, out_dtype)
        if info.torch_dtype_name == out_dtype and not source.has_delta(name):
            return PlanStep(planned, lambda: source.byte_range(name), copied=True)
        if source.computes_in_blocks(name, out_dtype):
            assert isinstance(source, AdaptedModelSource)
            return PlanStep(planned, lambda: source.merged_rows(name, out_dtype), computed=True, in_blocks=True)
        return PlanStep(planned, lambda: source.read_tensor_as(name, out_dtype), computed=True)

    def planned_expert(
        source: ModelSource, out_name: str, expert: Expert, seed: int, layer: int, projection: str, scale: float | None
    ) -> PlanStep:
        source_name = f"model.layers.{layer}.mlp.{projection}_proj.weight"
        if not expert.noise_scale and scale is None:
            return planned_copy(source, source_name, out_name)
        planned = PlannedTensor(out_name, source.tensor_info(source_name).shape, out_dtype)

        def produce() -> torch.Tensor:
            import torch

            tensor = source.read_tensor(source_name)
            if expert.noise_scale:
                generator = torch.Generator().manual_seed(seed)
                tensor = tensor.float() + torch.randn(tensor.shape, generator=generator) * expert.noise_scale
            if scale is not None:
                tensor = tensor.float() * scale
            return _converted(tensor, out_dtype)

        return PlanStep(planned, produce, computed=True)

    zero_biases = _zero_attention_biases(architecture, base.config)
    shared = recipe.shared_experts[0] if shared_expert is not None else None
    always_on = shared is not None and not prompted_shared_experts(recipe)
    plan = [planned_copy(base, name, name) for name in before]
    for layer in range(num_layers):
        plan += [planned_copy(base, name, name) for name in sorted(by_layer.get(layer, []))]
        plan += [_zero_bias(f"model.layers.{layer}.{name}", size, out_dtype) for name, size in zero_biases]
        for index, (expert, source) in enumerate(zip(recipe.experts, experts, strict=True)):
            for projection in MLP_PROJECTIONS:
                plan.append(
                    planned_expert(
                        source,
                        architecture.expert_name(layer, index, projection),
                        expert,
                        hash_seed(recipe.studio.seed, layer, index, projection),
                        layer,
                        projection,
                        expert.residual_scale if projection == "down" else None,
                    )
                )
        if shared is not None and shared_expert is not None:
            down_scale = _shared_down_scale(shared, always_on)
            for projection in MLP_PROJECTIONS:
                plan.append(
                    planned_expert(
                        shared_expert,
                        architecture.shared_expert_name(layer, projection),
                        shared,
                        hash_seed(recipe.studio.seed, layer, "shared", projection),
                        layer,
                        projection,
                        down_scale if projection == "down" else None,
                    )
                )
    plan += [planned_copy(base, name, name) for name in after]
    for layer in range(num_layers):
        plan.append(
            PlanStep(
                PlannedTensor(architecture.router_name(layer), (num_experts, hidden), out_dtype),
                lambda layer=layer: _converted(gates_of().router[layer], out_dtype),
            )
        )
        if shared is not None:
            plan.append(
                PlanStep(
                    PlannedTensor(architecture.shared_gate_name(layer), (1, hidden), out_dtype),
                    lambda layer=layer: _converted(_shared_gate(gates_of(), layer, base, out_dtype), out_dtype),
                )
            )
    return plan


def _shared_down_scale(shared: Expert, always_on: bool) -> float | None:
    """The shared expert's down projection scale: its residual_scale, doubled where it is always on."""
    if not always_on:
        return shared.residual_scale
    return (shared.residual_scale if shared.residual_scale is not None else 1.0) * ALWAYS_ON_DOWN_SCALE


def _shared_gate(gates: GateResult, layer: int, base: ModelSource, out_dtype: str) -> torch.Tensor:
    """The gate vector from the shared expert's prompts, or the always-on gate (as good as zero, see always_on)."""
    norm_weight = base.read_tensor(f"model.layers.{layer}.post_attention_layernorm.weight")
    if gates.shared_router is None:
        return always_on_gate(norm_weight, out_dtype)
    return gates.shared_router[layer].reshape(1, norm_weight.numel())


def _zero_attention_biases(architecture: OutputArchitecture, base_config: dict[str, Any]) -> list[tuple[str, int]]:
    """(name within a layer, length) of the q/k/v biases an architecture always has and the base lacks."""
    if QKV_BIAS not in architecture.zero_filled or QKV_BIAS in model_parts(base_config):
        return []
    head_dim = int(config_value(base_config, "head_dim"))
    query = int(config_value(base_config, "num_attention_heads")) * head_dim
    key_value = int(config_value(base_config, "num_key_value_heads")) * head_dim
    return [
        ("self_attn.q_proj.bias", query),
        ("self_attn.k_proj.bias", key_value),
        ("self_attn.v_proj.bias", key_value),
    ]


def _zero_bias(name: str, size: int, out_dtype: str) -> PlanStep:
    def produce() -> torch.Tensor:
        import torch

        return torch.zeros(size, dtype=getattr(torch, out_dtype))

    return PlanStep(PlannedTensor(name, (size,), out_dtype), produce)


def _converted(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    import torch

    return tensor.to(getattr(torch, dtype))


def hash_seed(*parts: object) -> int:
    """A stable per-tensor seed (Python's hash() of strings changes between runs)."""
    import zlib

    return zlib.crc32("/".join(map(str, parts)).encode())


# --------------------------------------------------------------------------- the merge


def merge_moe(
    recipe: Recipe,
    options: MergeOptions,
    cancel: threading.Event | None = None,
    gates: GateResult | None = None,
) -> Job[MergeResult]:
    """Build the MoE into options.out_dir. Yields progress; returns a MergeResult."""
    started = time.monotonic()
    return_freed_tensors_to_the_os()
    # Resolved, so that a path through a symlink is compared with the (resolved) input folders as
    # what it is, and a link to a folder gets the model inside that folder rather than being replaced.
    out_dir = Path(os.path.realpath(os.path.expanduser(options.out_dir)))
    yield Progress("checking", 0, 1, message="checking the recipe and models")
    raise_if_errors(check_recipe(recipe, options.cache_dir))
    # Whatever killed merges left in this folder (for any target), or in those recent merges wrote into.
    yield from clean_leftovers_job([out_dir.parent, *recorded_output_folders()])

    sources: dict[str, ModelSource] = {}
    try:
        for ref in recipe.model_refs():
            sources[str(ref)] = open_model(ref, options.cache_dir)
        base = sources[str(recipe.base_model)]
        experts = [sources[str(e.source_model)] for e in recipe.experts]
        architecture = choose_architecture(recipe, base.config)
        shared_expert = sources[str(recipe.shared_experts[0].source_model)] if recipe.shared_experts else None
        adapter_folders = [s.adapter.folder for s in sources.values() if isinstance(s, AdaptedModelSource)]
        check_target(out_dir, options.overwrite, [*(s.path for s in sources.values()), *adapter_folders])
        out_dtype = output_dtype(recipe, options, base.config)

        expected = (int(base.config["num_hidden_layers"]), len(recipe.experts), int(base.config["hidden_size"]))
        shared_expected = (expected[0], expected[2]) if prompted_shared_experts(recipe) else None
        computed: list[GateResult] = [] if gates is None else [_checked(gates, expected, shared_expected)]
        stop = threading.Event()
        background = (
            None
            if computed
            else BackgroundJob(
                compute_gates(
                    recipe,
                    device=options.device,
                    dtype=options.gate_dtype,
                    cache_dir=options.cache_dir,
                    cancel=stop,
                ),
                name="frankenmoe-gates",
            )
        )

        def gates_of() -> GateResult:
            if not computed:
                assert background is not None
                computed.append(_checked(background.result(), expected, shared_expected))
            return computed[0]

        try:
            plan = plan_tensors(recipe, architecture, base, experts, shared_expert, gates_of, out_dtype)
            shards = plan_shards([step.planned for step in plan], options.shard_size)
            total_bytes = sum(s.nbytes for s in shards)
            _check_free_space(out_dir.parent, total_bytes)
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            record_output_folder(out_dir.parent)  # so that the app's next start cleans up if this run is killed
            partial = work_folder(out_dir, PARTIAL_MARK)
            partial.mkdir()
            producers = {position: step.produce for position, step in enumerate(plan) if step.computed}
            largest = max((math.prod(plan[position].planned.shape) for position in producers), default=0)
            ahead = ComputedAhead(
                producers,
                workers=compute_workers(largest, available_memory("cpu"), os.cpu_count() or 1),
                buffers=RESULT_BLOCKS,
                blocked=[position for position in producers if plan[position].in_blocks],
            )
            try:
                with ShardWriter(partial, shards) as writer:
                    for done, step in enumerate(plan):
                        planned = step.planned
                        if cancel is not None and cancel.is_set():
                            stop.set()
                        check_cancel(cancel)
                        if background is not None and not computed:
                            if background.failed:
                                background.result()  # raises the gate computation's error now
                            if planned.name == architecture.router_name(0):
                                # Everything else is written; the routers wait for the gates.
                                yield Progress(
                                    "writing",
                                    done,
                                    len(plan),
                                    writer.bytes_written,
                                    total_bytes,
                                    message="waiting for the gates",
                                )
                                while not background.wait(0.1):
                                    yield from background.drain()
                                    if cancel is not None and cancel.is_set():
                                        stop.set()
                                yield from background.drain()
                        if done in ahead:
                            yield from _copy_ahead_while_torch_loads(plan, done, writer, total_bytes, cancel)
                            writer.write(planned.name, ahead.blocks(done))
                        elif not writer.pass_written_ahead():  # a copy may have been written ahead
                            writer.write(planned.name, step.produce())
                        yield Progress(
                            "writing", done + 1, len(plan), writer.bytes_written, total_bytes, message=planned.name
                        )
                config = architecture.build_config(base.config, _moe_shape(recipe, base, shared_expert, out_dtype))
                try:
                    _write_side_files(partial, recipe, options, base, config, out_dir.name)
                except OSError as exc:
                    raise write_error(partial, exc) from exc
                check_cancel(cancel)
                _commit(partial, out_dir)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            finally:
                ahead.close()
                forget_thread_buffers()  # this thread computed blocks too, and may outlive the merge
        finally:
            stop.set()
            if background is not None:
                background.close()
        gates = computed[0]
    finally:
        for source in sources.values():
            source.close()
    yield Progress("done", 1, 1, total_bytes, total_bytes)
    return MergeResult(
        out_dir=out_dir,
        bytes_written=total_bytes,
        shard_files=tuple(s.filename for s in shards),
        seconds=time.monotonic() - started,
        gates=gates,
    )


def _copy_ahead_while_torch_loads(
    plan: Sequence[PlanStep], position: int, writer: ShardWriter, total_bytes: int, cancel: threading.Event | None
) -> Job[None]:
    """Copy the later byte ranges of the shard being written into their places, for as long as torch loads.

    A computed tensor waits for `import torch` (a second or two, which the gates' thread or a
    worker has begun); a merge of LoRA experts would reach its first one with the writer otherwise
    idle, while the attention and the embeddings could be copied.
    """
    for later in range(position + 1, len(plan)):
        if not torch_is_loading():
            return
        step = plan[later]
        if step.copied:
            check_cancel(cancel)
            if not writer.write_ahead(step.planned.name, step.produce()):
                return
            yield Progress("writing", position, len(plan), writer.bytes_written, total_bytes, message=step.planned.name)


def _checked(gates: GateResult, expected: tuple[int, int, int], shared_expected: tuple[int, int] | None) -> GateResult:
    shared_shape = tuple(gates.shared_router.shape) if gates.shared_router is not None else None
    if tuple(gates.router.shape) != expected or shared_shape != shared_expected:
        raise FrankenMoEError(
            f"the gates are shaped {tuple(gates.router.shape)} (shared expert: {shared_shape}), "
            f"but this recipe needs {expected} (shared expert: {shared_expected})",
            "compute the gates again for this recipe",
        )
    return gates


def _check_free_space(folder: Path, needed: int) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    margin = 64 * 2**20
    if free < needed + margin:
        raise FrankenMoEError(
            f"not enough disk space in {probe}: the model needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are free",
            "free some space or choose an output folder on another disk",
        )


def _moe_shape(recipe: Recipe, base: ModelSource, shared_expert: ModelSource | None, out_dtype: str) -> MoEShape:
    return MoEShape(
        num_experts=len(recipe.experts),
        experts_per_token=recipe.experts_per_token,
        # The compatibility check made every expert's MLP the base's size.
        expert_intermediate_size=int(base.config["intermediate_size"]),
        dtype=out_dtype,
        shared_expert_intermediate_size=int(shared_expert.config["intermediate_size"]) if shared_expert else None,
    )


def _make_tokenizer_config_portable(folder: Path) -> None:
    """Name a tokenizer class transformers 4 and 5 both load, where the base names one only 5 has.

    transformers 5 saves tokenizer_class "TokenizersBackend", which transformers 4 cannot find; both
    load PreTrainedTokenizerFast (5 as an alias of the same class) from tokenizer.json.
    """
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file() or not (folder / "tokenizer.json").is_file():
        return
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError:
        return  # the base's file as it is: a broken one is the tokenizer loader's to report
    if isinstance(config, dict) and config.get("tokenizer_class") in TRANSFORMERS_5_ONLY_TOKENIZERS:
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_side_files(
    folder: Path, recipe: Recipe, options: MergeOptions, base: ModelSource, config: dict[str, Any], out_name: str
) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = base.path / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, folder / "generation_config.json")
    else:
        defaults = {k: base.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in base.config}
        (folder / "generation_config.json").write_text(json.dumps(defaults, indent=2) + "\n")
    for file in base.tokenizer_files():
        shutil.copyfile(file, folder / file.name)
    _make_tokenizer_config_portable(folder)
    (folder / RECIPE_FILENAME).write_text(dump_recipe(recipe), encoding="utf-8")
    card = render_model_card(recipe, options.card, base.path, out_name, str(config["model_type"]))
    (folder / "README.md").write_text(card, encoding="utf-8")
