"""Gate-only training of a merged MoE model's routers, as a job (a generator of progress records).

Only the routers (``mlp.gate`` / ``block_sparse_moe.gate``) and Qwen2-MoE's ``shared_expert_gate``
are trained; every other weight is frozen in the chosen dtype while the routers' master weights are
kept in float32. The objective is the next-token loss plus ``balance_coef`` times the Switch
load-balancing loss (as transformers' ``load_balancing_loss_func``) plus ``z_coef`` times the router
z-loss. The new model is written by :mod:`app.core.training.output`: nothing exists at ``out_dir``
until it is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import secrets
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.imports import TRANSFORMERS_IMPORT_LOCK
from app.core.problems import FrankenMoEError, Problem, Severity, raise_if_errors
from app.core.progress import Job, Progress, check_cancel
from app.core.sources import read_json_file
from app.core.training.card import card_section, recipe_comment
from app.core.training.data import PackedData, eos_token_id, pack_data, read_sources
from app.core.training.losses import causal_lm_loss, load_balancing_loss, router_z_loss
from app.core.training.output import RouterKey, stored_router_names, write_trained_model
from app.core.training.settings import RouterTrainingSettings, TrainingData, default_budget, settings_problems

STAGES = ("data", "train", "validate", "write")
# Module name suffixes of the trainable gates, which 8-bit and 4-bit loads leave unquantised.
GATE_MODULES = ("block_sparse_moe.gate", "mlp.gate", "shared_expert_gate")
CHECKPOINT_MARK = ".frankenmoe-router-checkpoint"
STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
# Validation runs every eval_every steps; past this many sequences it would cost more than it tells.
MAX_VALIDATION_SEQUENCES = 64
# A validation loss counts as better (for early stopping and the routers kept) when lower by more than this.
IMPROVEMENT = 0.0


@dataclass(frozen=True, slots=True)
class TrainingProgress(Progress):
    """A progress record of a training run. ``stage`` is "data", "train", "validate" or "write".

    On "train" records ``done`` / ``total`` count steps and the losses are the step's; "validate"
    records carry ``val_loss``. ``expert_load`` is each expert's share of the routed tokens (top-k
    choices), averaged over the MoE layers; it sums to 1.
    """

    step: int = 0
    loss: float | None = None  # the step's total objective (next-token + coefficients x auxiliary losses)
    balance_loss: float | None = None  # the Switch load-balancing loss (before its coefficient)
    z_loss: float | None = None  # the router z-loss (before its coefficient)
    val_loss: float | None = None  # mean next-token loss on the validation sequences
    expert_load: tuple[float, ...] = ()
    tokens_per_s: float | None = None


@dataclass(frozen=True)
class RouterTrainingResult:
    out_dir: Path
    steps: int  # steps trained (fewer than planned when stopped early)
    tokens: int  # training tokens seen
    initial_val_loss: float  # validation next-token loss of the routers before training
    final_val_loss: float  # ... at the last evaluation
    best_val_loss: float  # ... of the routers written: the best evaluated during training
    final_train_loss: float  # the last step's next-token loss
    stopped_early: bool
    history: tuple[TrainingProgress, ...] = ()  # every "train" and "validate" record
    report: dict[str, Any] = field(default_factory=dict)  # JSON-able; what the CLI's --json writes


def check_router_training(
    model_dir: Path, out_dir: Path, settings: RouterTrainingSettings, data: TrainingData, *, resume: bool = False
) -> list[Problem]:
    """Problems found without loading the model or reading the data: settings, model folder, output folder,
    data sources and the checkpoint to resume from (or the one a fresh run would leave behind)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    problems = settings_problems(settings)
    problems += _model_problems(model_dir)
    problems += _output_problems(model_dir, out_dir)
    problems += _data_problems(model_dir, data)
    checkpoint = latest_checkpoint(checkpoint_dir(out_dir))
    if resume and checkpoint is None:
        problems.append(
            Problem(
                "resume",
                f"there is no checkpoint of an interrupted run writing {out_dir.name} to resume",
                "run without --resume to start training",
            )
        )
    elif not resume and checkpoint is not None:
        problems.append(
            Problem(
                "resume",
                f"an interrupted run writing {out_dir.name} left a checkpoint ({checkpoint.name}) in "
                f"{checkpoint.parent}",
                "continue it with --resume (same settings and data), or delete that folder to start over",
            )
        )
    return problems


def _model_problems(model_dir: Path) -> list[Problem]:
    if not model_dir.is_dir():
        return [Problem("model", f"the model folder {model_dir} does not exist", "give the merged model's folder")]
    try:
        routers = stored_router_names(model_dir)
    except FrankenMoEError as exc:
        return [Problem("model", exc.message, exc.hint)]
    if not any(key.kind == "router" for key in routers):
        return [
            Problem(
                "model",
                f"{model_dir.name} is a dense model: none of its layers has a router to train",
                "give a mixture-of-experts model, e.g. one merged with frankenmoe merge",
            )
        ]
    config = read_json_file(model_dir / "config.json")
    top_k = int(config.get("num_experts_per_tok") or 0) if isinstance(config, dict) else 0
    # Mixtral always renormalises the chosen experts' weights; Qwen-MoE models say whether they do.
    renormalises = isinstance(config, dict) and bool(config.get("norm_topk_prob", True))
    if top_k == 1 and renormalises:
        return [
            Problem(
                "model",
                "this model routes each token to one expert and renormalises its weight to 1, so the next-token "
                "loss gives the routers no gradient: only the load-balancing loss will move them",
                "raise experts_per_token to 2 or more in the recipe and merge again, to train routing on the text",
                Severity.WARNING,
            )
        ]
    return []


def _output_problems(model_dir: Path, out_dir: Path) -> list[Problem]:
    if out_dir.exists() and not out_dir.is_dir():
        return [Problem("out", f"{out_dir} is a file", "choose a folder path for the new model")]
    if out_dir.is_dir() and any(out_dir.iterdir()):
        return [
            Problem(
                "out",
                f"the output folder {out_dir} is not empty",
                "choose a new or empty folder; the trained model is always written as a new folder",
            )
        ]
    resolved, model = out_dir.resolve(), model_dir.resolve()
    if resolved == model or model in resolved.parents:
        return [
            Problem("out", f"the output folder {out_dir} is inside the input model", "choose a folder outside it")
        ]
    return []


def _data_problems(model_dir: Path, data: TrainingData) -> list[Problem]:
    from app.core.eval.data import DATA_SUFFIXES
    from app.core.merge.pipeline import RECIPE_FILENAME

    if data.is_empty:
        return [
            Problem(
                "data",
                "no training data was given",
                "give data files (--data), the recipe's prompts (--recipe-prompts) or a Hub dataset (--hub-dataset)",
            )
        ]
    problems = []
    for path in data.files:
        if Path(path).suffix.lower() not in DATA_SUFFIXES:
            problems.append(
                Problem(
                    "data",
                    f"{Path(path).name} is not a data file this app reads",
                    "give .txt (paragraphs), .jsonl (a text or messages field per line) or .parquet files",
                )
            )
        elif not Path(path).is_file():
            problems.append(Problem("data", f"the data file {path} does not exist", "check the path"))
    if data.recipe_prompts and not (model_dir / RECIPE_FILENAME).is_file():
        problems.append(
            Problem(
                "data",
                f"{model_dir.name} has no recipe ({RECIPE_FILENAME}) to take prompts from",
                "give data files or a Hub dataset instead of the recipe's prompts",
            )
        )
    if data.hub_datasets and importlib.util.find_spec("datasets") is None:
        problems.append(
            Problem(
                "data",
                "Hub datasets need the datasets library, which is not installed",
                "pip install datasets, or save the texts as .jsonl and give them with --data",
            )
        )
    return problems


def checkpoint_dir(out_dir: Path) -> Path:
    """The resumable checkpoint folder of a run writing ``out_dir``: hidden, beside it, never inside it."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{CHECKPOINT_MARK}"


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in a checkpoint folder (each is a ``step-N`` folder), or None."""
    if not folder.is_dir():
        return None
    steps = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return max(steps, key=lambda p: int(p.name.removeprefix("step-")), default=None)


# --------------------------------------------------------------------------- the run


def train_routers(
    model_dir: Path,
    out_dir: Path,
    settings: RouterTrainingSettings,
    data: TrainingData,
    *,
    cancel: threading.Event | None = None,
    resume: bool = False,
) -> Job[RouterTrainingResult]:
    """Train the routers of the MoE model in ``model_dir`` and write the new model to ``out_dir``.

    Yields :class:`TrainingProgress` records (stages "data", "train", "validate", "write") and
    returns a :class:`RouterTrainingResult`. Checks ``cancel`` every step and raises Cancelled,
    leaving nothing at ``out_dir``. Every ``settings.checkpoint_every`` steps the routers, the
    optimiser, the step and the random states are saved in a checkpoint folder beside ``out_dir``
    (:func:`checkpoint_dir`); with ``resume=True`` a run continues from it exactly as if it had not
    stopped. The model written has the routers with the best validation loss. Raises ProblemsError
    (bad settings, dense model, output folder not empty, missing data files) or FrankenMoEError
    (empty or too-short data, out of memory with the settings that would fit).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    problems = check_router_training(model_dir, out_dir, settings, data, resume=resume)
    raise_if_errors(problems)
    for problem in problems:  # warnings only, once errors are out of the way
        yield TrainingProgress("data", 0, 1, message=f"warning: {problem.text}")
    planned = settings.planned_steps()
    budget_message = ""
    if planned is None:
        planned, budget_message = default_budget(model_dir, settings)
        yield TrainingProgress("data", 0, 1, message=budget_message)
    checkpoint = latest_checkpoint(checkpoint_dir(out_dir)) if resume else None
    state = _read_state(checkpoint, model_dir, settings, data, planned) if checkpoint is not None else None

    tokenizer = _load_tokenizer(model_dir)
    sources = read_sources(data, model_dir)
    train_tokens = planned * settings.tokens_per_step
    wanted = math.ceil(train_tokens / (1 - settings.val_fraction)) + 2 * settings.seq_len
    packed = yield from pack_data(
        tokenizer,
        sources,
        seq_len=settings.seq_len,
        val_fraction=settings.val_fraction,
        seed=settings.seed,
        eos_id=eos_token_id(tokenizer, None),
        max_tokens=wanted,
        max_validation=MAX_VALIDATION_SEQUENCES,
        cancel=cancel,
    )
    fingerprint = _fingerprint(packed)
    if state is not None and state["data_fingerprint"] != fingerprint:
        raise FrankenMoEError(
            "the training data differ from those of the interrupted run, so it cannot continue identically",
            "resume with the same data files and settings, or delete the checkpoint folder to start over",
        )
    chat = yield from _load_model(model_dir, settings, cancel)
    try:
        run = _Run(chat.model, model_dir, settings, planned, packed, out_dir, cancel)
        run.identify(data, fingerprint)
        if state is not None and checkpoint is not None:
            run.restore(checkpoint, state)
        yield from run.train()
        gates = run.best_gates()
        report = run.report(model_dir, budget_message, fingerprint)
    finally:
        chat.unload()
        del chat
    yield from write_trained_model(
        model_dir,
        out_dir,
        gates,
        card_section=card_section(report),
        recipe_comment=recipe_comment(report),
        report_json=json.dumps(report, indent=2) + "\n",
        cancel=cancel,
    )
    shutil.rmtree(checkpoint_dir(out_dir), ignore_errors=True)
    return RouterTrainingResult(
        out_dir=out_dir,
        steps=run.step,
        tokens=run.step * settings.tokens_per_step,
        initial_val_loss=run.initial_val_loss,
        final_val_loss=run.last_val_loss,
        best_val_loss=run.best_val_loss,
        final_train_loss=run.last_train_loss,
        stopped_early=run.stopped_early,
        history=tuple(run.history),
        report=report,
    )


# --------------------------------------------------------------------------- loading


def _load_tokenizer(model_dir: Path) -> Any:
    with TRANSFORMERS_IMPORT_LOCK:
        from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise FrankenMoEError(
            f"cannot load the tokenizer of {model_dir} ({exc})", "use a model folder that includes its tokenizer files"
        ) from exc


def _load_model(model_dir: Path, settings: RouterTrainingSettings, cancel: threading.Event | None) -> Job[Any]:
    """The model through the chat's loading plan (device, dtype, 8/4-bit), the gates left unquantised."""
    from app.core.chat.loading import LoadMode, LoadRequest, load_chat_model

    request = LoadRequest(
        model=str(model_dir.resolve()),
        device=settings.device,
        dtype=None if settings.dtype == "auto" else settings.dtype,
        mode=LoadMode(settings.load),
        # No KV cache in training; the activations of a batch take its place in the estimate.
        context_tokens=settings.tokens_per_step,
        keep_unquantised=GATE_MODULES,
    )
    loader = load_chat_model(request, cancel)
    while True:
        try:
            record = next(loader)
        except StopIteration as stop:
            chat = stop.value
            break
        yield TrainingProgress("data", record.done, record.total, record.bytes_done, record.bytes_total,
                               message=f"loading the model: {record.message or record.stage}")
    chat.capture.remove()  # the chat's routing capture: the trainer has its own hooks
    return chat


# --------------------------------------------------------------------------- checkpoints


def _fingerprint(packed: PackedData) -> str:
    digest = hashlib.sha256()
    for part in (packed.train, packed.validation):
        digest.update(part.numpy().tobytes())
    return digest.hexdigest()


def _settings_record(settings: RouterTrainingSettings) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one (device and checkpoints may change)."""
    return settings.model_dump(mode="json", exclude={"device", "checkpoint_every"})


def _data_record(data: TrainingData) -> dict[str, Any]:
    return data.model_dump(mode="json")


def _read_state(
    checkpoint: Path, model_dir: Path, settings: RouterTrainingSettings, data: TrainingData, planned: int
) -> dict[str, Any]:
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FrankenMoEError(
            f"the checkpoint {checkpoint} cannot be read ({exc})", "delete the checkpoint folder and start over"
        ) from exc
    before = state.get("settings", {}) | {"planned_steps": state.get("planned_steps")}
    now = _settings_record(settings) | {"planned_steps": planned}
    changed = sorted(key for key in now if before.get(key) != now[key])
    if changed:
        raise FrankenMoEError(
            f"the settings differ from those of the interrupted run ({', '.join(changed)}), so it cannot continue "
            "identically",
            "resume with the settings it was started with, or delete the checkpoint folder to start over",
        )
    if state.get("data") != _data_record(data):
        raise FrankenMoEError(
            "the training data differ from those of the interrupted run, so it cannot continue identically",
            "resume with the same data files and settings, or delete the checkpoint folder to start over",
        )
    return state


# --------------------------------------------------------------------------- training


def _cast_to(dtype: Any) -> Any:
    """A parametrization module: the float32 master weight, as the dtype the frozen model computes in."""
    import torch

    class CastTo(torch.nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight.to(dtype)

    return CastTo()


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    # CUDA and MPS say "out of memory"; the CPU allocator "not enough memory" or "can't allocate memory".
    return isinstance(exc, RuntimeError) and any(
        phrase in text for phrase in ("out of memory", "not enough memory", "can't allocate memory")
    )


class _Run:
    """One training run over a loaded model: its gates, optimiser, schedule, evaluations and checkpoints."""

    def __init__(
        self,
        model: Any,
        model_dir: Path,
        settings: RouterTrainingSettings,
        planned: int,
        packed: PackedData,
        out_dir: Path,
        cancel: threading.Event | None,
    ) -> None:
        import torch

        from app.core.chat.capture import find_routers, routing_rule

        self.model = model
        self.model_dir = model_dir
        self.settings = settings
        self.planned = planned
        self.packed = packed
        self.out_dir = out_dir
        self.cancel = cancel
        self.device = model.get_input_embeddings().weight.device
        torch.manual_seed(settings.seed)
        routers = find_routers(model)
        first = next(iter(routers.values()))
        self.num_experts = int(first.weight.shape[0])
        self.top_k = routing_rule(model.config, self.num_experts).top_k
        self.gates = self._trainable_gates(routers)
        model.requires_grad_(False)
        self.masters = [self._master(module) for module in self.gates.values()]
        self.optimizer = torch.optim.AdamW(self.masters, lr=settings.lr, weight_decay=0.0)
        self._logits: list[torch.Tensor] = []
        self._hooks = [router.register_forward_hook(self._record_logits) for router in routers.values()]
        self.checkpointing = False
        if self._activations_would_crowd_memory():
            self._enable_checkpointing()
        self.step = 0
        self.history: list[TrainingProgress] = []
        self.initial_val_loss = math.nan
        self.last_val_loss = math.nan
        self.best_val_loss = math.inf
        self.best_step = 0
        self.best: list[torch.Tensor] | None = None
        self.bad_evaluations = 0
        self.stopped_early = False
        self.last_train_loss = math.nan
        self.last_balance_loss: float | None = None
        self.last_load: tuple[float, ...] = ()
        self.train_seconds = 0.0
        self.tokens_trained_here = 0  # in this process (a resumed run counts from its restart), for tokens/s
        self._orders: dict[int, list[int]] = {}  # epoch -> its seeded order of the training sequences
        self._data_record: dict[str, Any] = {}
        self._fingerprint = ""

    def identify(self, data: TrainingData, fingerprint: str) -> None:
        """What a checkpoint records about the data, for a resumed run to check against."""
        self._data_record = _data_record(data)
        self._fingerprint = fingerprint

    # -- setting up

    def _trainable_gates(self, routers: dict[int, Any]) -> dict[str, Any]:
        """Stored tensor name -> gate module: each MoE layer's router and (Qwen2-MoE) shared-expert gate."""
        from app.core.chat.capture import decoder_layers

        stored = stored_router_names(self.model_dir)
        layers = decoder_layers(self.model)
        gates: dict[str, Any] = {}
        for index, router in routers.items():
            gates[stored[RouterKey(index, "router")]] = router
            shared = getattr(getattr(layers[index], "mlp", None), "shared_expert_gate", None)
            key = RouterKey(index, "shared_gate")
            if shared is not None and key in stored:
                gates[stored[key]] = shared
        return gates

    def _master(self, module: Any) -> Any:
        """Freeze everything but this gate, whose weight becomes a float32 master the model sees in its own dtype."""
        import torch
        from torch.nn.utils import parametrize

        weight = module.weight
        if weight.dtype == torch.float32:
            weight.requires_grad_(True)
            return weight
        dtype = weight.dtype
        master = torch.nn.Parameter(weight.detach().float(), requires_grad=True)
        module.weight = master
        parametrize.register_parametrization(module, "weight", _cast_to(dtype), unsafe=True)
        return module.parametrizations.weight.original

    def _record_logits(self, _module: Any, _inputs: Any, output: Any) -> None:
        # transformers 5 routers return (logits, top-k weights, indices); transformers 4's are nn.Linear.
        self._logits.append(output[0] if isinstance(output, tuple) else output)

    def _activations_would_crowd_memory(self) -> bool:
        """Whether the activations kept for the backward pass would take over half the free memory."""
        import torch

        from app.core.devices import available_memory

        config = getattr(self.model.config, "text_config", None) or self.model.config
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        layers = int(config.num_hidden_layers)
        element = torch.empty((), dtype=self.model.dtype).element_size()
        tokens = self.settings.tokens_per_step
        # Per token and layer, a transformer keeps about 34 hidden-sized values and 5 attention scores per
        # head and key (Korthikanti et al., 2022); the logits and their gradient come on top, in float32.
        per_layer = tokens * (34 * hidden + 5 * heads * self.settings.seq_len) * element
        logits = 2 * tokens * int(config.vocab_size) * 4
        return per_layer * layers + logits > available_memory(str(self.device)) // 2

    def _enable_checkpointing(self) -> None:
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.checkpointing = True

    # -- schedule and batches

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay towards 0 over the planned steps (``step`` counts from 0)."""
        warmup = math.ceil(self.settings.warmup_fraction * self.planned)
        if step < warmup:
            return self.settings.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.planned - warmup)
        return self.settings.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def batch(self, step: int) -> Any:
        """The training sequences of a step: epochs of seeded shuffles, so any step's batch is known without
        replaying the ones before (which is what lets a resumed run see the same batches)."""
        import torch

        count = self.packed.train.shape[0]
        size = self.settings.batch_size
        rows = []
        for position in range(step * size, (step + 1) * size):
            epoch, index = divmod(position, count)
            if epoch not in self._orders:
                generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + epoch + 1)
                # Only the epochs a batch can span are kept: this one and the one before.
                self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
                self._orders[epoch] = torch.randperm(count, generator=generator).tolist()
            rows.append(self._orders[epoch][index])
        return self.packed.train[rows].to(self.device, non_blocking=True)

    # -- steps

    def _losses(self, input_ids: Any) -> tuple[Any, Any, Any, Any, Any]:
        """(objective, next-token loss, balance loss, z-loss, expert load) of a batch, with the graph."""
        import torch

        self._logits.clear()
        next_token = causal_lm_loss(self.model, input_ids)
        balance_needed = self.settings.balance_coef > 0
        with torch.set_grad_enabled(balance_needed and torch.is_grad_enabled()):
            balance, load = load_balancing_loss(self._logits, self.num_experts, self.top_k)
        objective = next_token
        if balance_needed:
            objective = objective + self.settings.balance_coef * balance.to(objective.device)
        z_loss = None
        if self.settings.z_coef > 0:
            z_loss = router_z_loss(self._logits)
            objective = objective + self.settings.z_coef * z_loss.to(objective.device)
        self._logits.clear()
        return objective, next_token, balance, z_loss, load

    def _train_step(self, step: int) -> list[float]:
        import torch

        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        self.model.train()
        objective, next_token, balance, z_loss, load = self._losses(self.batch(step))
        objective.backward()
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.masters, self.settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        z_value = z_loss.detach() if z_loss is not None else torch.full((), math.nan, device=balance.device)
        parts = [objective.detach(), next_token.detach(), balance.detach(), z_value]
        stats = torch.cat([torch.stack([p.float().to(load.device) for p in parts]), load.detach()])
        return stats.tolist()  # the step's one device-to-host copy

    def _guarded(self, action: Any, *args: Any) -> Any:
        """Run a step; on running out of memory, retry once with activation checkpointing, then explain."""
        while True:
            try:
                return action(*args)
            except (RuntimeError, MemoryError) as exc:
                if not _is_out_of_memory(exc) and not isinstance(exc, MemoryError):
                    raise
                self._logits.clear()
                self.optimizer.zero_grad(set_to_none=True)
                if self.checkpointing:
                    raise _out_of_memory_error(self.settings, str(self.device)) from exc
            self._enable_checkpointing()

    def validation_loss(self) -> float:
        """Mean next-token loss over the validation sequences (all of one length, so batch means average)."""
        import torch

        self.model.eval()
        sequences = self.packed.validation
        size = self.settings.batch_size
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for start in range(0, sequences.shape[0], size):
                check_cancel(self.cancel)
                batch = sequences[start : start + size].to(self.device)
                self._logits.clear()
                total += causal_lm_loss(self.model, batch).float().to(self.device) * batch.shape[0]
        self._logits.clear()
        return float(total) / sequences.shape[0]

    def _evaluate(self) -> TrainingProgress:
        value = self._guarded(self.validation_loss)
        self.last_val_loss = value
        if value < self.best_val_loss - IMPROVEMENT:
            self.best_val_loss = value
            self.best_step = self.step
            self.best = [master.detach().clone() for master in self.masters]
            self.bad_evaluations = 0
        else:
            self.bad_evaluations += 1
            patience = self.settings.patience
            self.stopped_early = patience is not None and self.bad_evaluations >= patience
        record = TrainingProgress(
            "validate",
            self.step,
            self.planned,
            step=self.step,
            val_loss=value,
            message=f"validation loss {value:.4f} after {self.step} steps",
        )
        self.history.append(record)
        return record

    def train(self) -> Job[None]:
        """The training loop: a "train" record each step, a "validate" record each evaluation."""
        import time

        try:
            if self.step == 0:
                check_cancel(self.cancel)
                yield TrainingProgress("validate", 0, self.planned, message="validation loss before training")
                self.initial_val_loss = self._guarded(self.validation_loss)
                record = TrainingProgress(
                    "validate", 0, self.planned, step=0, val_loss=self.initial_val_loss,
                    message=f"validation loss before training {self.initial_val_loss:.4f}",
                )
                self.history.append(record)
                yield record
            while self.step < self.planned and not self.stopped_early:
                check_cancel(self.cancel)
                started = time.perf_counter()
                stats = self._guarded(self._train_step, self.step)
                seconds = time.perf_counter() - started
                self.step += 1
                self.train_seconds += seconds
                self.tokens_trained_here += self.settings.tokens_per_step
                record = self._train_record(stats)
                self.history.append(record)
                yield record
                last = self.step == self.planned
                if self.step % self.settings.eval_every == 0 or last:
                    yield self._evaluate()
                every = self.settings.checkpoint_every
                if every and self.step % every == 0 and not last and not self.stopped_early:
                    self.save_checkpoint()
        finally:
            for hook in self._hooks:
                hook.remove()

    def _train_record(self, stats: list[float]) -> TrainingProgress:
        objective, next_token, balance, z_loss = stats[:4]
        self.last_train_loss = next_token
        self.last_balance_loss = balance
        self.last_load = tuple(stats[4:])
        rate = self.tokens_trained_here / self.train_seconds if self.train_seconds > 0 else None
        return TrainingProgress(
            "train",
            self.step,
            self.planned,
            step=self.step,
            loss=objective,
            balance_loss=balance,
            z_loss=None if math.isnan(z_loss) else z_loss,
            expert_load=self.last_load,
            tokens_per_s=rate,
            message=f"step {self.step}/{self.planned}: loss {objective:.4f}",
        )

    # -- checkpoints

    def save_checkpoint(self) -> None:
        """Routers, best routers, optimiser state and random states (safetensors) and the rest (JSON), as one
        new ``step-N`` folder renamed into place; the older ones are removed after."""
        import torch
        from safetensors.torch import save_file

        folder = checkpoint_dir(self.out_dir)
        folder.mkdir(exist_ok=True)
        work = folder / f".work-{os.getpid()}-{secrets.token_hex(4)}"
        work.mkdir()
        try:
            tensors = {f"master.{i}": m.detach().float().cpu().contiguous() for i, m in enumerate(self.masters)}
            if self.best is not None:
                tensors |= {f"best.{i}": b.detach().float().cpu().contiguous() for i, b in enumerate(self.best)}
            for index, values in self.optimizer.state_dict()["state"].items():
                tensors |= {f"adam.{index}.{key}": value.detach().cpu().contiguous() for key, value in values.items()}
            tensors["rng.cpu"] = torch.get_rng_state()
            if self.device.type == "cuda":
                tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
            save_file(tensors, str(work / TENSORS_FILE))
            state = {
                "step": self.step,
                "planned_steps": self.planned,
                "settings": _settings_record(self.settings),
                "data": self._data_record,
                "data_fingerprint": self._fingerprint,
                "initial_val_loss": self.initial_val_loss,
                "last_val_loss": self.last_val_loss,
                "best_val_loss": self.best_val_loss,
                "best_step": self.best_step,
                "bad_evaluations": self.bad_evaluations,
                "last_train_loss": self.last_train_loss,
                "last_balance_loss": self.last_balance_loss,
                "last_load": list(self.last_load),
                "checkpointing": self.checkpointing,
                "history": [dataclasses.asdict(record) for record in self.history],
            }
            (work / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
            work.rename(folder / f"step-{self.step:09d}")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        for older in folder.iterdir():
            if older.name.startswith("step-") and older.name != f"step-{self.step:09d}":
                shutil.rmtree(older, ignore_errors=True)

    def restore(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: the same routers, optimiser, step, evaluations and random state."""
        import torch
        from safetensors.torch import load_file

        tensors = load_file(str(checkpoint / TENSORS_FILE))
        with torch.no_grad():
            for index, master in enumerate(self.masters):
                master.copy_(tensors[f"master.{index}"].to(master.device))
        if "best.0" in tensors:
            self.best = [tensors[f"best.{i}"].to(m.device) for i, m in enumerate(self.masters)]
        optimizer_state: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            if name.startswith("adam."):
                _, index, key = name.split(".", 2)
                optimizer_state.setdefault(int(index), {})[key] = value
        self.optimizer.load_state_dict(
            {"state": optimizer_state, "param_groups": self.optimizer.state_dict()["param_groups"]}
        )
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if state.get("checkpointing") and not self.checkpointing:
            self._enable_checkpointing()
        self.step = int(state["step"])
        self.initial_val_loss = float(state["initial_val_loss"])
        self.last_val_loss = float(state["last_val_loss"])
        self.best_val_loss = float(state["best_val_loss"])
        self.best_step = int(state["best_step"])
        self.bad_evaluations = int(state["bad_evaluations"])
        self.last_train_loss = float(state["last_train_loss"])
        self.last_balance_loss = state["last_balance_loss"]
        self.last_load = tuple(state["last_load"])
        self.history = [
            TrainingProgress(**(record | {"expert_load": tuple(record["expert_load"])})) for record in state["history"]
        ]

    # -- results

    def best_gates(self) -> dict[str, Any]:
        """Stored tensor name -> trained weight (float32, on the CPU): the best evaluated routers."""
        masters = self.best if self.best is not None else self.masters
        return {name: master.detach().float().cpu() for name, master in zip(self.gates, masters, strict=True)}

    def report(self, model_dir: Path, budget_message: str, fingerprint: str) -> dict[str, Any]:
        """What the run did, JSON-able: the CLI's --json, router-training.json in the model, the card's source."""
        train_records = [r for r in self.history if r.stage == "train"]
        return {
            "model": str(model_dir),
            "model_name": model_dir.name,
            "out_dir": str(self.out_dir),
            "settings": self.settings.model_dump(mode="json"),
            "budget": budget_message,
            "planned_steps": self.planned,
            "steps": self.step,
            "tokens": self.step * self.settings.tokens_per_step,
            "stopped_early": self.stopped_early,
            "best_step": self.best_step,
            "initial_val_loss": self.initial_val_loss,
            "final_val_loss": self.last_val_loss,
            "best_val_loss": self.best_val_loss,
            "final_train_loss": self.last_train_loss,
            "final_balance_loss": self.last_balance_loss,
            "expert_load": list(self.last_load),
            "tokens_per_s": self.tokens_trained_here / self.train_seconds if self.train_seconds > 0 else None,
            "activation_checkpointing": self.checkpointing,
            "trained_tensors": list(self.gates),
            "data": {
                "sources": list(self.packed.sources),
                "records": self.packed.records,
                "tokens": self.packed.tokens,
                "seq_len": self.packed.seq_len,
                "train_sequences": int(self.packed.train.shape[0]),
                "validation_sequences": int(self.packed.validation.shape[0]),
                "read_partly": self.packed.truncated,
                "fingerprint": fingerprint,
            },
            "history": {
                "step": [r.step for r in train_records],
                "loss": [r.loss for r in train_records],
                "balance_loss": [r.balance_loss for r in train_records],
                "validation": [[r.step, r.val_loss] for r in self.history if r.stage == "validate"],
            },
        }


def _out_of_memory_error(settings: RouterTrainingSettings, device: str) -> FrankenMoEError:
    """One error naming the settings that need less memory: activations grow with batch x sequence length."""
    options = []
    if settings.batch_size > 1:
        options.append(f"a batch size of {max(1, settings.batch_size // 2)} (--batch-size)")
    if settings.seq_len > 64:
        options.append(f"a sequence length of {settings.seq_len // 2} (--seq-len)")
    if settings.load != "4bit" and device.startswith("cuda"):
        options.append("4-bit weights (--load 4bit)")
    hint = "try " + ", or ".join(options) if options else "free some memory, or use a smaller model"
    return FrankenMoEError(
        f"router training ran out of memory on {device} with batches of {settings.batch_size} x {settings.seq_len} "
        "tokens, even with activation checkpointing; nothing was written",
        hint,
    )
