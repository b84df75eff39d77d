"""GGUF export benchmark: wall time and peak RSS of `frankenmoe export-gguf` against llama.cpp's converter.

Builds the merge benchmark's medium MoE (bench/merge.py's donors: three ~250M-parameter Llama experts,
bfloat16, a ~1.1 GB Mixtral; random gates, since only the export is measured), then exports it with
`python -m app export-gguf` and with llama.cpp's `convert_hf_to_gguf.py` (from a llama.cpp source tree,
run with a side environment that has torch and transformers, never a dependency), same folder, same type.

The donors' tokenizer is trained locally, so llama.cpp's hash table cannot know its pre-tokenizer and the
converter would stop there: it is run through a two-line wrapper that names it "gpt-2", as our export does.

Run from the repository root:
    python bench/gguf_export.py --llama-cpp DIR [--python /work/side/llama/bin/python] [--types bf16 q8_0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.merge import build_donor, measure  # noqa: E402

CONVERTER_WRAPPER = """
import runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, str(__import__("pathlib").Path(sys.argv[0]).parent))
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def build_moe(workdir: Path, layers: int) -> Path:
    import yaml

    from app.core.merge.pipeline import MergeOptions, merge_moe
    from app.core.progress import run_job
    from app.core.recipe import parse_recipe

    out = workdir / f"moe-{layers}"
    if (out / "config.json").exists():
        return out
    donors = workdir / f"donors-{layers}"
    for index, name in enumerate(["base", "expert0", "expert1", "expert2"]):
        build_donor(donors / name, layers, seed=index)
    recipe = {
        "base_model": str(donors / "base"),
        "gate_mode": "random",
        "dtype": "bfloat16",
        "experts_per_token": 2,
        "experts": [{"source_model": str(donors / f"expert{i}")} for i in range(3)],
    }
    run_job(merge_moe(parse_recipe(yaml.safe_dump(recipe)), MergeOptions(out_dir=out)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, help="a llama.cpp source tree (with convert_hf_to_gguf.py)")
    parser.add_argument("--python", default=sys.executable, help="the Python to run llama.cpp's converter with")
    parser.add_argument("--types", nargs="+", default=["bf16", "f16", "q8_0"])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/frankenmoe-bench-gguf"))
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = build_moe(args.workdir, args.layers)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    wrapper = args.workdir / "convert_wrapper.py"
    wrapper.write_text(CONVERTER_WRAPPER)
    results: dict[str, dict[str, float]] = {}
    lines = [f"model: {model} ({size / 1e9:.2f} GB of safetensors, {args.layers} layers, 3 experts)"]
    for out_type in args.types:
        ours_out = args.workdir / f"ours.{out_type}.gguf"
        wall, peak = measure(
            [sys.executable, "-m", "app", "export-gguf", str(model), str(ours_out), "--type", out_type, "--quiet",
             "--overwrite"],
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        row = {"ours_s": wall, "ours_rss_mb": peak / 2**20, "ours_gb": ours_out.stat().st_size / 1e9}
        line = f"  {out_type:5s} ours: {wall:6.1f} s, peak RSS {peak / 2**20:6.0f} MB"
        if args.llama_cpp is not None:
            theirs_out = args.workdir / f"llama.cpp.{out_type}.gguf"
            converter = args.llama_cpp / "convert_hf_to_gguf.py"
            their_wall, their_peak = measure(
                [args.python, str(wrapper), str(converter), str(model), "--outfile", str(theirs_out), "--outtype",
                 out_type],
                env={"PATH": "/usr/bin:/bin"},
            )  # fmt: skip
            row |= {"llama_cpp_s": their_wall, "llama_cpp_rss_mb": their_peak / 2**20}
            line += (
                f"; convert_hf_to_gguf.py: {their_wall:6.1f} s, {their_peak / 2**20:6.0f} MB"
                f"; ratio time {wall / their_wall:.2f}x, RSS {peak / their_peak:.2f}x"
            )
            theirs_out.unlink(missing_ok=True)
        ours_out.unlink(missing_ok=True)
        results[out_type] = row
        lines.append(line)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if shutil.disk_usage(args.workdir).free < 5e9:
        print(f"note: {args.workdir} holds the bench model; remove it when done", file=sys.stderr)


if __name__ == "__main__":
    main()
