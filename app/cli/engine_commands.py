"""`frankenmoe merge`, `frankenmoe check` and `frankenmoe eval-routing`."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from app.core.devices import DEVICE_CHOICES
from app.core.problems import Problem
from app.core.progress import format_bytes, run_job
from app.core.recipe import DTYPE_ALIASES, load_recipe
from app.core.routing import MisroutedPrompt, RoutingQuality, misrouted_prompts

DTYPES = sorted(set(DTYPE_ALIASES.values()))
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNITS = {
    **{unit: 10 ** (3 * power) for power, unit in enumerate(("", "k", "m", "g", "t"))},
    **{f"{unit}b": 10 ** (3 * power) for power, unit in enumerate(("", "k", "m", "g", "t"))},
    **{f"{unit}ib": 2 ** (10 * power) for power, unit in enumerate(("k", "m", "g", "t"), start=1)},
}


def parse_size(text: str) -> int:
    """Bytes from sizes such as 5GB, 500MB, 2GiB or a plain number of bytes."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5GB or 500MB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise argparse.ArgumentTypeError("the shard size must be at least one byte")
    return size


def register(commands: Any) -> None:
    what = "merge a recipe into an MoE model folder (Mixtral, Qwen2-MoE or Qwen3-MoE, from the recipe's architecture)"
    merge = commands.add_parser("merge", help=what, description=what[0].upper() + what[1:] + ".")
    merge.add_argument("recipe", type=Path, help="mergekit-moe YAML recipe")
    merge.add_argument("out", type=Path, help="output folder (created; must be new or empty)")
    merge.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="where to compute gates")
    merge.add_argument("--gate-dtype", choices=DTYPES, help="dtype to run the base model in for the gates")
    merge.add_argument("--dtype", choices=DTYPES, help="output dtype")
    merge.add_argument("--shard-size", type=parse_size, default="5GB", help="largest shard, e.g. 5GB (default)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing model in OUT")
    merge.add_argument("--quiet", action="store_true", help="no progress bars")
    merge.set_defaults(handler=run_merge)

    check = commands.add_parser("check", help="check a recipe: problems, compatibility and gate diagnostics")
    check.add_argument("recipe", type=Path)
    check.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    check.add_argument("--gate-dtype", choices=DTYPES)
    check.add_argument("--no-gates", action="store_true", help="skip computing gate diagnostics")
    check.add_argument(
        "--routing", action="store_true", help="also score where the recipe's test prompts would be routed"
    )
    check.set_defaults(handler=run_check)

    evaluate = commands.add_parser(
        "eval-routing", help="score how a merged model routes held-out prompts to their intended experts"
    )
    evaluate.add_argument("model", type=Path, help="merged MoE model folder")
    evaluate.add_argument("prompts", type=Path, help="YAML: expert label or index -> prompts, or a recipe")
    evaluate.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    evaluate.set_defaults(handler=run_eval_routing)


def _print_problems(problems: list[Problem]) -> None:
    for problem in problems:
        print(str(problem), file=sys.stderr)


def run_merge(args: argparse.Namespace) -> int:
    from app.cli.progress import ProgressBars
    from app.core.merge.pipeline import MergeOptions, merge_moe

    recipe = load_recipe(args.recipe)
    options = MergeOptions(
        out_dir=args.out,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        dtype=args.dtype,
        device=args.device,
        gate_dtype=args.gate_dtype,
    )
    if any(ref.lora is not None for ref in recipe.model_refs()):
        from app.core.compat import check_recipe

        # What an adapter loses in a MoE (its attention, embeddings...) and why one cannot be applied
        # are said before any download or heavy work.
        problems = check_recipe(recipe, download_later=True)
        _print_problems(problems)
        if any(p.is_error for p in problems):
            return 1
    with ProgressBars(enabled=not args.quiet) as bars:
        if not all(ref.is_local and (ref.lora is None or ref.lora.is_local) for ref in recipe.model_refs()):
            from app.core.hub import ensure_recipe_models  # huggingface_hub's imports, only when needed

            # Hub models the cache lacks are downloaded first, with their own progress.
            run_job(ensure_recipe_models(recipe), bars)
        result = run_job(merge_moe(recipe, options), bars)
    for warning in result.gates.degenerate_warnings([recipe.expert_label(i) for i in range(len(recipe.experts))]):
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"merged {len(recipe.experts)} experts into {result.out_dir} "
        f"({format_bytes(result.bytes_written)} in {len(result.shard_files)} shard(s), {result.seconds:.1f} s)"
    )
    return 0


def run_check(args: argparse.Namespace) -> int:
    from app.core.compat import check_recipe

    recipe = load_recipe(args.recipe)
    problems = check_recipe(recipe)
    _print_problems(problems)
    errors = [p for p in problems if p.is_error]
    if errors:
        print(f"{len(errors)} error(s): this recipe cannot be merged yet", file=sys.stderr)
        return 1
    print(f"recipe OK: {len(recipe.experts)} experts, top-{recipe.experts_per_token}, gate mode {recipe.gate_mode}")
    if args.no_gates:
        return 0
    from app.cli.progress import ProgressBars
    from app.core.merge.gates import GateComputer

    computer = GateComputer(recipe.base_model, device=args.device, dtype=args.gate_dtype, keep_loaded=args.routing)
    try:
        with ProgressBars() as bars:
            gates = run_job(computer.compute(recipe), bars)
            test_prompts = [list(extras.test_prompts) for extras in recipe.studio.experts]
            if args.routing and not any(test_prompts):
                print("no test prompts in the recipe: nothing to route", file=sys.stderr)
                return 1
            preview = run_job(computer.route(recipe, gates, test_prompts), bars) if args.routing else None
    finally:
        computer.close()
    labels = [recipe.expert_label(i) for i in range(len(recipe.experts))]
    if gates.fit_seconds is not None:
        print(f"calibrated routers fitted in {gates.fit_seconds:.2f} s")
    print("layer  condition  most similar pair")
    for diag in gates.diagnostics:
        pairs = [(diag.similarity[i][j], i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))]
        similarity, i, j = max(pairs) if pairs else (0.0, 0, 0)
        flag = "  DEGENERATE" if diag.is_degenerate else ""
        print(f"{diag.layer:5d}  {diag.condition_number:9.2f}  {labels[i]} ~ {labels[j]}: {similarity:.3f}{flag}")
    for warning in gates.degenerate_warnings(labels):
        print(f"warning: {warning}", file=sys.stderr)
    if preview is not None:
        print_quality(preview.quality, labels)
        print_misrouted(misrouted_prompts(preview.routings), labels)
    return 0


def print_quality(quality: RoutingQuality, labels: list[str]) -> None:
    print(f"routing: {quality.summary()}")
    print(
        "  per layer (share of tokens whose top-1 is the intended expert): "
        + ", ".join(f"{share:.0%}" for share in quality.layer_token_share)
    )
    print(
        "  expert usage: "
        + ", ".join(f"{label} {share:.0%}" for label, share in zip(labels, quality.usage, strict=True))
    )


def run_eval_routing(args: argparse.Namespace) -> int:
    from app.cli.progress import ProgressBars
    from app.core.chat.trace import read_legend
    from app.core.routing_eval import evaluate_model_routing, load_labelled_prompts
    from app.core.sources import ModelSource

    with ModelSource(args.model) as source:
        experts = int(source.config.get("num_local_experts") or source.config.get("num_experts") or 0)
    labels = list(read_legend(args.model, experts).labels)
    prompts = load_labelled_prompts(args.prompts, labels)
    with ProgressBars() as bars:
        result = run_job(evaluate_model_routing(args.model, prompts, device=args.device), bars)
    print_quality(result.quality, list(result.labels))
    print_misrouted(result.misrouted, list(result.labels))
    return 0


def print_misrouted(misrouted: list[MisroutedPrompt], labels: list[str], shown: int = 20) -> None:
    """The prompts that went to the wrong expert, worst first, with both experts' mean router weights."""
    if not misrouted:
        print("misrouted prompts: none")
        return
    print(f"misrouted prompts ({len(misrouted)}, worst first; mean router weight of the intended and chosen expert):")
    for prompt in misrouted[:shown]:
        text = " ".join(prompt.text.split())
        text = text if len(text) <= 60 else text[:59] + "…"
        print(
            f"  {json.dumps(text, ensure_ascii=False)}: intended {labels[prompt.intended_expert]} "
            f"{prompt.intended_weight:.2f}, went to {labels[prompt.chosen_expert]} {prompt.chosen_weight:.2f}"
        )
    if len(misrouted) > shown:
        print(f"  ... and {len(misrouted) - shown} more")
