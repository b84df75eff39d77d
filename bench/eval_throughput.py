"""NLL evaluation throughput: ours against lm-eval's loglikelihood_rolling, side by side in one run.

Both score the same texts on the same loaded model object on the CPU: ours through
app.core.eval.nll.score_loaded_model, lm-eval through its HFLM wrapper's loglikelihood_rolling (the
request type of its wikitext-style perplexity tasks), each with the same batch size. Rounds alternate
between the two so that load from other processes hits both alike; the median of each is printed
with the ratio (ours / lm-eval, higher is better for ours). lm-eval needs the eval extra.

Run from the repository root: python bench/eval_throughput.py [--texts 64] [--rounds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.core.eval.data import EvalDataset  # noqa: E402
from app.core.eval.nll import score_loaded_model  # noqa: E402
from app.core.progress import run_job  # noqa: E402
from tests.models import make_tiny_model  # noqa: E402

WORDS = tuple(
    "the storm rolled over sea harbour boats gulls dawn quiet old fisher village hill river forest "  # noqa: SIM905
    "what is plus minus times number seven twelve forty def return add value list print class".split()
)


def texts(count: int, seed: int = 0) -> list[str]:
    """Paragraphs of 40 to 160 words, so that records differ in length as real ones do."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 160))) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="eval-throughput-"))
    folder = workdir / "model"
    if not (folder / "config.json").is_file():
        make_tiny_model(
            folder, "llama", seed=0, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
            num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
            # Longer than any text, so that neither side cuts or windows a record.
            config_overrides={"max_position_embeddings": 4096},
        )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    records = texts(args.texts)
    dataset = EvalDataset(name="bench", records=tuple(records))
    # Ours predicts every token after the first of the default encoding; lm-eval every token of the text
    # after its prefix token (BOS), so where the tokenizer adds no BOS it predicts one more per text.
    tokens = sum(len(tokenizer(text)["input_ids"]) - 1 for text in records)
    their_tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in records)
    assert len(tokenizer(max(records, key=len))["input_ids"]) < 4096
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    requests = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=index)
        for index, text in enumerate(records)
    ]

    ours_seconds, theirs_seconds = [], []
    ours_nll = theirs_nll = 0.0
    for _ in range(args.rounds):
        start = time.perf_counter()
        scores = run_job(score_loaded_model(model, tokenizer, [dataset], batch_size=args.batch_size))
        ours_seconds.append(time.perf_counter() - start)
        ours_nll = scores.results[0].nll
        start = time.perf_counter()
        logprobs = lm.loglikelihood_rolling(requests, disable_tqdm=True)
        theirs_seconds.append(time.perf_counter() - start)
        theirs_nll = -sum(logprobs) / their_tokens

    ours, theirs = statistics.median(ours_seconds), statistics.median(theirs_seconds)
    print(f"model: llama hidden {args.hidden}, {args.layers} layers; {len(records)} texts, {tokens} predicted tokens")
    print(f"batch size {args.batch_size}, {args.rounds} alternating rounds, medians, {torch.get_num_threads()} threads")
    ours_rate, their_rate = tokens / ours, their_tokens / theirs
    print(f"ours (score_loaded_model):        {ours:7.3f} s  {ours_rate:9.0f} tokens/s  nll {ours_nll:.5f}")
    print(f"lm-eval (loglikelihood_rolling):  {theirs:7.3f} s  {their_rate:9.0f} tokens/s  nll {theirs_nll:.5f}")
    print(f"ratio (ours / lm-eval, tokens/s): {ours_rate / their_rate:.2f}x")


if __name__ == "__main__":
    main()
