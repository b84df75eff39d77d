"""`frankenmoe publish MODEL REPO_ID`: check a merged model, then upload it with its card to the Hub."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Any

from tqdm import tqdm

from app.cli.progress import bytes_bar
from app.core.problems import ProblemsError
from app.core.progress import Progress, run_job


def register(subparsers: Any) -> None:
    publish = subparsers.add_parser(
        "publish",
        help="upload a merged model and its card to the Hugging Face Hub",
        description=(
            "Checks the merge folder, the token and the donors' licences, then uploads. The token is the one "
            "huggingface_hub has (`hf auth login`, or HF_TOKEN) unless --token gives one; it needs the write "
            "role. An interrupted upload resumes when the command is run again."
        ),
    )
    publish.add_argument("model", type=Path, metavar="MODEL", help="the folder a merge wrote")
    publish.add_argument("repo_id", metavar="REPO_ID", help="namespace/name on the Hub (a bare name: your user)")
    publish.add_argument("--private", action="store_true", help="create the repo as private")
    publish.add_argument("--revision", metavar="BRANCH", help="upload to this branch (created from main if new)")
    publish.add_argument(
        "--include-gguf", nargs="+", type=Path, default=[], metavar="FILE", help="GGUF files to upload beside it"
    )
    publish.add_argument("--message", metavar="TEXT", help="the commit message")
    publish.add_argument("--token", metavar="TOKEN", help="a Hub access token with the write role")
    publish.add_argument("--license", metavar="ID", help="the licence the card states (e.g. apache-2.0)")
    publish.set_defaults(handler=run_publish)


def run_publish(args: argparse.Namespace) -> int:
    from app.core.publish import PublishRequest, plan_publish, publish

    request = PublishRequest(
        model_dir=args.model,
        repo_id=args.repo_id,
        private=args.private,
        revision=args.revision,
        include_gguf=tuple(args.include_gguf),
        message=args.message,
        token=args.token,
        license=args.license,
    )
    cancel = threading.Event()
    plan = plan_publish(request, cancel=cancel)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if plan.errors:
        raise ProblemsError(plan.problems)
    state = "exists" if plan.repo_exists else "will be created"
    print(f"{plan.request.repo_id} ({state}): {len(plan.files)} files", file=sys.stderr)
    job = publish(plan, cancel=cancel)
    bar: tqdm | None = None  # type: ignore[type-arg]

    def show(record: Progress) -> None:
        nonlocal bar
        if bar is None:
            bar = bytes_bar(record.bytes_total, "uploading")
        bar.update(record.bytes_done - bar.n)
        bar.set_postfix_str(f"{record.done}/{record.total} files")

    try:
        result = run_job(job, show)
    except KeyboardInterrupt:
        cancel.set()
        job.close()  # nothing is committed: the repo stays as it was, and a rerun resumes the upload
        raise
    finally:
        if bar is not None:
            bar.close()
    print(result.url)
    return 0
