"""Demo benchmark: how long the demo takes to build, and whether its experts stay distinct.

Builds the demo (app.core.demo.build_demo) from scratch into a temporary folder with the app's
training steps, or with --base-steps / --expert-steps, and prints the wall time, then what makes the
demo worth having: each expert's loss on every domain's held-out text (an expert should be best on
its own domain, its row's diagonal), and where the merged model routes the demo's test prompts.

Run from the repository root: python bench/demo.py [--base-steps N] [--expert-steps N]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.core.demo import BASE_STEPS, DEMO_DOMAINS, EXPERT_STEPS, build_demo  # noqa: E402
from app.core.merge.pipeline import MergeOptions, merge_moe  # noqa: E402
from app.core.progress import run_job  # noqa: E402
from app.core.recipe import load_recipe  # noqa: E402
from app.core.routing_eval import evaluate_model_routing  # noqa: E402


def domain_losses(model_dir: Path, texts: dict[str, list[str]]) -> dict[str, float]:
    """Mean next-token loss of the model in model_dir on each domain's texts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    losses = {}
    with torch.no_grad():
        for name, samples in texts.items():
            values = []
            for text in samples:
                batch = tokenizer(text, return_tensors="pt")
                values.append(model(**batch, labels=batch["input_ids"]).loss.item())
            losses[name] = sum(values) / len(values)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-steps", type=int, default=BASE_STEPS)
    parser.add_argument("--expert-steps", type=int, default=EXPERT_STEPS)
    parser.add_argument("--held-out", type=int, default=20, help="held-out texts per domain for the losses")
    args = parser.parse_args()
    from transformers.utils import logging

    logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="frankenmoe-bench-demo-") as tmp:
        started, cpu_started = time.perf_counter(), time.process_time()
        recipe_path = run_job(build_demo(Path(tmp), base_steps=args.base_steps, expert_steps=args.expert_steps))
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        # CPU time (all threads) changes less than wall time with the load of a shared machine.
        print(
            f"demo built in {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU "
            f"({args.base_steps} base steps, {args.expert_steps} per expert)"
        )

        rng = random.Random(99)
        texts = {name: [domain.make_text(rng) for _ in range(args.held_out)] for name, domain in DEMO_DOMAINS.items()}
        names = list(DEMO_DOMAINS)
        print("held-out loss  " + " ".join(f"{name:>10s}" for name in names))
        folder = recipe_path.parent
        rows = {}
        for model in ["base", *(f"expert-{name}" for name in names)]:
            rows[model] = domain_losses(folder / model, texts)
            print(f"{model:14s} " + " ".join(f"{rows[model][name]:10.3f}" for name in names))
        # Distinct experts: on each domain's text, that domain's expert has the lowest loss of all experts.
        own_best = sum(min(names, key=lambda expert: rows[f"expert-{expert}"][name]) == name for name in names)
        print(f"domains whose own expert has the lowest loss: {own_best} of {len(names)}")

        recipe = load_recipe(recipe_path)
        merged = Path(tmp) / "merged"
        run_job(merge_moe(recipe, MergeOptions(merged)))
        prompts = [list(extras.test_prompts) for extras in recipe.studio.experts]
        quality = run_job(evaluate_model_routing(merged, prompts, device="cpu")).quality
        print(f"routing of the demo's test prompts: {quality.summary()}")


if __name__ == "__main__":
    main()
