"""Mean next-token loss (NLL) and perplexity of models on datasets, one model in memory at a time.

Scoring rule (stated in every report, see :data:`SCORING`): each record is scored on its own, with no
packing across records, exactly as transformers computes the loss with ``labels=input_ids`` on the
tokenizer's default encoding (its BOS included, the BOS itself not predicted); chat records are the
model's chat template rendered to text and encoded without adding special tokens again; padding is
masked (left or right, positions counted from each record's first token); a record longer than the
model's context is cut to it. A dataset's figure is token-weighted: the summed NLL of all predicted
tokens over their count; perplexity is exp of that.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.chat.capture import RouterCapture
from app.core.eval.controls import RoutingOverride, model_num_experts, routing_override, validate_override
from app.core.eval.data import EvalDataset
from app.core.eval.harness import HarnessRequest, check_tasks, known_tasks, run_harness
from app.core.eval.routing_stats import DatasetRouting, RoutingCounts, confusion, dataset_routing
from app.core.problems import FrankenMoEError
from app.core.progress import Job, Progress, check_cancel, relabelled

if TYPE_CHECKING:
    from app.core.recipe import ModelRef, Recipe


SCORING = (
    "mean next-token negative log-likelihood per predicted token (nats), each record scored on its own "
    "(no packing) as transformers computes the loss with labels=input_ids on the tokenizer's default "
    "encoding (BOS included, BOS itself not predicted), chat records rendered with the model's chat "
    "template, padding masked, records cut to the model's context; dataset figures are token-weighted; "
    "ppl = exp(nll)"
)


@dataclass(frozen=True, slots=True)
class EvalModel:
    """A model to evaluate: ``name`` is "moe", "base" or the donor's source as written in the recipe."""

    name: str
    path: str  # a local folder or a Hub id already in the cache


@dataclass(frozen=True, slots=True)
class EvalRequest:
    """What to evaluate. Several overrides make a k sweep; they apply to MoE models only (dense models
    are scored once, with the default override)."""

    models: tuple[EvalModel, ...]
    datasets: tuple[EvalDataset, ...]
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    padding_side: str = "right"
    overrides: tuple[RoutingOverride, ...] = (RoutingOverride(),)
    trust_remote_code: bool = False
    cache_dir: Path | None = None  # the Hub cache for models given as Hub ids
    # lm-eval tasks, run on each model while it is loaded (under each override for an MoE); needs the eval extra.
    harness: HarnessRequest | None = None


@dataclass(frozen=True, slots=True)
class NllResult:
    model: str
    dataset: str
    override: RoutingOverride
    nll: float
    ppl: float
    tokens: int

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dataset": self.dataset,
            "override": self.override.to_json(),
            "nll": self.nll,
            "ppl": self.ppl,
            "tokens": self.tokens,
        }


@dataclass
class EvalReport:
    scoring: str
    results: list[NllResult]
    # model name -> override label -> {"experts": labels, "datasets": {name: stats}, "confusion": {...}}
    routing: dict[str, Any] = field(default_factory=dict)
    lm_eval: dict[str, Any] | None = None
    models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    # lm-eval's own results per (model, override), as lm-eval returns them, for saving beside the report.
    lm_eval_runs: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The CLI's ``--json`` layout: scoring, models, datasets, results, routing, lm_eval."""
        return {
            "scoring": self.scoring,
            "models": list(self.models),
            "datasets": list(self.datasets),
            "results": [result.to_json() for result in self.results],
            "routing": self.routing,
            "lm_eval": self.lm_eval,
        }


@dataclass
class ModelScores:
    """What scoring one loaded model gives: a result per (dataset, override), and routing for an MoE."""

    results: list[NllResult]
    routing: dict[str, Any]  # override label -> routing section (empty for a dense model)


def score_loaded_model(
    model: Any,
    tokenizer: Any,
    datasets: Sequence[EvalDataset],
    *,
    model_name: str = "model",
    overrides: Sequence[RoutingOverride] = (RoutingOverride(),),
    batch_size: int = 8,
    padding_side: str = "right",
    expert_labels: tuple[str, ...] | None = None,
    cancel: threading.Event | None = None,
) -> Job[ModelScores]:
    """Score a model the app already has loaded (the chat's, for instance) on every dataset.

    A generator of Progress records (stage "scoring") returning :class:`ModelScores`; checks
    ``cancel`` between batches. Routing statistics come from the same forward pass. A dense model is
    scored once, with the default override, whatever ``overrides`` holds.
    """
    _check_settings(batch_size, padding_side)
    num_experts = model_num_experts(model)
    runs = list(dict.fromkeys(overrides)) if num_experts else [RoutingOverride()]
    for override in runs:
        validate_override(override, num_experts)
    labels = expert_labels or tuple(f"expert {i}" for i in range(num_experts))
    encoded = [_encode_dataset(tokenizer, dataset, _context_length(model)) for dataset in datasets]
    silent = [d.name for d, records in zip(datasets, encoded, strict=True) if not any(len(r) > 1 for r in records)]
    if silent:
        raise FrankenMoEError(
            f"dataset {', '.join(silent)} has no token to predict: every record encodes to one token or none",
            "give records of at least a few words",
        )
    batches_per_run = sum(-(-len(records) // batch_size) for records in encoded)
    total = batches_per_run * len(runs)
    done = 0
    results: list[NllResult] = []
    routing: dict[str, Any] = {}
    yield Progress("scoring", 0, total, message=f"{model_name}")
    for override in runs:
        per_dataset: list[DatasetRouting] = []
        with routing_override(model, override):
            capture = RouterCapture(model) if num_experts else None
            try:
                for dataset, records in zip(datasets, encoded, strict=True):
                    counts = RoutingCounts(capture.layers, num_experts) if capture is not None else None
                    nll_sum, tokens = 0.0, 0
                    for start in range(0, len(records), batch_size):
                        check_cancel(cancel)
                        batch = records[start : start + batch_size]
                        batch_nll, batch_tokens = _score_batch(model, batch, padding_side, capture, counts)
                        nll_sum += batch_nll
                        tokens += batch_tokens
                        done += 1
                        yield Progress("scoring", done, total, message=f"{model_name} on {dataset.name}")
                    nll = nll_sum / tokens  # every dataset has a token to predict: checked above
                    results.append(NllResult(model_name, dataset.name, override, nll, _ppl(nll), tokens))
                    if counts is not None:
                        per_dataset.append(dataset_routing(dataset.name, counts))
            finally:
                if capture is not None:
                    capture.remove()
        if num_experts:
            routing[override.label()] = {
                "override": override.to_json(),
                "experts": list(labels),
                "datasets": {r.dataset: r.to_json() for r in per_dataset},
                "confusion": confusion(per_dataset, labels),
            }
    return ModelScores(results=results, routing=routing)


def _check_settings(batch_size: int, padding_side: str) -> None:
    if batch_size < 1:
        raise FrankenMoEError(f"a batch size of {batch_size} is not possible", "use a batch size of 1 or more")
    if padding_side not in ("left", "right"):
        raise FrankenMoEError(f"padding side {padding_side!r} is unknown", 'use "left" or "right"')


def _ppl(nll: float) -> float:
    try:
        return math.exp(nll)
    except OverflowError:
        return float("inf")


def _context_length(model: Any) -> int | None:
    config = getattr(model.config, "text_config", None) or model.config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def _encode_dataset(tokenizer: Any, dataset: EvalDataset, context: int | None) -> list[list[int]]:
    """Token ids of each record, longest first (order does not change the token-weighted figure)."""
    encoded = []
    for record in dataset.records:
        if isinstance(record, str):
            ids = list(tokenizer(record)["input_ids"])
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise FrankenMoEError(
                    f"dataset {dataset.name} holds conversations, but this model's tokenizer has no chat template",
                    "give plain text records for this model, or use a model with a chat template",
                )
            text = tokenizer.apply_chat_template(list(record), tokenize=False)
            # The template writes the special tokens itself; adding them again would double the BOS.
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if context is not None:
            ids = ids[:context]
        if ids:
            encoded.append(ids)
    return sorted(encoded, key=len, reverse=True)


def _score_batch(
    model: Any,
    batch: list[list[int]],
    padding_side: str,
    capture: RouterCapture | None,
    counts: RoutingCounts | None,
) -> tuple[float, int]:
    """Summed NLL of the predicted tokens of a batch and their count; routing counted on the way."""
    import torch

    device = model.get_input_embeddings().weight.device
    width = max(len(ids) for ids in batch)
    input_ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids)
        mask[row, span] = 1
    # Left padding needs the mask, and positions counted from each record's own first token. Right
    # padding needs neither: attention is causal, so a real token only ever sees the real tokens
    # before it; without a mask, attention takes its faster causal-only path.
    masking: dict[str, Any] = {}
    if padding_side == "left":
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        masking = {"attention_mask": mask.to(device), "position_ids": positions.to(device)}
    with torch.inference_mode():
        if capture is not None:
            capture.begin_step()
            capture.enabled = True
        try:
            output = model(input_ids=input_ids.to(device), use_cache=False, **masking)
        finally:
            if capture is not None:
                capture.enabled = False
        if capture is not None and counts is not None:
            step = capture.finish_step()
            real = mask.reshape(-1).bool().numpy()
            counts.add(step.probs[real].argmax(axis=-1))
        nll_sum = 0.0
        tokens = 0
        for row in range(len(batch)):
            keep = mask[row].bool()
            logits = output.logits[row][keep.to(output.logits.device)]
            targets = input_ids[row][keep].to(logits.device)
            if len(targets) < 2:
                continue
            # As transformers' loss: logits in float32, position t predicts token t + 1.
            losses = torch.nn.functional.cross_entropy(logits[:-1].float(), targets[1:], reduction="sum")
            nll_sum += float(losses)
            tokens += len(targets) - 1
    return nll_sum, tokens


def evaluate(request: EvalRequest, cancel: threading.Event | None = None) -> Job[EvalReport]:
    """Load each model in turn, score it on every dataset, free it; returns the :class:`EvalReport`.

    Yields Progress records like the merge ("loading <model>", "scoring <model>") and raises
    Cancelled between batches once ``cancel`` is set. Bad input raises FrankenMoEError before any
    model is loaded where it can be told beforehand (settings, empty datasets, overrides against the
    expert count in each MoE's config.json).
    """
    from app.core.chat.loading import LoadRequest, load_chat_model

    if not request.models:
        raise FrankenMoEError("there is no model to evaluate", "name at least one model")
    if not request.datasets and request.harness is None:
        raise FrankenMoEError(
            "there is no dataset to evaluate on", "give a data file, a recipe, a Hub dataset or lm-eval tasks"
        )
    empty = [d.name for d in request.datasets if not d.records]
    if empty:
        raise FrankenMoEError(f"dataset {', '.join(empty)} holds no records", "give at least one text per dataset")
    _check_settings(request.batch_size, request.padding_side)
    any_moe = False
    for model in request.models:
        config = read_model_config(model.path, request.cache_dir)
        _check_causal_lm(model.path, config)
        experts = configured_experts(config)
        any_moe = any_moe or bool(experts)
        if experts:
            for override in request.overrides:
                validate_override(override, experts)
    if not any_moe and any(not o.is_default for o in request.overrides):
        raise FrankenMoEError(
            "none of the models has experts, so experts per token and switched-off experts do not apply",
            "evaluate without --top-k and --disable-expert, or include a mixture-of-experts model",
        )
    task_manager = None
    if request.harness is not None:
        # Unknown tasks are found before any model is loaded, not after minutes of scoring.
        yield Progress("lm-eval", 0, 1, message="Indexing lm-eval tasks")
        task_manager = known_tasks(request.harness.include_path)
        check_tasks(task_manager, request.harness.tasks)
    report = EvalReport(
        scoring=SCORING,
        results=[],
        models=[m.name for m in request.models],
        datasets=[d.name for d in request.datasets],
    )
    for model in request.models:
        check_cancel(cancel)
        load = LoadRequest(
            model=model.path,
            device=request.device,
            dtype=None if request.dtype == "auto" else request.dtype,
            trust_remote_code=request.trust_remote_code,
            cache_dir=request.cache_dir,
        )
        chat = yield from relabelled(load_chat_model(load, cancel), f"loading {model.name}")
        try:
            scores = yield from relabelled(
                score_loaded_model(
                    chat.model,
                    chat.tokenizer,
                    request.datasets,
                    model_name=model.name,
                    overrides=request.overrides,
                    batch_size=request.batch_size,
                    padding_side=request.padding_side,
                    expert_labels=chat.legend.labels if chat.is_moe else None,
                    cancel=cancel,
                ),
                f"scoring {model.name}",
            )
            if request.harness is not None:
                yield from _run_harness(chat, model.name, request, task_manager, report, cancel)
        finally:
            chat.unload()
            del chat
        report.results.extend(scores.results)
        if scores.routing:
            report.routing[model.name] = scores.routing
    return report


def _run_harness(
    chat: Any, name: str, request: EvalRequest, task_manager: Any, report: EvalReport, cancel: threading.Event | None
) -> Job[None]:
    """lm-eval on a loaded model, under each override for an MoE; results go into the report."""
    assert request.harness is not None
    overrides = list(dict.fromkeys(request.overrides)) if chat.is_moe else [RoutingOverride()]
    if report.lm_eval is None:
        report.lm_eval = {
            "tasks": list(request.harness.tasks),
            "limit": request.harness.limit,
            "num_fewshot": request.harness.num_fewshot,
            "results": [],
        }
    for override in overrides:
        with routing_override(chat.model, override):
            result = yield from relabelled(
                run_harness(chat.model, chat.tokenizer, request.harness, cancel, task_manager), f"lm-eval {name}"
            )
        for task, metrics in result.summary.items():
            report.lm_eval["results"].append(
                {"model": name, "override": override.to_json(), "task": task, "metrics": metrics}
            )
        report.lm_eval_runs.append({"model": name, "override": override.to_json(), "results": result.results})


def read_model_config(path: str, cache_dir: Path | None = None) -> dict[str, Any]:
    """A model's config.json, or {} when it cannot be read here (loading then names what is wrong)."""
    from app.core.recipe import ModelRef
    from app.core.sources import read_json_file, resolve_model_dir

    try:
        folder = resolve_model_dir(ModelRef.parse(path), cache_dir)
        config = read_json_file(folder / "config.json")
    except (FrankenMoEError, OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


# Class name endings of the heads that predict the next token.
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _check_causal_lm(path: str, config: dict[str, Any]) -> None:
    """Refuse a model whose saved architecture has no next-token head (an encoder, a classifier)."""
    architectures = config.get("architectures") or []
    if architectures and not any(str(a).endswith(_CAUSAL_HEADS) for a in architectures):
        raise FrankenMoEError(
            f"{path} holds a {', '.join(map(str, architectures))}, not a causal language model, so it has "
            "no next-token loss to measure",
            "evaluate a model saved as a causal LM (its config's architectures ends in ForCausalLM)",
        )


def configured_experts(config: dict[str, Any]) -> int:
    """The routed experts a model's config declares (0 when dense or unknown)."""
    text = config.get("text_config", config)
    return int(text.get("num_local_experts") or text.get("num_experts") or 0)


def configured_top_k(config: dict[str, Any]) -> int | None:
    """The experts per token a model's config declares, or None (dense or unknown)."""
    value = config.get("text_config", config).get("num_experts_per_tok")
    return value if isinstance(value, int) else None


def comparison_models(moe_folder: Path, recipe: Recipe | None = None) -> tuple[EvalModel, ...]:
    """The MoE, its base and every donor, from ``recipe`` or else the recipe the merge saved beside the model.

    Names are "moe", "base" and each donor's ``source_model`` exactly as the recipe writes it; a
    model the recipe names twice (the base also as an expert, say) is evaluated once, under its
    first name. Shared experts count as donors.
    """
    from app.core.merge.pipeline import RECIPE_FILENAME
    from app.core.recipe import load_recipe

    if recipe is None:
        path = Path(moe_folder) / RECIPE_FILENAME
        if not path.is_file():
            raise FrankenMoEError(
                f"{moe_folder} has no {RECIPE_FILENAME}, so its base and donors are not known",
                "evaluate a folder this app merged (it saves its recipe there), or compare without the donors",
            )
        recipe = load_recipe(path)
    models = [EvalModel("moe", str(moe_folder))]
    seen = {str(Path(moe_folder).resolve())}
    donors = [("base", recipe.base_model)]
    donors += [(str(expert.source_model), expert.source_model) for expert in (*recipe.experts, *recipe.shared_experts)]
    for name, reference in donors:
        path = _donor_path(reference, Path(moe_folder))
        key = str(Path(path).resolve()) if reference.is_local else path
        if key not in seen:
            seen.add(key)
            models.append(EvalModel(name, path))
    return tuple(models)


def _donor_path(reference: ModelRef, recipe_dir: Path) -> str:
    """A donor as the loader takes it: a relative local path is read from the recipe's folder if it is there."""
    if not reference.is_local:
        return str(reference)
    path = Path(reference.path).expanduser()
    if not path.is_absolute() and not path.exists() and (recipe_dir / path).exists():
        path = recipe_dir / path
    return str(path)
