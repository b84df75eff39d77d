"""Routing-quality benchmark: how well each gate mode sends held-out text to the intended expert.

Builds four tiny domain experts (arithmetic, Python code, English prose, French), trained briefly
on clearly different text, and a recipe with a few positive prompts per expert (three or four
written by hand, plus --extra-prompts drawn from the domain). Separate held-out
prompts, generated from the same domains with another seed, are then run through each merged
model with transformers, and the share of tokens and prompts routed to their expert (majority
over layers) is printed side by side for every gate mode, with the calibrated fit's time. A second
table gives, for every gate mode and for oracle routing (each held-out token forced to its domain's
expert alone), the held-out next-token loss, the routing accuracy and the normalised routing entropy
(bench/router_training.py adds routers trained by the core trainer to that table).

The models (hidden size 128, 6 layers) train in 156 s on a free core (up to 15 min on busy cores), cached.
Run from the repository root: python bench/routing.py [--held-out 12] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.core.demo import DEMO_DOMAINS, RECIPE_NAME, Domain, train_domain_models  # noqa: E402
from app.core.merge.pipeline import MergeOptions, MergeResult, merge_moe  # noqa: E402
from app.core.progress import run_job  # noqa: E402
from app.core.recipe import GATE_MODES, Recipe, load_recipe  # noqa: E402
from app.core.routing import PromptRouting, evaluate_routing  # noqa: E402
from app.core.routing_eval import evaluate_model_routing  # noqa: E402


def _french(rng: random.Random) -> str:
    subject = rng.choice(["Le vieux pecheur", "Ma grand-mere", "Une petite fille", "Le voyageur", "Notre voisin"])
    verb = rng.choice(["marchait le long de", "chantait pres de", "revait de", "peignait", "se souvenait de"])
    place = rng.choice(["la riviere", "la colline verte", "un petit village", "la foret", "la mer"])
    tail = rng.choice(["au coucher du soleil.", "en souriant.", "il y a longtemps.", "avec joie.", "le matin."])
    return f"{subject} {verb} {place} {tail}"


DOMAINS = {
    **DEMO_DOMAINS,
    "french": Domain(
        _french,
        "French",
        "#CC79A7",
        ("Le chat dort sur la table.", "Ma mere chantait le matin.", "Il y a longtemps, au village."),
        ("Notre voisin revait de la mer.",),
    ),
}
MODES = [mode for mode in GATE_MODES if mode != "hidden_last"]  # hidden_last is hidden's alias
HELD_OUT_SEED = 99  # the held-out prompts; the models train on seed 2024's text, extra positive prompts use 7


def held_out_prompts(count: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[domain.make_text(rng) for _ in range(count)] for domain in DOMAINS.values()]


def with_more_positive_prompts(recipe: Recipe, count: int, seed: int) -> Recipe:
    """Each expert's hand-written prompts plus `count` more drawn from its domain (never the held-out ones)."""
    rng = random.Random(seed)
    experts = tuple(
        expert.model_copy(
            update={"positive_prompts": (*domain.positive_prompts, *(domain.make_text(rng) for _ in range(count)))}
        )
        for expert, domain in zip(recipe.experts, DOMAINS.values(), strict=True)
    )
    return recipe.model_copy(update={"experts": experts})


def domain_models(
    workdir: Path, *, hidden_size: int, layers: int, base_steps: int, expert_steps: int
) -> Path:
    """The folder of the four domain models and their recipe, trained on the first call and cached."""
    models = workdir / f"models-{hidden_size}x{layers}"
    if not (models / RECIPE_NAME).is_file():  # the recipe is written last: its presence means complete
        shutil.rmtree(models, ignore_errors=True)
        started = time.perf_counter()
        run_job(
            train_domain_models(
                models,
                DOMAINS,
                base_steps=base_steps,
                expert_steps=expert_steps,
                seed=2024,
                hidden_size=hidden_size,
                num_layers=layers,
            )
        )
        print(f"trained base and {len(DOMAINS)} experts in {time.perf_counter() - started:.0f} s")
    return models


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the domain models, the recipe and the held-out prompts (shared by the benches)."""
    parser.add_argument("--held-out", type=int, default=12, help="held-out prompts per expert")
    parser.add_argument("--extra-prompts", type=int, default=8, help="generated positive prompts per expert")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "routing")
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--expert-steps", type=int, default=200)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)


def bench_recipe(args: argparse.Namespace) -> Recipe:
    models = domain_models(
        args.workdir,
        hidden_size=args.hidden_size,
        layers=args.layers,
        base_steps=args.base_steps,
        expert_steps=args.expert_steps,
    )
    return with_more_positive_prompts(load_recipe(models / RECIPE_NAME), args.extra_prompts, seed=7)


def merge_mode(recipe: Recipe, mode: str, args: argparse.Namespace) -> tuple[Path, MergeResult]:
    """Merge the bench recipe with one gate mode into the work folder (replacing an earlier merge)."""
    out = args.workdir / f"moe-{mode}-{args.hidden_size}x{args.layers}"
    merged = run_job(merge_moe(recipe.model_copy(update={"gate_mode": mode}), MergeOptions(out, overwrite=True)))
    return out, merged


@dataclass(frozen=True, slots=True)
class HeldOutScore:
    """How one model (or one way of routing it) does on the held-out prompts."""

    name: str
    token_share: float  # routing accuracy: held-out tokens whose majority expert over layers is the intended one
    prompt_share: float
    nll: float  # held-out next-token loss, nats per predicted token (the Evaluate page's scoring)
    tokens: int  # predicted tokens behind nll
    # The loss split: each prompt's first token, predicted from the BOS alone (whose routing cannot depend
    # on the domain, so no causal router can match oracle routing there), and the tokens after it.
    first_nll: float
    rest_nll: float
    entropy: float  # routing entropy of the per-expert load, per layer, over log(experts), mean over layers
    load: tuple[float, ...]  # share of the top-k choices each expert received, mean over layers


def score_held_out(
    model_dir: Path, prompts_by_expert: Sequence[Sequence[str]], *, name: str, oracle: bool = False
) -> HeldOutScore:
    """Routing accuracy, held-out loss and routing entropy of a merged model on labelled held-out prompts.

    With ``oracle`` each prompt's tokens are all forced to its domain's expert alone (top-1, the
    others switched off with the Evaluate page's routing override): the routing no causal router
    can beat on these prompts. The loss is the core's own scorer (one prompt at a time, BOS not
    predicted); routing is read from a hook placed after the override's, so it sees the routing used.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.core.chat.capture import find_routers
    from app.core.eval.controls import RoutingOverride, model_num_experts
    from app.core.eval.data import EvalDataset
    from app.core.eval.nll import score_loaded_model

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    num_experts = model_num_experts(model)
    routers = list(find_routers(model).values())
    captured: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in routers]  # layer -> (logits, top-k) per prompt

    def recorder(layer: int) -> Callable[[Any, Any, Any], None]:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            logits, _weights, chosen = output  # transformers 5 routers return logits, weights, indices
            captured[layer].append((logits.float().numpy(), chosen.numpy()))

        return hook

    first_token_nll: list[float] = []

    def first_token(_module: Any, inputs: Any, kwargs: dict[str, Any], output: Any) -> None:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else inputs[0]
        log_probs = torch.log_softmax(output.logits[0, 0].float(), dim=-1)
        first_token_nll.append(-float(log_probs[ids[0, 1]]))

    handles = [router.register_forward_hook(recorder(layer)) for layer, router in enumerate(routers)]
    handles.append(model.register_forward_hook(first_token, with_kwargs=True))
    skip = 1 if tokenizer.bos_token else 0  # as the routing preview: the BOS token is the same in every prompt
    routings: list[PromptRouting] = []
    nll_sum, tokens = 0.0, 0
    load = np.zeros((len(routers), num_experts))
    try:
        for expert, texts in enumerate(prompts_by_expert):
            others = frozenset(i for i in range(num_experts) if i != expert)
            override = RoutingOverride(top_k=1, disabled=others) if oracle else RoutingOverride()
            for per_layer in captured:
                per_layer.clear()
            dataset = EvalDataset(f"expert {expert}", tuple(texts))
            scores = run_job(score_loaded_model(model, tokenizer, [dataset], overrides=[override], batch_size=1))
            (result,) = scores.results
            nll_sum += result.nll * result.tokens
            tokens += result.tokens
            for prompt in range(len(captured[0])):
                logits = np.stack([captured[layer][prompt][0] for layer in range(len(routers))])[:, skip:]
                shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
                routings.append(PromptRouting("", expert, shifted / shifted.sum(axis=-1, keepdims=True)))
                for layer in range(len(routers)):
                    chosen = captured[layer][prompt][1][skip:].ravel()
                    load[layer] += np.bincount(chosen, minlength=num_experts)[:num_experts]
    finally:
        for handle in handles:
            handle.remove()
    quality = evaluate_routing(routings, num_experts)
    shares = load / load.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        layer_entropy = -np.where(shares > 0, shares * np.log(shares), 0.0).sum(axis=1) / math.log(num_experts)
    return HeldOutScore(
        name=name,
        token_share=quality.token_share,
        prompt_share=quality.prompt_share,
        nll=nll_sum / tokens,
        first_nll=sum(first_token_nll) / len(first_token_nll),
        rest_nll=(nll_sum - sum(first_token_nll)) / (tokens - len(first_token_nll)),
        tokens=tokens,
        entropy=float(layer_entropy.mean()),
        load=tuple(float(share) for share in shares.mean(axis=0)),
    )


TABLE_HEADER = (
    f"{'routing':22s} {'accuracy':>8s} {'prompts':>8s} {'loss':>7s} {'1st tok':>7s} {'rest':>7s} {'entropy':>8s}"
    "  load per expert"
)


def table_row(score: HeldOutScore) -> str:
    load = " ".join(f"{share:4.0%}" for share in score.load)
    return (
        f"{score.name:22s} {score.token_share:8.1%} {score.prompt_share:8.1%} {score.nll:7.3f} "
        f"{score.first_nll:7.3f} {score.rest_nll:7.3f} {score.entropy:8.3f}  {load}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    args = parser.parse_args()
    from transformers.utils import logging

    logging.disable_progress_bar()  # the per-model loading bars would drown the tables

    recipe = bench_recipe(args)
    prompts = held_out_prompts(args.held_out, seed=HELD_OUT_SEED)
    print(
        f"{len(DOMAINS)} experts, top-{recipe.experts_per_token}; "
        f"{len(recipe.experts[0].positive_prompts)} positive and {args.held_out} held-out prompts per expert"
    )
    print(f"{'gate mode':15s} {'tokens':>7s} {'prompts':>8s} {'layers (tokens)':>28s}  usage")
    results = {}
    scores = []
    for mode in MODES:
        out, merged = merge_mode(recipe, mode, args)
        quality = run_job(evaluate_model_routing(out, prompts, device="cpu")).quality
        results[mode] = quality
        layers = " ".join(f"{share:4.0%}" for share in quality.layer_token_share)
        usage = " ".join(f"{share:.0%}" for share in quality.usage)
        fit = f"  (fitted in {merged.gates.fit_seconds:.2f} s)" if merged.gates.fit_seconds is not None else ""
        print(f"{mode:15s} {quality.token_share:7.1%} {quality.prompt_share:8.1%} {layers:>28s}  {usage}{fit}")
        scores.append(score_held_out(out, prompts, name=mode))
        if mode == "hidden":
            scores.append(score_held_out(out, prompts, name="oracle", oracle=True))
    gain = results["calibrated"].token_share - results["hidden"].token_share
    print(f"calibrated vs hidden: {gain * 100:+.1f} points of held-out tokens")
    print(f"\nheld-out next-token loss (nats per token) and normalised routing entropy\n{TABLE_HEADER}")
    for score in scores:
        print(table_row(score))


if __name__ == "__main__":
    main()
