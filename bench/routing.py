"""Routing-quality benchmark: how well each gate mode sends held-out text to the intended expert.

Builds four tiny domain experts (arithmetic, Python code, English prose, French), trained briefly
on clearly different text, and a recipe with a few positive prompts per expert (three or four
written by hand, plus --extra-prompts drawn from the domain). Separate held-out
prompts, generated from the same domains with another seed, are then run through each merged
model with transformers, and the share of tokens and prompts routed to their expert (majority
over layers) is printed side by side for every gate mode, with the calibrated fit's time.

The models (hidden size 128, 6 layers) train in about 15 minutes on 2 busy cores and are cached.
Run from the repository root: python bench/routing.py [--held-out 12] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.core.demo import DEMO_DOMAINS, RECIPE_NAME, Domain, train_domain_models  # noqa: E402
from app.core.merge.pipeline import MergeOptions, merge_moe  # noqa: E402
from app.core.progress import run_job  # noqa: E402
from app.core.recipe import GATE_MODES, Recipe, load_recipe  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held-out", type=int, default=12, help="held-out prompts per expert")
    parser.add_argument("--extra-prompts", type=int, default=8, help="generated positive prompts per expert")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "routing")
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--expert-steps", type=int, default=200)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()

    models = args.workdir / f"models-{args.hidden_size}x{args.layers}"
    if not (models / RECIPE_NAME).is_file():
        shutil.rmtree(models, ignore_errors=True)
        started = time.perf_counter()
        run_job(
            train_domain_models(
                models,
                DOMAINS,
                base_steps=args.base_steps,
                expert_steps=args.expert_steps,
                seed=2024,
                hidden_size=args.hidden_size,
                num_layers=args.layers,
            )
        )
        print(f"trained base and {len(DOMAINS)} experts in {time.perf_counter() - started:.0f} s")
    recipe = with_more_positive_prompts(load_recipe(models / RECIPE_NAME), args.extra_prompts, seed=7)
    prompts = held_out_prompts(args.held_out, seed=99)
    print(
        f"{len(DOMAINS)} experts, top-{recipe.experts_per_token}; "
        f"{len(recipe.experts[0].positive_prompts)} positive and {args.held_out} held-out prompts per expert"
    )
    print(f"{'gate mode':15s} {'tokens':>7s} {'prompts':>8s} {'layers (tokens)':>28s}  usage")
    results = {}
    for mode in MODES:
        out = args.workdir / f"moe-{mode}-{args.hidden_size}x{args.layers}"
        merged = run_job(merge_moe(recipe.model_copy(update={"gate_mode": mode}), MergeOptions(out, overwrite=True)))
        quality = run_job(evaluate_model_routing(out, prompts, device="cpu")).quality
        results[mode] = quality
        layers = " ".join(f"{share:4.0%}" for share in quality.layer_token_share)
        usage = " ".join(f"{share:.0%}" for share in quality.usage)
        fit = f"  (fitted in {merged.gates.fit_seconds:.2f} s)" if merged.gates.fit_seconds is not None else ""
        print(f"{mode:15s} {quality.token_share:7.1%} {quality.prompt_share:8.1%} {layers:>28s}  {usage}{fit}")
    gain = results["calibrated"].token_share - results["hidden"].token_share
    print(f"calibrated vs hidden: {gain * 100:+.1f} points of held-out tokens")


if __name__ == "__main__":
    main()
