"""`frankenmoe eval`: NLL / perplexity of a merged model (and its base and donors) per dataset, lm-eval tasks,
routing statistics, a k sweep and expert ablation."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from app.core.devices import DEVICE_CHOICES
from app.core.problems import FrankenMoEError

DTYPES = ("auto", "float32", "bfloat16", "float16")
LM_EVAL_SUFFIX = ".lm-eval.json"


def register(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="measure a model's next-token loss per dataset, against its base and donors, and run lm-eval tasks",
        description=(
            "Mean next-token loss (NLL) and perplexity per dataset, for the MoE and, with --compare-donors, its "
            "base and every expert as the dense models they are; routing statistics from the same pass; "
            "lm-evaluation-harness tasks with --tasks (needs the eval extra). Models are loaded one at a time."
        ),
    )
    evaluate.add_argument("model", type=Path, help="model folder (a merged MoE, or any causal LM)")
    evaluate.add_argument(
        "--data", type=Path, nargs="+", action="extend", default=[], metavar="FILE",
        help="data files (.txt paragraphs, .jsonl with text or messages, .parquet); named by their stem",
    )  # fmt: skip
    evaluate.add_argument("--recipe", type=Path, help="a recipe whose prompts per expert become datasets")
    evaluate.add_argument(
        "--compare-donors", action="store_true",
        help="also evaluate the base and every expert, read from the recipe saved beside the model",
    )  # fmt: skip
    evaluate.add_argument("--tasks", help="lm-eval tasks, comma-separated, e.g. arc_easy,hellaswag")
    evaluate.add_argument("--include-path", type=Path, metavar="DIR", help="a folder of custom lm-eval task YAMLs")
    evaluate.add_argument("--limit", type=int, help="lm-eval: at most N examples per task")
    evaluate.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples per prompt")
    evaluate.add_argument(
        "--top-k", type=int, nargs="+", action="extend", metavar="K",
        help="experts per token for the MoE; several values make a sweep",
    )  # fmt: skip
    evaluate.add_argument(
        "--disable-expert", type=int, nargs="+", action="extend", default=[], metavar="I",
        help="switch expert I (from 0) off: its router logit is masked",
    )  # fmt: skip
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    evaluate.add_argument("--dtype", default="auto", choices=DTYPES)
    evaluate.add_argument("--json", type=Path, metavar="OUT.json", help="write the report as JSON")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from app.cli.progress import ProgressBars
    from app.core.eval.nll import evaluate
    from app.core.progress import run_job

    request = build_request(args)
    if args.json is not None:
        check_output(args.json)
    with ProgressBars(enabled=not args.quiet) as bars:
        report = run_job(evaluate(request), bars)
    print_report(report.to_json())
    if args.json is not None:
        document = report.to_json()
        if report.lm_eval_runs:
            lm_eval_path = args.json.with_name(args.json.stem + LM_EVAL_SUFFIX)
            document["lm_eval"] = {**(document["lm_eval"] or {}), "file": lm_eval_path.name}
            from app.core.eval.harness import write_results_json

            write_results_json({"runs": report.lm_eval_runs}, lm_eval_path)
        write_json_atomically(document, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def build_request(args: argparse.Namespace) -> Any:
    """The core request from the arguments; every bad argument is a FrankenMoEError before any model loads."""
    from app.core.eval.controls import RoutingOverride, validate_override
    from app.core.eval.harness import HarnessRequest
    from app.core.eval.nll import EvalModel, EvalRequest, comparison_models, configured_experts

    model_dir = _model_folder(args.model)
    config = _read_config(model_dir)
    experts = configured_experts(config)
    if (args.top_k or args.disable_expert) and not experts:
        raise FrankenMoEError(
            f"{args.model} is a dense model: it has no experts to route",
            "leave out --top-k and --disable-expert, or evaluate a merged MoE",
        )
    disabled = frozenset(args.disable_expert)
    overrides = tuple(RoutingOverride(top_k=k, disabled=disabled) for k in dict.fromkeys(args.top_k or [None]))
    for override in overrides:
        validate_override(override, experts)

    harness = None
    if args.tasks is not None:
        tasks = tuple(task.strip() for task in args.tasks.split(",") if task.strip())
        harness = HarnessRequest(
            tasks=tasks,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            include_path=args.include_path,
            batch_size=args.batch_size,
        )
    elif args.limit is not None or args.num_fewshot is not None or args.include_path is not None:
        raise FrankenMoEError(
            "--limit, --num-fewshot and --include-path apply to lm-eval tasks, and no task was named",
            "name the tasks with --tasks",
        )

    saved_recipe = model_dir / _recipe_filename()
    datasets = _datasets(args, saved_recipe, harness is not None)
    models = comparison_models(model_dir) if args.compare_donors else (EvalModel("moe", str(model_dir)),)
    return EvalRequest(
        models=models,
        datasets=tuple(datasets),
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        overrides=overrides,
        harness=harness,
    )


def _recipe_filename() -> str:
    from app.core.merge.pipeline import RECIPE_FILENAME

    return RECIPE_FILENAME


def _model_folder(path: Path) -> Path:
    if not path.is_dir():
        raise FrankenMoEError(f"model folder {path} does not exist", "give the folder of a saved model")
    if not (path / "config.json").is_file():
        raise FrankenMoEError(
            f"{path} holds no config.json, so it is not a saved transformers model",
            "give the folder a merge (or save_pretrained) wrote",
        )
    return path


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FrankenMoEError(f"cannot read {folder / 'config.json'} ({exc})", "give a model folder") from exc
    if not isinstance(config, dict):
        raise FrankenMoEError(f"{folder / 'config.json'} is not a JSON object", "give a model folder")
    return config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config


def _datasets(args: argparse.Namespace, saved_recipe: Path, has_tasks: bool) -> list[Any]:
    from app.core.eval.data import load_data_file, recipe_datasets
    from app.core.recipe import load_recipe

    datasets = [load_data_file(path) for path in args.data]
    if args.recipe is not None:
        prompts = recipe_datasets(load_recipe(args.recipe))
        if not prompts:
            raise FrankenMoEError(
                f"the recipe {args.recipe} has no prompts to score", "add positive or test prompts to its experts"
            )
        datasets.extend(prompts)
    if not datasets and not has_tasks:
        if saved_recipe.is_file() and (prompts := recipe_datasets(load_recipe(saved_recipe))):
            # A merged model carries its recipe: its prompts per expert are the natural first test.
            print(f"no --data or --tasks: scoring the prompts of {saved_recipe.name}", file=sys.stderr)
            datasets.extend(prompts)
        else:
            raise FrankenMoEError("there is nothing to evaluate on", "give --data FILE, --recipe RECIPE or --tasks")
    names = [dataset.name for dataset in datasets]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise FrankenMoEError(
            f"two datasets are both named {', '.join(repeated)} (a dataset is named by its file's stem, "
            "or by its expert for recipe prompts)",
            "rename one of the files",
        )
    return datasets


def check_output(path: Path) -> None:
    if path.is_dir():
        raise FrankenMoEError(f"{path} is a folder", "give --json a file name, e.g. results.json")
    if not path.parent.is_dir():
        raise FrankenMoEError(f"the folder {path.parent} does not exist", "create it, or write the JSON elsewhere")


def write_json_atomically(document: dict[str, Any], path: Path) -> None:
    """The whole file or nothing: written beside the target, then renamed over it."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(json.dumps(document, indent=2, ensure_ascii=False, allow_nan=True), encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _column(result: dict[str, Any]) -> str:
    override = result.get("override") or {}
    parts = [result["model"]]
    if override.get("top_k") is not None:
        parts.append(f"k={override['top_k']}")
    if override.get("disabled"):
        parts.append("off=" + ",".join(str(i) for i in override["disabled"]))
    return " ".join(parts)


def print_report(document: dict[str, Any]) -> None:
    """A table per figure: datasets down, models (and overrides) across; the best of each row marked *."""
    results = document["results"]
    if results:
        columns = list(dict.fromkeys(_column(r) for r in results))
        cells = {(r["dataset"], _column(r)): r for r in results}
        datasets = list(dict.fromkeys(r["dataset"] for r in results))
        widths = [max(len("dataset"), *(len(d) for d in datasets))] + [max(10, len(c)) for c in columns]
        print(f"NLL per token (perplexity); * best per dataset. {len(columns)} model(s), {len(datasets)} dataset(s).")
        print("  ".join(text.ljust(width) for text, width in zip(["dataset", *columns], widths, strict=True)))
        for dataset in datasets:
            row = [cells.get((dataset, column)) for column in columns]
            finite = [r["nll"] for r in row if r is not None and math.isfinite(r["nll"])]
            best = min(finite) if finite else None
            texts = [dataset]
            for r in row:
                if r is None:
                    texts.append("-")
                else:
                    mark = "*" if best is not None and r["nll"] == best and len(columns) > 1 else ""
                    texts.append(f"{r['nll']:.4f}{mark} ({r['ppl']:.2f})")
            print("  ".join(text.ljust(width) for text, width in zip(texts, widths, strict=True)))
    _print_routing(document.get("routing") or {})
    _print_lm_eval(document.get("lm_eval"))


def _print_routing(routing: dict[str, Any]) -> None:
    """Per MoE run and dataset: each expert's share of top-1 picks, the mean normalised entropy, dead experts."""
    for model, per_override in routing.items():
        for label, section in per_override.items():
            experts = section.get("experts", [])
            for dataset, stats in section.get("datasets", {}).items():
                shares = ", ".join(
                    f"{name} {share:.0%}" for name, share in zip(experts, stats.get("expert_share", []), strict=False)
                )
                entropy = stats.get("entropy") or []
                mean_entropy = sum(entropy) / len(entropy) if entropy else float("nan")
                dead = [experts[i] if i < len(experts) else str(i) for i in stats.get("dead_experts", [])]
                print(
                    f"routing {model} [{label}] on {dataset}: {shares}; entropy {mean_entropy:.2f}; "
                    + (f"dead (< 1% of tokens): {', '.join(dead)}" if dead else "no dead experts")
                )


def _print_lm_eval(section: dict[str, Any] | None) -> None:
    if not section:
        return
    print("lm-eval:")
    for entry in section.get("results", []):
        column = _column({"model": entry["model"], "override": entry.get("override")})
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in entry["metrics"].items())
        print(f"  {column} {entry['task']}: {metrics}")
