"""CLI exit benchmark: the time from a command's end to its process's end, with and without freezing the garbage.

`frankenmoe` (app.__main__.run) freezes Python's objects once the command has returned, so that the
interpreter's shutdown does not collect them all again. This runs the same commands each way, the
two alternating, in fresh processes: "Python's exit" calls app.__main__.main and exits as Python
does; "frozen" calls app.__main__.run, as the `frankenmoe` script and the installers do. Each child
stamps the wall clock as its command returns, and the parent reads the clock when the child has
ended: the difference is the exit. Commands: `check` (gates computed: torch loaded) and `merge` on
one-layer donors of bench/merge.py's shape.

Figures (2 virtual cores, torch 2.13, transformers 5.25, medians of 8, Python's exit -> frozen):
  2026-12-03: check: exit 0.72 s -> 0.18 s (0.25x), whole process 2.96 s -> 2.35 s (0.79x);
    merge: exit 0.75 s -> 0.18 s (0.23x), whole process 3.30 s -> 2.55 s (0.77x)

Run from the repository root: python bench/cli_exit.py [--repeats 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from merge import build_donor, write_recipe  # noqa: E402  (bench/merge.py)

# A child: the command, a stamp of the wall clock as it returns (stderr's last line), then the exit.
CHILD = """
import sys, time
import app.__main__ as entry
way, args = sys.argv[1], sys.argv[2:]
sys.argv = ["frankenmoe", *args]
code = entry.run() if way == "frozen" else entry.main(args)
print(time.time(), file=sys.stderr)
sys.exit(code)
"""
WAYS = ("Python's exit", "frozen")


def timed(way: str, args: list[str]) -> tuple[float, float]:
    """(whole process, exit) in seconds, for one run of a command in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "frozen" if way == "frozen" else "main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    ended = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {done.stderr[-2000:]}")
    returned = float(done.stderr.strip().splitlines()[-1])
    return ended - started, ended - returned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "cli_exit")
    args = parser.parse_args()
    donors = args.workdir / "donors"
    for index, name in enumerate(["base", "expert0", "expert1", "expert2"]):
        build_donor(donors / name, layers=1, seed=index)
    recipe = args.workdir / "recipe.yml"
    write_recipe(recipe, donors, "cheap_embed")
    out = args.workdir / "out"
    commands = {
        "check": ["check", str(recipe)],
        "merge": ["merge", str(recipe), str(out), "--quiet", "--device", "cpu"],
    }
    for command, command_args in commands.items():
        runs: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
        for _ in range(args.repeats):
            for way in WAYS:  # alternating, so that a load that comes and goes weighs on both alike
                shutil.rmtree(out, ignore_errors=True)
                runs[way].append(timed(way, command_args))
        (whole_before, exit_before), (whole_after, exit_after) = (
            (statistics.median(r[0] for r in runs[way]), statistics.median(r[1] for r in runs[way])) for way in WAYS
        )
        print(
            f"{command}: exit {exit_before:.2f} s -> {exit_after:.2f} s ({exit_after / exit_before:.2f}x), "
            f"whole process {whole_before:.2f} s -> {whole_after:.2f} s ({whole_after / whole_before:.2f}x)"
        )
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
