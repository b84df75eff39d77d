"""Merge benchmark: wall time and peak RSS of `frankenmoe merge`, the raw I/O floor and mergekit-moe.

Builds a base and three experts of about 250M parameters each (bfloat16, a ~1.1 GB output), merges
them with `cheap_embed` and `hidden` gates, and compares against:
- the I/O floor: a plain-Python process that reads exactly the input bytes a merge needs and writes
  the output's bytes, plus the start-up of an interpreter that imports torch and transformers;
- mergekit-moe on the same recipe, where it is installed in a side environment (never a dependency):
    python -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit
    python bench/merge.py --mergekit /tmp/mk/bin/mergekit-moe
It also merges donors of half the depth, to show that peak memory does not grow with model size.

Run from the repository root: python bench/merge.py [--layers 16] [--mergekit PATH] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class DonorShape:
    """A Llama donor's sizes (its layer count apart)."""

    hidden: int = 1024
    intermediate: int = 3072
    heads: int = 16
    kv_heads: int = 8
    vocab: int = 32000


# The benches' own small donor (about 125M parameters at 8 layers), and TinyLlama-1.1B's sizes, whose
# 22 layers make a real model's files: 2.2 GB a donor, 5.2 GB for a MoE of three experts.
BENCH_SHAPE = DonorShape()
TINYLLAMA_SHAPE = DonorShape(hidden=2048, intermediate=5632, heads=32, kv_heads=4)
PROMPTS = {
    "maths": ["What is 12 plus 30?", "Compute 7 times 8 and subtract 6."],
    "code": ["def add(a, b):\n    return a + b", "for i in range(10):\n    print(i)"],
    "prose": ["The old lighthouse keeper watched the storm.", "She opened the letter slowly."],
}


def build_donor(folder: Path, layers: int, seed: int, shape: DonorShape = BENCH_SHAPE) -> None:
    import torch
    from safetensors.torch import save_file

    from tests.models import write_tokenizer

    if (folder / "model.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    generator = torch.Generator().manual_seed(seed)

    def weight(*size: int) -> torch.Tensor:
        return (torch.randn(size, generator=generator) * 0.02).to(torch.bfloat16)

    head_dim = shape.hidden // shape.heads
    tensors = {
        "model.embed_tokens.weight": weight(shape.vocab, shape.hidden),
        "lm_head.weight": weight(shape.vocab, shape.hidden),
    }
    tensors["model.norm.weight"] = torch.ones(shape.hidden, dtype=torch.bfloat16)
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.self_attn.q_proj.weight"] = weight(shape.heads * head_dim, shape.hidden)
        tensors[f"{prefix}.self_attn.k_proj.weight"] = weight(shape.kv_heads * head_dim, shape.hidden)
        tensors[f"{prefix}.self_attn.v_proj.weight"] = weight(shape.kv_heads * head_dim, shape.hidden)
        tensors[f"{prefix}.self_attn.o_proj.weight"] = weight(shape.hidden, shape.heads * head_dim)
        tensors[f"{prefix}.mlp.gate_proj.weight"] = weight(shape.intermediate, shape.hidden)
        tensors[f"{prefix}.mlp.up_proj.weight"] = weight(shape.intermediate, shape.hidden)
        tensors[f"{prefix}.mlp.down_proj.weight"] = weight(shape.hidden, shape.intermediate)
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(shape.hidden, dtype=torch.bfloat16)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(shape.hidden, dtype=torch.bfloat16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_recipe(path: Path, donors: Path, gate_mode: str) -> None:
    import yaml

    recipe = {
        "base_model": str(donors / "base"),
        "gate_mode": gate_mode,
        "dtype": "bfloat16",
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(donors / f"expert{index}"), "positive_prompts": prompts}
            for index, prompts in enumerate(PROMPTS.values())
        ],
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def measure(command: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"{command[:3]} failed: {process.stderr.read().decode()[-2000:]}")
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return wall, peak


IO_FLOOR_SCRIPT = """
import json, struct, sys
from pathlib import Path
donors, out = Path(sys.argv[1]), Path(sys.argv[2])
needed = 0
buffer = bytearray(16 * 2**20)
def read_ranges(file, keep):
    global needed
    with file.open("rb", buffering=0) as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name == "__metadata__" or not keep(name):
                continue
            start, end = entry["data_offsets"]
            handle.seek(8 + size + start)
            left = end - start
            while left:
                got = handle.readinto(memoryview(buffer)[: min(left, len(buffer))])
                left -= got
                needed += got
read_ranges(donors / "base" / "model.safetensors", lambda n: ".mlp." not in n)
for index in range(3):
    read_ranges(donors / f"expert{index}" / "model.safetensors", lambda n: ".mlp." in n)
written = 0
with out.open("wb") as handle:
    while written < int(sys.argv[3]):
        chunk = min(len(buffer), int(sys.argv[3]) - written)
        handle.write(memoryview(buffer)[:chunk])
        written += chunk
print(needed)
"""


def output_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run(layers: int, workdir: Path, mergekit: str | None, repeats: int) -> dict[str, object]:
    donors = workdir / f"donors-{layers}"
    for index, name in enumerate(["base", "expert0", "expert1", "expert2"]):
        build_donor(donors / name, layers, seed=index)
    results: dict[str, object] = {"layers": layers}
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    for mode in ("cheap_embed", "hidden"):
        recipe = workdir / f"recipe-{mode}.yml"
        write_recipe(recipe, donors, mode)
        out = workdir / f"out-{mode}-{layers}"
        runs = [
            measure(
                [
                    sys.executable,
                    "-m",
                    "app",
                    "merge",
                    str(recipe),
                    str(out),
                    "--overwrite",
                    "--quiet",
                    "--device",
                    "cpu",
                ],
                env,
            )
            for _ in range(repeats)
        ]
        wall, peak = min(r[0] for r in runs), max(r[1] for r in runs)
        results[f"ours_{mode}"] = {"wall_s": wall, "peak_rss_mb": peak / 2**20, "output_gb": output_bytes(out) / 1e9}
        if mergekit:
            mk_out = workdir / f"mergekit-{mode}-{layers}"
            mk_runs = []
            for _ in range(repeats):  # best of as many runs as ours, so that both get a warm start
                shutil.rmtree(mk_out, ignore_errors=True)
                mk_runs.append(measure([mergekit, str(recipe), str(mk_out), "--device", "cpu", "--quiet"]))
            mk_wall, mk_peak = min(r[0] for r in mk_runs), max(r[1] for r in mk_runs)
            results[f"mergekit_{mode}"] = {"wall_s": mk_wall, "peak_rss_mb": mk_peak / 2**20}
            shutil.rmtree(mk_out, ignore_errors=True)
    out_size = output_bytes(workdir / f"out-hidden-{layers}")
    floor_file = workdir / "floor.bin"
    io_wall, _ = min(
        (
            measure([sys.executable, "-c", IO_FLOOR_SCRIPT, str(donors), str(floor_file), str(out_size)])
            for _ in range(2)
        ),
        key=lambda r: r[0],
    )
    floor_file.unlink()
    startup, _ = min(
        (measure([sys.executable, "-c", "import torch, transformers, safetensors"]) for _ in range(2)),
        key=lambda r: r[0],
    )
    results["io_floor_s"] = io_wall
    results["startup_s"] = startup
    return results


def report(results: dict[str, object]) -> list[str]:
    lines = [f"donors with {results['layers']} layers"]
    floor = results["io_floor_s"] + results["startup_s"]
    lines.append(f"  I/O floor {results['io_floor_s']:.2f} s + interpreter start-up {results['startup_s']:.2f} s")
    for mode in ("cheap_embed", "hidden"):
        ours = results[f"ours_{mode}"]
        line = (
            f"  {mode:11s} ours: {ours['wall_s']:.2f} s, peak RSS {ours['peak_rss_mb']:.0f} MB, "
            f"output {ours['output_gb']:.2f} GB, {ours['wall_s'] / floor:.2f}x the floor"
        )
        if f"mergekit_{mode}" in results:
            theirs = results[f"mergekit_{mode}"]
            line += (
                f"; mergekit-moe: {theirs['wall_s']:.2f} s, {theirs['peak_rss_mb']:.0f} MB"
                f" -> time {ours['wall_s'] / theirs['wall_s']:.2f}x,"
                f" RSS {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x"
            )
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16, help="layers per donor (16: ~250M parameters)")
    parser.add_argument("--mergekit", default=shutil.which("mergekit-moe"), help="path to mergekit-moe")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "merge")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-scale-check", action="store_true", help="skip the half-depth run")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    all_results = [run(args.layers, args.workdir, args.mergekit, args.repeats)]
    if not args.no_scale_check:
        all_results.append(run(args.layers // 2, args.workdir, None, args.repeats))
    for results in all_results:
        print("\n".join(report(results)))
    if len(all_results) == 2:
        for mode in ("cheap_embed", "hidden"):
            big, small = all_results[0][f"ours_{mode}"], all_results[1][f"ours_{mode}"]
            print(
                f"  {mode}: peak RSS at {all_results[0]['layers']} layers / at {all_results[1]['layers']} layers = "
                f"{big['peak_rss_mb'] / small['peak_rss_mb']:.2f}x (the model is 2x larger)"
            )
    (args.workdir / "results.json").write_text(json.dumps(all_results, indent=2))


if __name__ == "__main__":
    main()
