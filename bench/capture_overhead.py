"""Routing-capture overhead: tokens per second of the chat engine with and without router hooks.

Builds a random Mixtral (by default 8 layers, hidden 768, 8 experts of 1536, top-2: about 240M
parameters, whose decoding is dominated by real matrix work as a real model's is) and generates the
same greedy answer, alternating runs without any hooks attached and with capture on, so that load
from other processes hits both alike. Reports the median decoding speed of each and their ratio; the
requirement is a ratio of at least 0.97.

Run from the repository root:
    python bench/capture_overhead.py [--device cpu|cuda|mps] [--dtype float32|bfloat16|float16]
                                     [--tokens 48] [--repeats 5] [--layers 8] [--hidden 768] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_chat_model(args: argparse.Namespace) -> object:
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from app.core.chat import ChatModel
    from app.core.devices import compute_dtype, resolve_device
    from tests.models import write_tokenizer

    device = resolve_device(args.device)
    dtype = compute_dtype(device, args.dtype)
    folder = Path(tempfile.mkdtemp(prefix="capture-bench-"))
    vocab = write_tokenizer(folder)
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=12,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = MixtralForCausalLM(config).to(dtype)
    return ChatModel(model=model, tokenizer=AutoTokenizer.from_pretrained(folder), name="bench", device=device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads; 1 on a shared machine, where spinning threads distort timing"
    )
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from app.core.chat import SamplingSettings
    from app.core.chat.capture import RouterCapture
    from app.core.progress import run_job

    started = time.perf_counter()
    chat = build_chat_model(args)
    parameters = sum(p.numel() for p in chat.model.parameters())
    print(
        f"model: {parameters / 1e6:.0f}M parameters on {chat.device} in {chat.model.dtype}, built in "
        f"{time.perf_counter() - started:.0f} s"
    )
    prompt = chat.prompt_ids([{"role": "user", "content": "Compute 7 times 8 and subtract 6. " * 8}])
    settings = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=args.tokens)

    def run(capture: bool) -> tuple[float, list[int]]:
        result = run_job(chat.generate(prompt, settings, capture=capture, stop_token_ids=()))
        return result.tokens_per_second, [t.token_id for t in result.generated]

    run(True)  # warm-up: allocator, kernels, caches
    plain, captured = [], []
    for _ in range(args.repeats):
        chat.capture.remove()  # the baseline has no hooks at all, not merely disabled ones
        speed, plain_tokens = run(False)
        plain.append(speed)
        chat.capture = RouterCapture(chat.model)
        speed, captured_tokens = run(True)
        captured.append(speed)
        if plain_tokens != captured_tokens:
            print("error: capture changed the generated tokens", file=sys.stderr)
            return 1
    without, with_capture = statistics.median(plain), statistics.median(captured)
    ratio = with_capture / without
    print(f"prompt {len(prompt)} tokens, {args.tokens} new tokens, {args.repeats} runs of each, medians:")
    print(f"  without hooks: {without:.2f} tokens/s  (runs: {', '.join(f'{s:.2f}' for s in plain)})")
    print(f"  with capture:  {with_capture:.2f} tokens/s  (runs: {', '.join(f'{s:.2f}' for s in captured)})")
    print(f"  ratio: {ratio:.3f} ({'meets' if ratio >= 0.97 else 'misses'} the 0.97 requirement)")
    return 0 if ratio >= 0.97 else 1


if __name__ == "__main__":
    sys.exit(main())
