"""The command-line interface: the same core jobs as the app, with tqdm progress."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from app import __version__
from app.core.problems import FrankenMoEError, ProblemsError

# Arguments that mean "open the window" rather than "run a command".
GUI_FLAGS = ("--demo", "--gui")
# Checks the installation end to end (app.selftest); handled before the parser, like the GUI flags.
SELF_TEST_FLAG = "--self-test"

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    from app.cli import chat_commands, engine_commands, eval_commands, hub_commands, train_commands

    parser = argparse.ArgumentParser(
        prog="frankenmoe",
        description="Build Mixture-of-Experts models from existing models. Without a command, opens the app.",
        epilog=(
            "--demo: open the app and build the demo models. "
            f"{SELF_TEST_FLAG}: check that this installation works (offline, about a minute), exit 0 if so."
        ),
    )
    parser.add_argument("--version", action="version", version=f"FrankenMoE Studio {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    engine_commands.register(commands)
    hub_commands.register(commands)
    chat_commands.register(commands)
    eval_commands.register(commands)
    train_commands.register(commands)
    return parser


def run_cli(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except ProblemsError as exc:
        for problem in exc.problems:
            print(str(problem), file=sys.stderr)
        return 1
    except FrankenMoEError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"fix: {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was left half-written", file=sys.stderr)
        return 130
