"""`frankenmoe hub ...`: search the Hub, inspect a model before downloading it, download it."""

from __future__ import annotations

import argparse
import getpass
import sys
import threading
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from app.cli.progress import bytes_bar
from app.core.hub.sorting import SORT_KEYS
from app.core.progress import Job, Progress, format_bytes, run_job
from app.core.recipe import ModelRef, load_recipe

if TYPE_CHECKING:
    from collections.abc import Sequence

    from app.core.hub import ModelReport, ModelSummary


def register(subparsers: Any) -> None:
    hub = subparsers.add_parser("hub", help="search, inspect and download Hugging Face Hub models")
    commands = hub.add_subparsers(dest="hub_command", metavar="HUB_COMMAND")

    search = commands.add_parser("search", help="find text-generation models")
    search.add_argument("query", nargs="+", help="free text, e.g. mistral 7b instruct")
    search.add_argument("--sort", choices=SORT_KEYS, default="downloads")
    search.add_argument("--limit", type=int, default=20)
    search.add_argument(
        "--adapters",
        action="store_true",
        help="find PEFT LoRA adapters (library peft) instead of full models; each is listed with its base",
    )
    search.set_defaults(handler=run_search)

    info = commands.add_parser("info", help="show a model's architecture, sizes and recipe fit")
    info.add_argument("repo", help="org/name[@revision]")
    info.add_argument("--recipe", help="check the model against this recipe's base model")
    info.set_defaults(handler=run_info)

    download = commands.add_parser("download", help="download what a merge needs into the HF cache")
    download.add_argument("repo", help="org/name[@revision]")
    download.set_defaults(handler=run_download)

    fetch = commands.add_parser("fetch", help="download every Hub model a recipe names")
    fetch.add_argument("recipe", help="recipe YAML file")
    fetch.set_defaults(handler=run_fetch)

    login = commands.add_parser("login", help="check an access token and save it with huggingface_hub")
    login.set_defaults(handler=run_login)

    hub.set_defaults(handler=lambda _args: _print_help(hub))


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def run_search(args: argparse.Namespace) -> int:
    from app.core.hub import search_models

    page = search_models(" ".join(args.query), sort=args.sort, limit=args.limit, adapters=args.adapters)
    if not page.models:
        print("no PEFT adapters match" if args.adapters else "no text-generation models match")
        return 0
    if args.adapters:
        _print_adapters(page.models)
        if page.has_more:
            print(f"(more results: raise --limit above {args.limit})")
        return 0
    header = f"{'model':<48} {'params':>7} {'size':>9} {'dtype':>6} {'licence':<14} {'gated':<5} "
    header += f"{'downloads':>9} {'likes':>6}  updated"
    print(header)
    for model in page.models:
        size = format_bytes(model.size_bytes) if model.size_bytes is not None else "-"
        updated = model.last_modified.date().isoformat() if model.last_modified else "-"
        print(
            f"{model.repo_id:<48} {_count(model.parameters):>7} {size:>9} {model.dtype or '-':>6} "
            f"{(model.license or '-')[:14]:<14} {'yes' if model.gated else 'no':<5} "
            f"{_count(model.downloads):>9} {_count(model.likes):>6}  {updated}"
        )
    if page.has_more:
        print(f"(more results: raise --limit above {args.limit})")
    return 0


def _print_adapters(models: Sequence[ModelSummary]) -> None:
    print(f"{'adapter':<44} {'base model':<40} {'size':>9} {'licence':<14} {'downloads':>9} {'likes':>6}  updated")
    for model in models:
        size = format_bytes(model.size_bytes) if model.size_bytes is not None else "-"
        updated = model.last_modified.date().isoformat() if model.last_modified else "-"
        print(
            f"{model.repo_id:<44} {model.base_model or '-':<40} {size:>9} {(model.license or '-')[:14]:<14} "
            f"{_count(model.downloads):>9} {_count(model.likes):>6}  {updated}"
        )


def _print_report(report: ModelReport) -> None:
    arch = report.architecture
    print(f"{report.ref}  (commit {report.commit[:12]})  {report.url}")
    adapter = report.adapter
    if adapter is not None:
        print(f"  LoRA adapter  {adapter.rank_text()}, on {', '.join(adapter.target_modules) or '-'}")
        print(f"  base model    {adapter.base_model or 'not named'} (what follows describes it)")
        print(f"  download      {adapter.fetch_text()}")
    print(f"  family        {arch.family or '-'} ({', '.join(arch.architectures) or '-'})")
    print(f"  parameters    {_count(report.summary.parameters)} {report.summary.dtype or ''}".rstrip())
    print(f"  layers        {arch.layers}")
    print(f"  hidden size   {arch.hidden_size}, intermediate {arch.intermediate_size}")
    print(f"  heads         {arch.attention_heads} attention, {arch.kv_heads} key/value")
    print(f"  vocabulary    {arch.vocab_size}")
    print(f"  context       {arch.max_positions}, RoPE theta {arch.rope_theta}")
    if arch.rope_scaling:
        print(f"  RoPE scaling  {dict(arch.rope_scaling)}")
    print(f"  chat template {'yes' if arch.has_chat_template else 'no'}")
    print(f"  licence       {report.summary.license or '-'}{', gated' if report.summary.gated else ''}")
    print(f"  files         {len(report.files)}: {report.size_text()}")
    for problem in report.problems:
        print(f"  {problem}")


def run_info(args: argparse.Namespace) -> int:
    from app.core.hub import inspect_model

    base = load_recipe(args.recipe).base_model if args.recipe else None
    report = inspect_model(args.repo, base=base)
    _print_report(report)
    return 0 if report.can_join else 1


def _drive(job: Job[Any], cancel: threading.Event) -> Any:
    """Run a download job with a tqdm bar; Ctrl-C cancels it cleanly before re-raising."""
    from app.core.hub import DownloadProgress

    bar: tqdm | None = None
    current = ""

    def show(record: Progress) -> None:
        nonlocal bar, current
        if not isinstance(record, DownloadProgress) or not record.bytes_total:
            if record.message:
                tqdm.write(f"{record.repo_id if isinstance(record, DownloadProgress) else ''} {record.message}")
            return
        if bar is None or current != record.repo_id:
            if bar is not None:
                bar.close()
            current = record.repo_id
            bar = bytes_bar(record.bytes_total, record.repo_id)
        bar.update(record.bytes_done - bar.n)
        bar.set_postfix_str(f"{record.done}/{record.total} files")

    try:
        return run_job(job, show)
    except KeyboardInterrupt:
        cancel.set()
        job.close()
        raise
    finally:
        if bar is not None:
            bar.close()


def run_download(args: argparse.Namespace) -> int:
    from app.core.hub import download_model

    cancel = threading.Event()
    folder = _drive(download_model(ModelRef.parse(args.repo), cancel), cancel)
    print(folder)
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from app.core.hub import ensure_recipe_models

    cancel = threading.Event()
    folders = _drive(ensure_recipe_models(load_recipe(args.recipe), cancel), cancel)
    for ref, folder in folders.items():
        print(f"{ref}: {folder}")
    return 0


def run_login(args: argparse.Namespace) -> int:
    from app.core.hub import save_token

    # getpass keeps the token off the screen; a pipe (no terminal) is read as is.
    token = getpass.getpass("Hugging Face access token: ") if sys.stdin.isatty() else sys.stdin.readline()
    user = save_token(token)
    print(f"logged in as {user.name}" + (f" (token {user.token_name!r}, {user.role})" if user.token_name else ""))
    return 0
