"""`frankenmoe generate`: one answer from a model, headless, with the routing trace written out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from app.core.devices import DEVICE_CHOICES
from app.core.recipe import DTYPE_ALIASES


def register(commands: Any) -> None:
    generate = commands.add_parser(
        "generate", help="answer a prompt with a model (a merged MoE or any causal LM) and trace its routing"
    )
    generate.add_argument("model", help="model folder, or a Hub id already downloaded")
    generate.add_argument("--prompt", required=True, help="the user's message")
    generate.add_argument("--system", default="", help="system prompt")
    generate.add_argument("--max-new-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    generate.add_argument("--top-p", type=float, default=0.9)
    generate.add_argument("--top-k", type=int, default=50)
    generate.add_argument("--repetition-penalty", type=float, default=1.1)
    generate.add_argument("--seed", type=int, help="for a repeatable answer")
    generate.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    generate.add_argument("--dtype", choices=sorted(set(DTYPE_ALIASES.values())))
    generate.add_argument(
        "--load", default="full", choices=("full", "8bit", "4bit", "spread"), help="how to fit the model in memory"
    )
    generate.add_argument("--trace", type=Path, help="write the routing trace here (JSON Lines)")
    generate.add_argument("--trust-remote-code", action="store_true", help="allow this model's own Python code to run")
    generate.add_argument("--quiet", action="store_true", help="no progress bars or statistics")
    generate.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from app.cli.progress import ProgressBars
    from app.core.chat import LoadMode, LoadRequest, SamplingSettings, TokenGenerated, load_chat_model, write_trace
    from app.core.progress import run_job

    request = LoadRequest(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        mode=LoadMode(args.load),
        trust_remote_code=args.trust_remote_code,
    )
    settings = SamplingSettings(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    ).validated()
    with ProgressBars(enabled=not args.quiet) as bars:
        model = run_job(load_chat_model(request), bars)
    try:
        turns = [{"role": "system", "content": args.system}] if args.system else []
        turns.append({"role": "user", "content": args.prompt})

        def print_token(event: object) -> None:
            if isinstance(event, TokenGenerated):
                sys.stdout.write(event.text)
                sys.stdout.flush()

        result = run_job(model.generate(model.prompt_ids(turns), settings), print_token)
        sys.stdout.write("\n")
        if args.trace is not None:
            write_trace(result.trace, args.trace)
        if not args.quiet:
            print(
                f"{len(result.generated)} tokens ({result.stop_reason}), {result.tokens_per_second:.1f} tokens/s, "
                f"first token after {result.time_to_first_token:.2f} s, seed {result.seed}",
                file=sys.stderr,
            )
            if not model.is_moe:
                print(f"no routing: {model.panel_unavailable_reason}", file=sys.stderr)
            elif args.trace is not None:
                print(f"routing trace of {len(result.trace)} tokens written to {args.trace}", file=sys.stderr)
    finally:
        model.unload()
    return 0
