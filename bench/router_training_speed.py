"""Router training speed and memory: our trainer against a plain PyTorch loop with only the gates trainable.

Builds a random Mixtral (by default 4 layers, hidden 256, 8 experts of 512, top-2) and runs, each in a
process of its own so that peak RSS is the run's own, alternately:
- plain: ``AutoModelForCausalLM`` with every parameter frozen but the routers, AdamW on those, and
  ``model(input_ids, labels=input_ids, output_router_logits=True)`` (the loss with transformers' own
  load-balancing term), ``loss.backward()``, ``optimizer.step()``, ``loss.item()`` each step;
- ours: ``train_routers`` (same model, batch, sequence length, dtype), validation only at the end, no
  checkpoints; its tokens/s is taken between its warm-up step and its last step from its progress records.
Both skip the first ``--warmup`` steps. Reports the median tokens/s and peak RSS of each and the ratios;
the requirement is tokens/s ratio >= 1.0 and peak memory ratio <= 1.0. On CUDA the peak allocated GPU
memory is compared too.

Run from the repository root:
    python bench/router_training_speed.py [--device cpu|cuda] [--dtype float32|bfloat16] [--steps 30]
        [--warmup 5] [--batch-size 4] [--seq-len 256] [--layers 4] [--hidden 256] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ["the", "a", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as", "by", "at", "from", "that"]


def build_model(args: argparse.Namespace, folder: Path) -> Path:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from tests.models import write_tokenizer

    vocab = write_tokenizer(folder)
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    generator = __import__("random").Random(0)
    text = "\n\n".join(" ".join(generator.choice(WORDS) for _ in range(120)) for _ in range(2000))
    (folder.parent / "train.txt").write_text(text, encoding="utf-8")
    return folder


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def run_plain(args: argparse.Namespace, folder: Path) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from app.core.devices import compute_dtype, resolve_device

    device = resolve_device(args.device)
    dtype = compute_dtype(device, None if args.dtype == "auto" else args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model.requires_grad_(False)
    gates = [layer.mlp.gate.weight for layer in model.model.layers]
    for gate in gates:
        gate.requires_grad_(True)
    optimizer = torch.optim.AdamW(gates, lr=1e-3, weight_decay=0.0)
    model.train()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    started = 0.0
    for step in range(args.steps):
        if step == args.warmup:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
        ids = torch.randint(4, vocab, (args.batch_size, args.seq_len), generator=generator).to(device)
        output = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(gates, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        output.loss.item()
    seconds = time.perf_counter() - started
    tokens = (args.steps - args.warmup) * args.batch_size * args.seq_len
    result = {"tokens_per_s": tokens / seconds, "peak_rss": peak_rss_bytes()}
    if device.startswith("cuda"):
        result["peak_gpu"] = torch.cuda.max_memory_allocated()
    return result


def run_ours(args: argparse.Namespace, folder: Path) -> dict[str, float]:
    import torch

    from app.core.progress import run_job
    from app.core.training.settings import RouterTrainingSettings, TrainingData
    from app.core.training.trainer import train_routers

    settings = RouterTrainingSettings(
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        eval_every=10**9,
        patience=None,
        checkpoint_every=0,
        device=args.device,
        dtype=args.dtype,
    )
    out = Path(tempfile.mkdtemp(prefix="router-bench-out-")) / "out"
    records = []
    run_job(train_routers(folder, out, settings, TrainingData(files=(folder.parent / "train.txt",))), records.append)
    rates = {r.step: r.tokens_per_s for r in records if r.stage == "train"}
    per_step = args.batch_size * args.seq_len
    # Cumulative rates give cumulative times: the time of steps warmup+1..N is their difference.
    elapsed = {step: step * per_step / rate for step, rate in rates.items()}
    seconds = elapsed[args.steps] - elapsed[args.warmup]
    result = {"tokens_per_s": (args.steps - args.warmup) * per_step / seconds, "peak_rss": peak_rss_bytes()}
    if torch.cuda.is_available() and str(args.device).startswith(("cuda", "auto")):
        result["peak_gpu"] = torch.cuda.max_memory_allocated()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--worker", choices=("plain", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        run = run_plain if args.worker == "plain" else run_ours
        print(json.dumps(run(args, args.model)))
        return
    folder = build_model(args, Path(tempfile.mkdtemp(prefix="router-bench-")) / "moe")
    passed = sys.argv[1:]
    results: dict[str, list[dict[str, float]]] = {"plain": [], "ours": []}
    for repeat in range(args.repeats):
        for worker in ("plain", "ours") if repeat % 2 == 0 else ("ours", "plain"):
            done = subprocess.run(
                [sys.executable, __file__, *passed, "--worker", worker, "--model", str(folder)],
                capture_output=True, text=True, check=True, cwd=REPO,
            )  # fmt: skip
            results[worker].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(worker, results[worker][-1], flush=True)
    summary = {
        worker: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for worker, runs in results.items()
    }
    tokens = args.batch_size * args.seq_len
    print(f"model: Mixtral {args.layers} layers, hidden {args.hidden}, 8 experts top-2; batch {args.batch_size} x "
          f"{args.seq_len} = {tokens} tokens/step; {args.steps - args.warmup} timed steps; device {args.device}")
    for worker in ("plain", "ours"):
        line = f"{worker:>5}: {summary[worker]['tokens_per_s']:,.0f} tokens/s, peak RSS "
        line += f"{summary[worker]['peak_rss'] / 2**20:,.0f} MiB"
        if "peak_gpu" in summary[worker]:
            line += f", peak GPU {summary[worker]['peak_gpu'] / 2**20:,.0f} MiB"
        print(line)
    speed = summary["ours"]["tokens_per_s"] / summary["plain"]["tokens_per_s"]
    memory = summary["ours"]["peak_rss"] / summary["plain"]["peak_rss"]
    print(f"ratio ours/plain: tokens/s {speed:.3f} (needs >= 1.0), peak RSS {memory:.3f} (needs <= 1.0)")


if __name__ == "__main__":
    main()
