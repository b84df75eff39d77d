"""LoRA merge benchmark: 3 LoRA experts against 3 full fine-tunes of the same size, side by side.

Builds a base and three full "fine-tunes" (bfloat16 Llama donors of bench/merge.py's shape) and three
PEFT-format LoRA adapters on the base (rank 16, alpha 32, on gate/up/down, saved as safetensors with
an adapter_config.json as PEFT writes them). Merges `base+adapterN` experts and the full experts with
the same recipe otherwise (gate mode, output dtype, torch threads), each in its own `frankenmoe merge`
process, the two kinds alternating, and reports the median and best wall time, CPU time and peak RSS
of both and their ratios (issue 16's target: the LoRA merge within 1.2x of the full one). Before each
merge the previous output is removed and the page cache written back, outside the time measured.

--warm runs each merge in a process that has imported torch and transformers first and times the
merge alone, as the app runs it (where the Preview has loaded torch before the merge starts); a cold
`frankenmoe merge` process also pays for importing torch before a LoRA weight can be computed, which
a full fine-tune's merge hides behind its file copies.

The donors are built in a child process: a child's peak RSS starts from its parent's (Linux keeps
ru_maxrss across fork and exec), so this process stays small (no torch) for the figures to be the
merges' own.

--shape tinyllama builds donors of TinyLlama-1.1B's sizes (2.2 GB each; --layers 22 for the real
model's 22 layers), whose MoE of three experts is 5.25 GB: a real model's files, which the page
cache no longer holds alongside the donors, so that both merges wait on the disk.

Figures (2 virtual cores, bf16 output, rank 16; wall ratio LoRA / full as the median of each
kind's times, then the median of each LoRA merge over the full one before it):
  2026-12-03, a later stop, main at 42117d4 (the same merge code):
    24 layers, 6 runs: cheap_embed 1.26x (1.41x), hidden 1.20x (1.21x); RSS 1.09x, 1.08x
    Tried and dropped: writing the shard with O_DIRECT through a 32 MiB staging buffer, past the
      page cache (this machine's disk took 1.36 GB at 1.2-2.5 GB/s that way, against 0.3-0.6 GB/s
      into new page-cache pages). The full merge gained more than the LoRA one, which then waits
      on its arithmetic: 24 layers, 4 runs, cheap_embed 1.42x (1.33x; full 3.46 s, LoRA 4.91 s),
      hidden 1.32x (1.22x). The product and the addition as one bfloat16 addmm_ (oneDNN adds its
      float32 sums to W and rounds once): 1.85 ms against 3.44 ms a 3072 x 1024 weight on one
      thread, and the warm 24-layer merge's CPU time a median 1.77 s against 2.32 s; but its sums
      are not MKL's, and where W + dW nearly cancels, a value moved by up to 6 bfloat16 steps from
      PEFT's merge (84 of 820 M values differed), against issue 16's bound of one step.
  2026-12-03, the next stop, the same merge code:
    at f5e7c04: 24 layers, 4 runs: cheap_embed 1.03x (1.18x), hidden 1.15x (1.11x); 8 layers, 6 runs:
      cheap_embed 1.16x (1.15x), hidden 1.11x (1.03x); RSS 1.08x-1.09x
    with the process's exit no longer collecting garbage (147da01: 0.55 s less in both kinds): 24
      layers, 6 runs: cheap_embed 1.34x (1.35x; CPU 1.31x), hidden 1.04x (1.02x); 8 layers, 6 runs:
      cheap_embed 0.98x (1.04x), hidden 1.04x (1.06x); RSS 1.08x-1.09x
    5 pairs of 24-layer cheap_embed merges (f5e7c04) with the machine left alone for 4 s after the
      page cache was settled: 1.39x (1.36x); straight after it: 1.00x (1.16x)
    Tried and dropped: stand-in bytes copied into the LoRA weights' places while torch loads, so
      that their pages exist when the weights are written (alone, 1.36 GB went into existing pages
      in 0.31-0.40 s against 0.84-3.16 s into new ones). In the merge, torch then loaded later by
      as much (2.29-2.35 s against 1.92-2.10 s): 10 pairs, 3.81 s against 3.93 s (paired 1.02x),
      CPU +0.2 s. Importing torch from the process's start: the main thread's imports took turns
      with it for the GIL (the merge's code imported at 0.9-1.3 s instead of 0.4 s), and torch
      loaded no sooner. The arithmetic as a product then an addition (3.1-4.0 ms a 3072 x 1024
      weight) or an addition into the bfloat16 result (3.7-4.3 ms), against addmm_ in place (2.3-2.9 ms).
  2026-12-03, later the same day, the same merge code as c8d8f8e, page cache settled:
    8 layers, 6 runs each, two series: cheap_embed 1.10x (1.07x) and 1.05x (1.07x), hidden 1.15x
      (1.15x) and 1.07x (1.14x); RSS 1.07x-1.09x
    24 layers, 6 runs each, two series: cheap_embed 1.39x (1.44x) and 1.22x (1.24x), hidden 1.20x
      (1.27x) and 1.28x (1.19x); RSS 1.08x-1.09x
    This machine's host lends memory lazily and takes freed memory back (free page reporting):
    touching fresh memory ran at 0.2-1.2 GB/s, and writing the same 1.36 GB into a new file took
    from 0.4 s to 6 s from one minute to the next. The LoRA merge writes its computed weights after
    torch has loaded, the full merge copies them while it loads, so the LoRA merge's time moves
    with that cost (its writes took 0.7 s to 2.3 s for 1.36 GB in the 24-layer merge).
  2026-12-03, copying ahead while torch loads (c184a1d), the page cache emptied and the inputs read
  in before each merge (the default since 42b06c5; the figures before it are with the page cache as
  earlier runs left it, which slows the full merge's copies more):
    8 layers, 6 runs: cheap_embed 1.28x (1.26x), hidden 1.06x (1.06x); RSS 1.08x, 1.07x
    24 layers, 5 runs: cheap_embed 1.24x (1.27x), hidden 1.17x (1.18x); RSS 1.07x, 1.08x. --warm,
      6 runs: cheap_embed 1.26x (1.29x; CPU 1.69x), hidden 1.19x (1.20x); RSS 1.08x, 1.08x
    TinyLlama's sizes, 22 layers, 3 runs: cheap_embed 0.92x (0.95x), hidden 1.05x (0.97x); RSS 1.07x,
      1.04x (the full merge's times ranged from 5.5 s to 11.9 s)
    the 24-layer LoRA merge alone against 09210ab's (before copying ahead), alternating (6 runs, cheap_embed):
      3.60 s against 3.77 s. In a fresh process the writer reached the first LoRA weight at 0.75 s
      and torch was loaded at 1.75 s; the LoRA merge ends a few tenths of a second after the full
      one, whose copies all fall in that second (8 layers: 0.35-0.5 s after torch has loaded)
  2026-12-03, the writer computing blocks too, one worker on two cores (dc3100f):
    8 layers, 6 runs: cheap_embed 1.13x (1.10x), hidden 1.08x (1.08x); RSS 1.08x, 1.08x
    24 layers, 5 runs: cheap_embed 1.26x (1.24x), hidden 1.15x (1.19x); RSS 1.09x, 1.08x. 4 runs
      before: 1.27x (1.18x), 1.29x (1.24x). --warm, 6 runs after dropping the page cache: cheap_embed
      1.40x (1.47x; CPU 2.18x), hidden 1.30x (1.31x); RSS 1.06x, 1.08x. 5 runs right after the
      TinyLlama runs had filled the page cache: 1.84x (1.65x), 1.18x (1.16x)
    TinyLlama's sizes, 22 layers, 3 runs: cheap_embed 1.14x (1.14x), hidden 1.14x (1.15x); RSS
      1.07x, 1.04x. --warm, 3 runs: cheap_embed 0.77x (0.67x), hidden 0.88x (0.80x); RSS 1.03x, 1.04x
    the LoRA merge alone against 4a0abe5's, alternating (4 runs, 24 layers): --warm cheap_embed
      1.39 s against 2.23 s, hidden 3.13 s against 3.28 s; in a fresh process 4.76 s against 4.72 s
      and 5.74 s against 5.67 s
  2026-12-03, main at 4a0abe5:
    8 layers (0.63 GB out), 8 runs: cheap_embed 1.08x (1.09x), hidden 1.10x (1.03x); RSS 1.09x, 1.08x
    24 layers (1.64 GB out), 4 runs: cheap_embed 1.26x (1.24x), hidden 1.03x (1.12x); RSS 1.09x, 1.08x
    TinyLlama's sizes, 22 layers (5.25 GB out), 5 runs: cheap_embed 0.83x (0.82x), hidden 1.01x
      (0.99x); RSS 1.07x, 1.04x. 3 runs before: 1.16x (1.16x), 1.04x (0.91x). --warm, 3 runs:
      cheap_embed 1.28x (1.28x; CPU 2.18x), hidden 1.05x (1.03x); RSS 1.06x, 1.04x
  2026-12-02, the workers sharing out each weight's blocks of rows (6fc3dfd):
    8 layers, 10 runs: cheap_embed 1.19x (1.13x), hidden 1.15x (1.15x); RSS 1.08x, 1.08x
    24 layers, 8 runs: cheap_embed 1.30x (1.32x), hidden 1.23x (1.24x); RSS 1.09x, 1.09x
  the same day, each worker streaming its own weights' blocks (4f5d70c):
    8 layers, 10 runs: cheap_embed 1.09x (1.08x), hidden 1.13x (1.11x); RSS 1.09x, 1.07x
    24 layers, 8 runs: cheap_embed 1.28x (1.22x), hidden 1.12x (1.15x); RSS 1.09x, 1.08x
  an earlier session, whole weights per worker and B @ A whole: 24 layers 1.27x-1.34x; before any
  workers, 2.13x and 1.74x
Series on this virtual machine move by up to 0.15 in the ratio from one to the next (the kernel's
time for writing the same 1.6 GB varies threefold between runs). Where the 24-layer cheap_embed
merge loses on two cores: a cold process cannot compute a LoRA weight before `import torch` ends
(2.4 s here; the writer reaches the first LoRA weight at 0.9 s and waits until 2.8 s), while a full
merge copies meanwhile; and the arithmetic (about 3 ms a 3072 x 1024 weight on one core, reading
included, and more beside the writer's copies) keeps two cores busy where the full merge keeps one.
--warm shows the second alone: in cheap_embed mode the full merge is nothing but the kernel's file
copies (1.1 s), and the LoRA merge's CPU time is twice that. Two workers left the writer a share of
a core (before dc3100f: 2.04x, 3 runs); with the writer computing whenever it would wait, the two
cores are busy to the end: merging five times over in one process, the LoRA merge took 1.19x the
full one's time (medians, 0.97 s against 0.81 s). At a real model's size both merges wait on the
disk and the arithmetic is hidden behind it.

Run from the repository root: python bench/lora_merge.py [--layers 8] [--shape bench|tinyllama] [--rank 16]
[--repeats 5] [--warm] [--code OTHER_CHECKOUT]  (--code merges with another checkout's app, e.g. to compare
a change with main)
"""

from __future__ import annotations

import argparse
import json
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

from merge import BENCH_SHAPE, PROMPTS, TINYLLAMA_SHAPE, DonorShape, build_donor  # noqa: E402  (bench/merge.py)

SHAPES = {"bench": BENCH_SHAPE, "tinyllama": TINYLLAMA_SHAPE}


def projections(shape: DonorShape) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each MLP projection."""
    return {
        "gate_proj": (shape.intermediate, shape.hidden),
        "up_proj": (shape.intermediate, shape.hidden),
        "down_proj": (shape.hidden, shape.intermediate),
    }


def build_adapter(folder: Path, base: Path, layers: int, rank: int, seed: int, shape: DonorShape) -> None:
    """A LoRA adapter on the base's MLP, in PEFT's file layout, with random non-zero A and B."""
    import torch
    from safetensors.torch import save_file

    if (folder / "adapter_model.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for projection, (out_features, in_features) in projections(shape).items():
            key = f"base_model.model.model.layers.{layer}.mlp.{projection}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, in_features, generator=generator) * 0.01).to(
                torch.bfloat16
            )
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator) * 0.01).to(
                torch.bfloat16
            )
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(projections(shape)),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


# A merge in a process that has loaded torch and transformers first, as in the app; it prints the
# wall and CPU seconds of the merge alone.
WARM_MERGE = """
import resource, sys, time
from pathlib import Path
import torch, transformers  # noqa: F401
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.progress import run_job
from app.core.recipe import load_recipe

recipe = load_recipe(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF)
started = time.perf_counter()
run_job(merge_moe(recipe, MergeOptions(out_dir=Path(sys.argv[2]), device="cpu")))
wall = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_SELF)
print(wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
"""


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def settle_page_cache(inputs: list[Path], env: dict[str, str], cwd: Path) -> None:
    """The same page cache before every merge: written back, emptied, then the inputs and torch read in again.

    Left as it is, the page cache holds whatever earlier runs wrote, and the kernel reclaims it page
    by page as the output is written: the full merge (nothing but file copies) then took from 1.0 s
    to 5.7 s with torch loaded, in consecutive runs. Needs root (Linux); the caller has written every
    file back (os.sync), so that emptying the cache drops everything.
    """
    DROP_CACHES.write_text("3\n")
    for folder in inputs:
        for file in folder.iterdir():
            with file.open("rb", buffering=0) as handle:
                while handle.read(16 * 2**20):
                    pass
    subprocess.run([sys.executable, "-c", "import torch, transformers"], check=True, env=env, cwd=cwd)


def measure(
    command: list[str], env: dict[str, str], cwd: Path, out: Path, inputs: list[Path] | None
) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (bytes) of one merge in its own process.

    The previous output is removed and every file written back first, so that neither its removal
    nor its write-back falls into this merge's time; with inputs, the page cache is settled too
    (settle_page_cache). CPU time is given too because on a shared machine the wall time also
    measures the others' load. A warm merge's process prints its merge's own wall and CPU seconds.
    """
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    if inputs is not None:
        settle_page_cache(inputs, env, cwd)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(process.pid, 0)
    wall, cpu = time.perf_counter() - started, usage.ru_utime + usage.ru_stime
    if status != 0:
        raise RuntimeError(f"{command[:4]} failed: {process.stderr.read().decode()[-2000:]}")
    if "-c" in command:  # a warm merge
        wall, cpu = (float(value) for value in process.stdout.read().split())
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return wall, cpu, peak


def write_recipe(path: Path, base: Path, sources: list[str], gate_mode: str) -> None:
    import yaml

    recipe = {
        "base_model": str(base),
        "gate_mode": gate_mode,
        "dtype": "bfloat16",
        "experts_per_token": 2,
        "experts": [
            {"source_model": source, "positive_prompts": prompts}
            for source, prompts in zip(sources, PROMPTS.values(), strict=True)
        ],
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def build_inputs(donors: Path, layers: int, rank: int, shape: DonorShape) -> None:
    for index, name in enumerate(["base", "expert0", "expert1", "expert2"]):
        build_donor(donors / name, layers, seed=index, shape=shape)
    for index, folder in enumerate(adapter_folders(donors, rank)):
        build_adapter(folder, donors / "base", layers, rank, seed=100 + index, shape=shape)


def donors_folder(workdir: Path, layers: int, shape: str) -> Path:
    return workdir / (f"donors-{layers}" if shape == "bench" else f"donors-{shape}-{layers}")


def adapter_folders(donors: Path, rank: int) -> list[Path]:
    return [donors / f"adapter{index}-r{rank}" for index in range(3)]


def run(
    layers: int,
    shape: str,
    rank: int,
    workdir: Path,
    repeats: int,
    threads: int | None,
    code: Path,
    warm: bool,
    settle: bool,
) -> dict[str, object]:
    donors = donors_folder(workdir, layers, shape)
    build = [sys.executable, __file__, "--build-only", "--layers", str(layers), "--rank", str(rank), "--shape", shape]
    subprocess.run([*build, "--workdir", str(workdir)], check=True)
    base = donors / "base"
    adapters = adapter_folders(donors, rank)
    kinds = {
        "full": [str(donors / f"expert{index}") for index in range(3)],
        "lora": [f"{base}+{folder}" for folder in adapters],
    }
    env = {**os.environ, "PYTHONPATH": str(code), "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads, for both kinds alike
    results: dict[str, object] = {
        "layers": layers,
        "shape": shape,
        "rank": rank,
        "threads": threads or "default",
        "code": str(code),
        "repeats": repeats,
        "warm": warm,
        "page_cache": "emptied, then the inputs read in, before each merge" if settle else "as earlier runs left it",
    }
    # Both kinds' inputs, whichever merges: each run starts from the same page cache.
    inputs = [base, *(donors / f"expert{index}" for index in range(3)), *adapters] if settle else None
    for mode in ("cheap_embed", "hidden"):
        commands = {}
        for kind, sources in kinds.items():
            recipe = workdir / f"recipe-{kind}-{mode}.yml"
            write_recipe(recipe, base, sources, mode)
            out = workdir / f"out-{kind}-{mode}"
            if warm:
                command = [sys.executable, "-c", WARM_MERGE, str(recipe), str(out)]
            else:
                command = [sys.executable, "-m", "app", "merge", str(recipe), str(out), "--quiet", "--device", "cpu"]
            commands[kind] = (command, out)
        runs: dict[str, list[tuple[float, float, int]]] = {kind: [] for kind in kinds}
        # The kinds alternate, so that a load that comes and goes on the machine weighs on both alike.
        for _ in range(repeats):
            for kind, (command, out) in commands.items():
                runs[kind].append(measure(command, env, code, out, inputs))
        for kind, (_command, out) in commands.items():
            results[f"{kind}_{mode}"] = {
                "wall_s": min(r[0] for r in runs[kind]),
                "median_wall_s": statistics.median(r[0] for r in runs[kind]),
                "cpu_s": statistics.median(r[1] for r in runs[kind]),
                "peak_rss_mb": max(r[2] for r in runs[kind]) / 2**20,
                "output_gb": sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e9,
            }
        # Each LoRA merge against the full merge run just before it.
        results[f"paired_ratio_{mode}"] = statistics.median(
            lora[0] / full[0] for full, lora in zip(runs["full"], runs["lora"], strict=True)
        )
    return results


def report(results: dict[str, object]) -> list[str]:
    process = "merge alone, in a process with torch loaded" if results["warm"] else "frankenmoe merge process"
    lines = [
        f"{results['shape']} donors with {results['layers']} layers, adapters of rank {results['rank']}, "
        f"torch threads: {results['threads']}, {process}; median of {results['repeats']} (best in brackets); "
        f"page cache: {results['page_cache']}"
    ]
    for mode in ("cheap_embed", "hidden"):
        full, lora = results[f"full_{mode}"], results[f"lora_{mode}"]
        lines.append(
            f"  {mode:11s} full fine-tunes: {full['median_wall_s']:.2f} s wall ({full['wall_s']:.2f}), "
            f"{full['cpu_s']:.2f} s CPU, peak RSS {full['peak_rss_mb']:.0f} MB | LoRA experts: "
            f"{lora['median_wall_s']:.2f} s wall ({lora['wall_s']:.2f}), {lora['cpu_s']:.2f} s CPU, "
            f"peak RSS {lora['peak_rss_mb']:.0f} MB | wall {lora['median_wall_s'] / full['median_wall_s']:.2f}x "
            f"(paired {results[f'paired_ratio_{mode}']:.2f}x, best {lora['wall_s'] / full['wall_s']:.2f}x), "
            f"CPU {lora['cpu_s'] / full['cpu_s']:.2f}x, RSS {lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x "
            f"(output {lora['output_gb']:.2f} GB)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="layers per donor (8: ~125M parameters)")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="bench",
        help="the donors' sizes: the benches' small model, or TinyLlama-1.1B's (2.2 GB donors; use --layers 22)",
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--warm", action="store_true", help="time the merge alone, in a process that has imported torch (as the app)"
    )
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "lora_merge")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads for both kinds (OMP_NUM_THREADS); on a small machine busy with other work, "
        "1 keeps threads from spinning against that load",
    )
    parser.add_argument(
        "--code", type=Path, default=REPO, help="the checkout whose app merges (default: this one), to compare versions"
    )
    parser.add_argument(
        "--keep-page-cache",
        action="store_true",
        help="leave the page cache as earlier runs left it; by default (where allowed: root on Linux) it is "
        "emptied and the inputs read in again before each merge, so that every run starts alike",
    )
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        build_inputs(donors_folder(args.workdir, args.layers, args.shape), args.layers, args.rank, SHAPES[args.shape])
        return
    settle = not args.keep_page_cache and os.access(DROP_CACHES, os.W_OK)
    results = run(
        args.layers,
        args.shape,
        args.rank,
        args.workdir,
        args.repeats,
        args.threads,
        args.code.resolve(),
        args.warm,
        settle,
    )
    print("\n".join(report(results)))
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
