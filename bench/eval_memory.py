"""Peak memory of `frankenmoe eval --compare-donors` (the MoE, its base and 3 experts) against the MoE alone.

Builds a base and three Llama experts (by default about 100 MB each in float32) and merges them into a
3-expert MoE (about 250 MB), then runs `frankenmoe eval` in a fresh process twice: the MoE alone, and
with --compare-donors, which loads the four dense models too, one at a time. Each process's peak
resident set size comes from the kernel (os.wait4), so that no sampling can miss a peak. Models
evaluated one at a time keep the second figure near the first: the target is at most 1.2x.

Run from the repository root: python bench/eval_memory.py [--hidden 512] [--layers 8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.core.merge.pipeline import MergeOptions, merge_moe  # noqa: E402
from app.core.progress import run_job  # noqa: E402
from app.core.recipe import parse_recipe  # noqa: E402
from tests.models import make_tiny_model  # noqa: E402


def build(workdir: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """The merged MoE folder and a data file; reused when the work folder already has them."""
    moe = workdir / "moe"
    data = workdir / "texts.jsonl"
    if not (moe / "config.json").is_file():
        sizes = dict(
            hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
            num_attention_heads=8, num_key_value_heads=4,
        )  # fmt: skip
        donors = [make_tiny_model(workdir / name, "llama", seed=seed, **sizes) for seed, name in enumerate(
            ("base", "expert0", "expert1", "expert2"))]  # fmt: skip
        lines = [f"base_model: {donors[0]}", "gate_mode: random", "experts:"]
        for donor in donors[1:]:
            lines += [f"  - source_model: {donor}", "    positive_prompts: ['hello']"]
        run_job(merge_moe(parse_recipe("\n".join(lines)), MergeOptions(out_dir=moe)))
    rng = random.Random(0)
    words = ["storm", "sea", "seven", "plus", "def", "return", "harbour", "village", "number", "list"]
    data.write_text(
        "\n".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) for _ in range(32)),
        encoding="utf-8",
    )
    return moe, data


def peak_rss(argv: list[str]) -> int:
    """Peak resident set size of a child process, in bytes (ru_maxrss is in KiB on Linux)."""
    process = subprocess.Popen(
        argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{stderr.decode(errors='replace')}")
    return usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="eval-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    moe, data = build(workdir, args.hidden, args.layers)
    command = [sys.executable, "-m", "app", "eval", str(moe), "--data", str(data), "--quiet", "--dtype", "float32"]
    # A process that only imports what eval imports: the floor both figures share.
    floor = peak_rss([sys.executable, "-c", "import torch, transformers, app.cli.eval_commands"])
    alone = peak_rss(command)
    donors = peak_rss([*command, "--compare-donors"])
    size = sum(f.stat().st_size for f in moe.glob("*.safetensors"))
    print(f"MoE: 3 experts, hidden {args.hidden}, {args.layers} layers, {size / 1e6:.0f} MB of weights")
    print(f"import floor (python, torch, transformers):   {floor / 1e6:7.0f} MB")
    print(f"peak RSS, MoE alone:                          {alone / 1e6:7.0f} MB")
    print(f"peak RSS, --compare-donors (MoE, base, 3 experts): {donors / 1e6:7.0f} MB")
    print(f"ratio (compare-donors / MoE alone):           {donors / alone:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
