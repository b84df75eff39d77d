"""Loading a model to chat with: estimate memory, plan what fits, load with progress and cancel.

The estimate comes from the safetensors headers (parameter counts and dtypes, nothing read) plus a
KV cache for the context and a margin, and is compared with free memory on the chosen device. When
it does not fit, the plan names what would: 8-bit or 4-bit weights (bitsandbytes), spreading the
layers over the GPUs and the CPU (``device_map="auto"``), or the CPU, in a smaller dtype if need be.

Loading reads the weight files once in chunks first, which reports real progress and lets a cancel
land between chunks; ``from_pretrained`` then finds the bytes in the page cache. Remote code is only
run when the request allows it for this model.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.chat.model import ChatModel
from app.core.devices import available_memory, compute_dtype, resolve_device
from app.core.imports import TRANSFORMERS_IMPORT_LOCK
from app.core.problems import FrankenMoEError
from app.core.progress import Cancelled, Job, Progress, check_cancel, format_bytes
from app.core.recipe import ModelRef
from app.core.sources import ModelSource, resolve_model_dir

if TYPE_CHECKING:
    import torch

READ_CHUNK = 16 * 2**20
# Beyond weights and KV cache: activations, the logits, allocator slack, library workspaces.
MARGIN_FRACTION = 0.08
MARGIN_BYTES = 256 * 2**20
DEFAULT_CONTEXT_TOKENS = 4096


class LoadMode(StrEnum):
    FULL = "full"  # every weight in the compute dtype on one device
    INT8 = "8bit"  # linear layers in 8 bits (bitsandbytes), on a CUDA GPU
    INT4 = "4bit"  # linear layers in 4 bits (bitsandbytes NF4), on a CUDA GPU
    SPREAD = "spread"  # device_map="auto": layers over every GPU, then the CPU


@dataclass(frozen=True, slots=True)
class LoadRequest:
    model: str  # a local folder or a Hub id (optionally @revision) already in the cache
    device: str = "auto"
    dtype: str | None = None  # None: bfloat16/float16 on GPUs, float32 on the CPU
    mode: LoadMode = LoadMode.FULL
    trust_remote_code: bool = False  # the user's explicit permission, for this model only
    context_tokens: int = DEFAULT_CONTEXT_TOKENS  # the KV cache to leave room for
    memory_limit: int | None = None  # use at most this many bytes of each device's free memory
    cache_dir: Path | None = None
    # Module name suffixes that 8-bit and 4-bit loads leave in the compute dtype (besides the output
    # head), e.g. the routers that router training has to update.
    keep_unquantised: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoadOption:
    """One way to load the model, what it needs and what there is."""

    mode: LoadMode
    device: str
    dtype: str
    needed: int
    available: int
    unavailable: str = ""  # why this way cannot be used here at all, e.g. a missing library

    @property
    def fits(self) -> bool:
        return not self.unavailable and self.needed <= self.available

    def describe(self) -> str:
        where = {
            LoadMode.FULL: f"on {self.device} in {self.dtype}",
            LoadMode.INT8: f"in 8 bits on {self.device}",
            LoadMode.INT4: f"in 4 bits on {self.device}",
            LoadMode.SPREAD: f"spread over the GPUs and the CPU in {self.dtype}",
        }[self.mode]
        text = f"{where}: needs {format_bytes(self.needed)}, {format_bytes(self.available)} free"
        return f"{text} ({self.unavailable})" if self.unavailable else text


@dataclass(frozen=True, slots=True)
class LoadPlan:
    request: LoadRequest
    folder: Path
    chosen: LoadOption
    options: tuple[LoadOption, ...]  # every way considered, the chosen one included

    @property
    def fits(self) -> bool:
        return self.chosen.fits

    @property
    def alternatives(self) -> tuple[LoadOption, ...]:
        """The other ways that would fit, best first."""
        return tuple(o for o in self.options if o.fits and o != self.chosen)

    def request_for(self, option: LoadOption) -> LoadRequest:
        """The request that loads the model the way an option describes."""
        return replace(self.request, mode=option.mode, device=option.device, dtype=option.dtype)

    def message(self) -> str:
        if self.fits:
            return f"the model fits {self.chosen.describe()}"
        text = f"the model does not fit {self.chosen.describe()}"
        if self.alternatives:
            return f"{text}; it would fit " + "; or ".join(o.describe() for o in self.alternatives)
        return f"{text}, and no other way of loading it fits either"


class ModelDoesNotFit(FrankenMoEError):
    """Raised instead of loading a model that would not fit; carries the plan with what would."""

    def __init__(self, plan: LoadPlan) -> None:
        hint = (
            "load it one of the ways that fit, or free some memory"
            if plan.alternatives
            else "free some memory, shorten the context, or use a smaller model"
        )
        super().__init__(plan.message(), hint)
        self.plan = plan


# --------------------------------------------------------------------------- estimating


@dataclass(frozen=True, slots=True)
class WeightCounts:
    """Parameter counts from the safetensors headers, and how many bitsandbytes would quantise."""

    float_elements: int  # stored in a floating dtype: converted to the compute dtype on loading
    quantisable_elements: int  # weights of nn.Linear layers (not the output head) in this transformers
    other_bytes: int  # integer tensors, kept as they are


def count_weights(source: ModelSource, trust_remote_code: bool = False) -> WeightCounts:
    float_elements = other = 0
    for name in source.tensor_names:
        info = source.tensor_info(name)
        if info.torch_dtype_name.startswith(("float", "bfloat")):
            float_elements += info.numel
        else:
            other += info.nbytes
    quantisable = min(_linear_elements(source.path, trust_remote_code), float_elements)
    return WeightCounts(float_elements, quantisable, other)


def _linear_elements(folder: Path, trust_remote_code: bool) -> int:
    """Elements in the nn.Linear layers bitsandbytes replaces, from a weightless (meta) model.

    Which weights are nn.Linear depends on the transformers version: transformers 5 keeps MoE experts
    as fused 3-D parameters, which bitsandbytes leaves unquantised, so headers alone cannot tell.
    """
    import torch
    with TRANSFORMERS_IMPORT_LOCK:
        from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return 0  # an architecture this transformers cannot build: assume nothing shrinks
    output = skeleton.get_output_embeddings()
    return sum(
        module.weight.numel()
        for module in skeleton.modules()
        if type(module) is torch.nn.Linear and module is not output
    )


def kv_cache_bytes(config: dict[str, Any], tokens: int, element_bytes: int) -> int:
    text = config.get("text_config", config)  # multimodal configs nest the language model's
    layers = int(text.get("num_hidden_layers", 0))
    heads = int(text.get("num_attention_heads", 1))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text.get("hidden_size", 0)) // max(heads, 1))
    return 2 * layers * kv_heads * head_dim * tokens * element_bytes


def estimate_bytes(counts: WeightCounts, config: dict[str, Any], mode: LoadMode, dtype_bytes: int, tokens: int) -> int:
    """Memory a load needs: weights as they will be stored, the KV cache, and a margin."""
    plain = counts.float_elements - counts.quantisable_elements
    if mode is LoadMode.INT8:
        # int8 weights plus one float32 scale per row (rows are not known here; 1/64 is generous).
        weights = plain * dtype_bytes + counts.quantisable_elements * (1 + 4 / 64)
    elif mode is LoadMode.INT4:
        # NF4: half a byte per weight plus a float32 absmax per block of 64.
        weights = plain * dtype_bytes + counts.quantisable_elements * (0.5 + 4 / 64)
    else:
        weights = counts.float_elements * dtype_bytes
    weights += counts.other_bytes
    total = weights + kv_cache_bytes(config, tokens, dtype_bytes)
    return int(total * (1 + MARGIN_FRACTION) + MARGIN_BYTES)


def _free(device: str, limit: int | None) -> int:
    free = available_memory(device)
    return min(free, limit) if limit is not None else free


def _library_missing(*modules: str) -> str:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"needs {' and '.join(missing)}, which is not installed" if missing else ""


def plan_load(request: LoadRequest) -> LoadPlan:
    """Every way of loading the model with what it needs and what is free; the requested one chosen."""
    import torch

    folder = resolve_model_dir(ModelRef.parse(request.model), request.cache_dir)
    # ModelSource names a missing or broken config.json and missing weights as FrankenMoEErrors.
    with ModelSource(folder) as source:
        check_remote_code(folder, source.config, request.trust_remote_code)
        counts = count_weights(source, request.trust_remote_code)
        config = source.config
    device = resolve_device(request.device)
    dtype = _dtype_name(compute_dtype(device, request.dtype))
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    limit = request.memory_limit

    def option(mode: LoadMode, on: str, dtype_name: str, available: int, unavailable: str = "") -> LoadOption:
        element = getattr(torch, dtype_name).itemsize
        needed = estimate_bytes(counts, config, mode, element, request.context_tokens)
        return LoadOption(mode, on, dtype_name, needed, available, unavailable)

    on_gpu = device.startswith("cuda")
    gpu = device if on_gpu else (gpus[0] if gpus else "cuda")
    gpu_free = _free(gpu, limit) if gpus else 0
    gpu_dtype = dtype if on_gpu else _dtype_name(compute_dtype(gpu)) if gpus else "bfloat16"
    no_gpu = "" if gpus else "needs a CUDA GPU"
    spread_free = sum(_free(g, limit) for g in gpus) + _free("cpu", limit)
    cpu_free = _free("cpu", limit)

    requested = option(request.mode, device, dtype, _free(device, limit))
    if request.mode in (LoadMode.INT8, LoadMode.INT4):
        requested = option(
            request.mode, gpu, gpu_dtype, gpu_free, no_gpu or _library_missing("bitsandbytes", "accelerate")
        )
    elif request.mode is LoadMode.SPREAD:
        requested = option(LoadMode.SPREAD, "auto", gpu_dtype, spread_free, no_gpu or _library_missing("accelerate"))

    options = [
        requested,
        option(LoadMode.INT8, gpu, gpu_dtype, gpu_free, no_gpu or _library_missing("bitsandbytes", "accelerate")),
        option(LoadMode.INT4, gpu, gpu_dtype, gpu_free, no_gpu or _library_missing("bitsandbytes", "accelerate")),
        option(LoadMode.SPREAD, "auto", gpu_dtype, spread_free, no_gpu or _library_missing("accelerate")),
        option(LoadMode.FULL, "cpu", "float32", cpu_free),
        option(LoadMode.FULL, "cpu", "bfloat16", cpu_free),
    ]
    unique: list[LoadOption] = []
    for candidate in options:
        if all((o.mode, o.device, o.dtype) != (candidate.mode, candidate.device, candidate.dtype) for o in unique):
            unique.append(candidate)
    return LoadPlan(request=request, folder=folder, chosen=requested, options=tuple(unique))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_remote_code(folder: Path, config: dict[str, Any], allowed: bool) -> None:
    """Refuse a model whose architecture exists only as code in its repository, unless allowed."""
    with TRANSFORMERS_IMPORT_LOCK:
        from transformers import CONFIG_MAPPING

    needs_code = bool(config.get("auto_map")) and config.get("model_type") not in CONFIG_MAPPING
    if needs_code and not allowed:
        raise FrankenMoEError(
            f"{folder.name} needs its own Python code to load (its config's auto_map), and remote code is "
            "never run without your permission",
            "allow remote code for this model (--trust-remote-code) only if you trust its authors",
        )


# --------------------------------------------------------------------------- loading


def load_chat_model(request: LoadRequest, cancel: threading.Event | None = None) -> Job[ChatModel]:
    """Plan, then load the model and tokenizer. Raises ModelDoesNotFit with the plan if it would not fit."""
    yield Progress("planning", 0, 1, message="estimating memory")
    plan = plan_load(request)
    if not plan.fits:
        raise ModelDoesNotFit(plan)
    with ModelSource(plan.folder) as source:
        files = sorted({source.tensor_info(name).file for name in source.tensor_names})
    yield from _read_ahead(files, cancel)
    yield Progress("loading", 0, 1, message=f"loading the model {plan.chosen.describe()}")
    model = _from_pretrained(plan)
    if cancel is not None and cancel.is_set():
        del model  # from_pretrained cannot be interrupted; give back what it took at once
        raise Cancelled("cancelled")
    tokenizer = _load_tokenizer(plan.folder, request.trust_remote_code)
    chat = ChatModel(
        model=model,
        tokenizer=tokenizer,
        name=Path(request.model).name if ModelRef.parse(request.model).is_local else request.model,
        device=plan.chosen.device,
        folder=plan.folder,
        description=plan.chosen.describe().split(":")[0],
    )
    yield Progress("done", 1, 1)
    return chat


def _read_ahead(files: list[Path], cancel: threading.Event | None) -> Job[None]:
    total = sum(f.stat().st_size for f in files)
    done = 0
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    for file in files:
        with file.open("rb", buffering=0) as handle:
            while True:
                check_cancel(cancel)
                count = handle.readinto(view)
                if not count:
                    break
                done += count
                yield Progress("reading weights", done, total, done, total, message=file.name)
    yield Progress("reading weights", len(files), len(files), total, total)


def _from_pretrained(plan: LoadPlan) -> Any:
    import torch
    with TRANSFORMERS_IMPORT_LOCK:
        from transformers import AutoModelForCausalLM

    option = plan.chosen
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, option.dtype),
        "trust_remote_code": plan.request.trust_remote_code,
    }
    has_accelerate = importlib.util.find_spec("accelerate") is not None
    if option.mode in (LoadMode.INT8, LoadMode.INT4):
        with TRANSFORMERS_IMPORT_LOCK:
            from transformers import BitsAndBytesConfig

        # A skip list replaces bitsandbytes' default one (the output head), so that goes in too.
        kept = plan.request.keep_unquantised
        skip = {"llm_int8_skip_modules": ["lm_head", *kept]} if kept else {}
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True, **skip)
            if option.mode is LoadMode.INT8
            else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"], **skip
            )
        )
        kwargs["device_map"] = {"": option.device}
    elif option.mode is LoadMode.SPREAD:
        kwargs["device_map"] = "auto"
        if plan.request.memory_limit is not None:
            limit = plan.request.memory_limit
            kwargs["max_memory"] = {i: limit for i in range(torch.cuda.device_count())} | {"cpu": limit}
    elif option.device != "cpu" and has_accelerate:
        kwargs["device_map"] = {"": option.device}  # straight to the device, not through a CPU copy
    with TRANSFORMERS_IMPORT_LOCK:
        from transformers.utils import logging as transformers_logging

    # Its own progress bar would print to the terminal; ours is the read-ahead's.
    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(plan.folder, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise FrankenMoEError(f"transformers could not load {plan.folder} ({exc})", _load_hint(exc)) from exc
    finally:
        if bar_was_enabled:
            transformers_logging.enable_progress_bar()
    if option.mode is LoadMode.FULL and "device_map" not in kwargs and option.device != "cpu":
        model = model.to(option.device)
    return model


def _load_hint(exc: Exception) -> str:
    text = str(exc).lower()
    if "out of memory" in text:
        return "free some memory, or load the model in fewer bits, spread out, or on the CPU"
    if "model type" in text or "does not recognize" in text:
        return "update transformers, or check that this is a causal language model"
    return "check that the folder holds a complete causal language model"


def _load_tokenizer(folder: Path, trust_remote_code: bool) -> Any:
    with TRANSFORMERS_IMPORT_LOCK:
        from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise FrankenMoEError(
            f"cannot load the tokenizer of {folder} ({exc})", "use a model folder that includes its tokenizer files"
        ) from exc
