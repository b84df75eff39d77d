"""Entry point: `frankenmoe` opens the app; `frankenmoe COMMAND ...` runs the CLI."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    from app.cli.main import GUI_FLAGS, run_cli

    if not args or args[0] in GUI_FLAGS:
        from app.gui.launch import launch

        return launch(args)
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
