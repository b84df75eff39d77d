"""Entry point: `frankenmoe` opens the app; `frankenmoe COMMAND ...` runs the CLI;
`frankenmoe --self-test` checks the installation. Also the script PyInstaller freezes."""

from __future__ import annotations

import gc
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from app.startup import prepare_process

    prepare_process()
    args = sys.argv[1:] if argv is None else argv
    from app.cli.main import GUI_FLAGS, SELF_TEST_FLAG, run_cli

    if args[:1] == [SELF_TEST_FLAG]:
        from app.selftest import run_self_test

        return run_self_test()
    if not args or args[0] in GUI_FLAGS:
        from app.startup import missing_display

        problem = missing_display(os.environ, sys.platform)
        if problem is not None:
            print(f"error: {problem}.", file=sys.stderr)
            print(
                "fix: start it in a desktop session (or with ssh -X), or use the command line instead: "
                "frankenmoe --help lists its commands.",
                file=sys.stderr,
            )
            return 1
        from app.gui.launch import launch

        return launch(args)
    return run_cli(args)


def run() -> int:
    """The process's entry point (the `frankenmoe` script, the frozen app): main(), then an exit that collects nothing.

    Python collects all its garbage again while it shuts down, which with torch and transformers
    loaded took 0.5 s of the 0.7 s between a command's last line and the end of its process
    (bench/cli_exit.py). Frozen, the objects are left to the OS with the rest of the process's
    memory; atexit handlers (logs, progress bars) still run. Not in main(), which tests call in
    their own process.
    """
    code = main()
    gc.freeze()
    return code


# PyInstaller runs this file as __main__, with no package around it; the imports above are absolute.
if __name__ == "__main__":
    sys.exit(run())
