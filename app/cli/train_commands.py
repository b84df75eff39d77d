"""`frankenmoe train-router`: train only the routers of a merged MoE model on text, and write a new model folder."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from app.core.devices import DEVICE_CHOICES
from app.core.problems import FrankenMoEError
from app.core.progress import run_job

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOADS = ("full", "8bit", "4bit")


def register(commands: Any) -> None:
    from app.core.training.settings import RouterTrainingSettings

    defaults = RouterTrainingSettings()
    train = commands.add_parser(
        "train-router",
        help="train the routers of a merged MoE model (everything else frozen) and write a new model folder",
        description=(
            "Gate-only training: the routers (and Qwen2-MoE's shared-expert gates) learn from your text with the "
            "next-token loss plus a load-balancing loss; every other weight stays byte-identical. The new model is "
            "written to OUT, which must be new or empty; MODEL is never changed. Checkpoints let --resume continue "
            "an interrupted run exactly."
        ),
    )
    train.add_argument("model", type=Path, help="the merged MoE model's folder")
    train.add_argument("out", type=Path, help="the new model's folder (new or empty)")
    train.add_argument(
        "--data", type=Path, nargs="+", action="extend", default=[], metavar="FILE",
        help="training text: .txt (paragraphs), .jsonl (a text or messages field per line), .parquet",
    )  # fmt: skip
    train.add_argument("--recipe-prompts", action="store_true", help="also train on the prompts of the saved recipe")
    train.add_argument(
        "--hub-dataset", nargs="+", action="extend", default=[], metavar="ID",
        help="a Hub dataset as id[:config][/split] (default split: train), through the datasets library",
    )  # fmt: skip
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="training steps (default: about a minute's worth on a laptop CPU)")
    budget.add_argument("--tokens", type=int, help="training tokens, instead of --steps")
    train.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per packed sequence")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per step")
    train.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (AdamW)")
    train.add_argument("--balance-coef", type=float, default=defaults.balance_coef, help="load-balancing loss weight")
    train.add_argument("--z-coef", type=float, default=defaults.z_coef, help="router z-loss weight")
    train.add_argument("--val-fraction", type=float, default=defaults.val_fraction, help="share held out")
    train.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps between validations")
    train.add_argument(
        "--patience", type=int, default=defaults.patience,
        help="stop after this many validations without improvement (0: never stop early)",
    )  # fmt: skip
    train.add_argument(
        "--checkpoint-every", type=int, default=defaults.checkpoint_every,
        help="steps between resumable checkpoints (0: none)",
    )  # fmt: skip
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    train.add_argument("--dtype", default="auto", choices=DTYPES, help="what the frozen model computes in")
    train.add_argument("--load", default="full", choices=LOADS, help="8bit / 4bit: bitsandbytes, CUDA only")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run writing OUT")
    train.add_argument("--json", type=Path, metavar="REPORT.json", help="write the run's report as JSON")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=run_train_router)


def build_settings(args: argparse.Namespace) -> Any:
    from app.core.training.settings import RouterTrainingSettings

    return RouterTrainingSettings(
        steps=args.steps,
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        balance_coef=args.balance_coef,
        z_coef=args.z_coef,
        val_fraction=args.val_fraction,
        eval_every=args.eval_every,
        patience=args.patience or None,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        load=args.load,
        checkpoint_every=args.checkpoint_every,
    )


def run_train_router(args: argparse.Namespace) -> int:
    from app.core.training.settings import TrainingData
    from app.core.training.trainer import train_routers

    settings = build_settings(args)
    data = TrainingData(
        files=tuple(args.data), recipe_prompts=args.recipe_prompts, hub_datasets=tuple(args.hub_dataset)
    )
    if args.json is not None:
        _check_json_target(args.json)
    job = train_routers(args.model, args.out, settings, data, resume=args.resume)
    display = TrainingDisplay(enabled=not args.quiet)
    try:
        result = run_job(job, display)
    except KeyboardInterrupt:
        job.close()  # the job removes anything half-written on the way out
        raise
    finally:
        display.close()
    _print_summary(result)
    if args.json is not None:
        _write_json(result.report, args.json)
        print(f"report written to {args.json}")
    return 0


class TrainingDisplay:
    """The loading and writing stages as the other commands show them; the steps as one bar with the losses."""

    def __init__(self, enabled: bool = True) -> None:
        from app.cli.progress import ProgressBars

        self.enabled = enabled
        self._bars = ProgressBars(enabled=enabled)
        self._steps: Any = None
        self._postfix: dict[str, str] = {}

    def __call__(self, record: Any) -> None:
        from tqdm import tqdm

        if record.stage not in ("train", "validate"):
            if record.stage == "data" and record.total <= 1 and record.message and not record.bytes_total:
                print(record.message, file=sys.stderr)  # the default budget, said even with --quiet
                return
            self._bars(record)
            return
        if record.val_loss is not None:
            self._postfix["val"] = f"{record.val_loss:.4f}"
        if record.stage == "train":
            self._postfix["loss"] = f"{record.loss:.4f}"
            if record.balance_loss is not None:
                self._postfix["balance"] = f"{record.balance_loss:.3f}"
            if record.tokens_per_s:
                self._postfix["tok/s"] = f"{record.tokens_per_s:,.0f}"
        if not self.enabled:
            return
        if self._steps is None:
            self._steps = tqdm(total=record.total, desc="train", file=sys.stderr, dynamic_ncols=True)
        self._steps.n = record.done
        self._steps.set_postfix(self._postfix, refresh=False)
        self._steps.refresh()

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        self._bars.close()


def _print_summary(result: Any) -> None:
    report = result.report
    stopped = " (stopped early: the validation loss stopped improving)" if result.stopped_early else ""
    print(f"trained {result.steps} steps on {result.tokens:,} tokens{stopped}")
    print(
        f"validation loss: {result.initial_val_loss:.4f} before, {result.best_val_loss:.4f} with the routers "
        f"written (step {report['best_step']})"
    )
    load = ", ".join(f"{share:.0%}" for share in report["expert_load"])
    print(f"final training loss {result.final_train_loss:.4f}; expert load {load}")
    if report.get("tokens_per_s"):
        print(f"{report['tokens_per_s']:,.0f} training tokens/s")
    print(f"wrote {result.out_dir}")


def _check_json_target(path: Path) -> None:
    if path.is_dir():
        raise FrankenMoEError(f"{path} is a folder", "give a file path for the JSON report")
    if not path.parent.is_dir():
        raise FrankenMoEError(f"the folder of {path} does not exist", "create it or choose another path")


def _write_json(document: dict[str, Any], path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = json.dumps(document, indent=2, default=lambda value: None)
    # JSON has no NaN or infinity; a loss that was never measured is written as null.
    text = json.dumps(json.loads(text, parse_constant=lambda _name: None), indent=2)
    temporary.write_text(text + "\n", encoding="utf-8")
    os.replace(temporary, path)

