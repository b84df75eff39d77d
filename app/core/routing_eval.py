"""Routing quality of a merged model: held-out prompts run through transformers, router by router."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from app.core.devices import resolve_device
from app.core.imports import TRANSFORMERS_IMPORT_LOCK
from app.core.problems import FrankenMoEError
from app.core.progress import Job, Progress, check_cancel
from app.core.recipe import parse_recipe
from app.core.routing import MisroutedPrompt, PromptRouting, RoutingQuality, evaluate_routing, misrouted_prompts


@dataclass(frozen=True, slots=True)
class ModelRouting:
    labels: tuple[str, ...]
    routings: tuple[PromptRouting, ...]
    quality: RoutingQuality

    @property
    def misrouted(self) -> list[MisroutedPrompt]:
        """The prompts that went to another expert than intended, worst first."""
        return misrouted_prompts(self.routings)


def load_labelled_prompts(path: Path, labels: Sequence[str]) -> list[list[str]]:
    """Held-out prompts per expert, from a recipe's test prompts or a mapping of expert -> prompts.

    A mapping's keys are expert indices or the expert labels of the merged model's recipe.
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise FrankenMoEError(f"cannot read prompts from {path}: {exc}", "give a UTF-8 YAML file") from exc
    if isinstance(data, dict) and "experts" in data and "base_model" in data:
        recipe = parse_recipe(Path(path).read_text(encoding="utf-8"))
        prompts = [list(extras.test_prompts) for extras in recipe.studio.experts]
    elif isinstance(data, dict):
        prompts = [[] for _ in labels]
        for key, texts in data.items():
            index = key if isinstance(key, int) else (labels.index(key) if key in labels else None)
            if index is None or not 0 <= index < len(labels):
                raise FrankenMoEError(
                    f"{path}: {key!r} is not an expert of this model",
                    f"use expert indices 0-{len(labels) - 1} or the labels {', '.join(labels)}",
                )
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise FrankenMoEError(f"{path}: the prompts of {key!r} must be a list of strings", "fix the file")
            prompts[index].extend(texts)
    else:
        raise FrankenMoEError(
            f"{path} holds neither a recipe nor a mapping of experts to prompts",
            "write e.g.  maths: ['What is 17 times 23?']",
        )
    if not any(prompts):
        raise FrankenMoEError(f"{path} has no held-out prompts", "add test prompts for at least one expert")
    return prompts


def evaluate_model_routing(
    model_dir: Path,
    prompts_by_expert: Sequence[Sequence[str]],
    *,
    device: str = "auto",
    cancel: threading.Event | None = None,
) -> Job[ModelRouting]:
    """Run each held-out prompt through the merged model and score where its tokens were routed."""
    import torch
    with TRANSFORMERS_IMPORT_LOCK:
        from transformers import AutoModelForCausalLM

    from app.core.chat.trace import read_legend
    from app.core.prompt_tokens import load_prompt_tokenizer

    yield Progress("loading", 0, 1, message=f"loading {model_dir}")
    target = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False, dtype=torch.float32)
    model.to(target).eval()
    tokenizer = load_prompt_tokenizer(model_dir)  # the preview's tokenization, for comparable scores
    num_experts = getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", None)
    if not num_experts:
        raise FrankenMoEError(f"{model_dir} is not a mixture-of-experts model", "give a merged MoE folder")
    labelled = [(expert, text) for expert, texts in enumerate(prompts_by_expert) for text in texts if text.strip()]
    skip = 1 if tokenizer.bos_token else 0  # as in the preview: the BOS token is the same for every prompt
    routings = []
    for done, ((expert, text), ids) in enumerate(
        zip(labelled, tokenizer.encode([t for _, t in labelled]), strict=True)
    ):
        check_cancel(cancel)
        with torch.inference_mode():
            output = model(torch.tensor([ids], device=target), output_router_logits=True)
        logits = torch.stack([layer.reshape(len(ids), -1) for layer in output.router_logits])
        weights = torch.softmax(logits.float(), dim=-1)[:, skip:].cpu().numpy()
        routings.append(PromptRouting(text=text, intended_expert=expert, weights=weights))
        yield Progress("routing", done + 1, len(labelled))
    labels = read_legend(Path(model_dir), int(num_experts)).labels
    return ModelRouting(labels, tuple(routings), evaluate_routing(routings, int(num_experts)))
